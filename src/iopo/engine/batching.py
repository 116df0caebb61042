"""The batching of pairs: prefix-shared and packed (each pair's prompt computed once, iopo.data.collate) when the
model allows it and gives the plain layout's log-probs, else plain right-padded rows; chosen on a first batch."""

from __future__ import annotations

import functools
import math

from iopo.config import ConfigError, TrainConfig
from iopo.core.logprobs import language_model, sequence_logps, shared_tolerance, sharing_obstacle
from iopo.data.collate import collate_pairs, collate_shared, layouts_gap
from iopo.data.tokenize import TokenizedPair
from iopo.engine import sharding
from iopo.engine.players import player_logps
from iopo.engine.session import Session, gathered
from iopo.io.log import get_logger

log = get_logger(__name__)


def shared_collate(cfg: TrainConfig):
    """Prefix-shared batches packed into rows of up to 2 x data.max_length tokens."""
    return functools.partial(collate_shared, pack_tokens=2 * cfg.data.max_length)


def choose_batching(session: Session, sample: list[TokenizedPair]) -> None:
    """Set session.collate from cfg.batching: under auto, prefix sharing only when the model allows it and this
    sample's log-probs agree both ways (every process checks its own sample; all must agree)."""
    cfg, accelerator = session.cfg, session.accelerator
    policy = session.policy
    obstacle = sharing_obstacle(language_model(policy.module))
    if cfg.batching == "plain":
        session.collate = collate_pairs
        return
    if cfg.batching == "shared":
        if obstacle:
            raise ConfigError(
                f"batching=shared: the model cannot share prompts: {obstacle}; use batching=plain"
            )
        session.collate = shared_collate(cfg)
        return
    gap = math.inf
    if obstacle is None:

        def forward(batch):
            with sharding.autocast(accelerator, policy.module):
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                return player_logps(policy, batch, session.players, False)

        pad = session.tokenizer.pad_token_id
        gap, obstacle = layouts_gap(forward, sample, pad, 2 * cfg.data.max_length)
    gap = max(row[0] for row in gathered(accelerator, [gap]))
    tolerance = shared_tolerance(cfg.mixed_precision != "no")
    if gap <= tolerance:
        session.collate = shared_collate(cfg)
        log.info(f"batching: prefix sharing + packing (first batch agrees with the plain forward: {gap:.1e})")
    else:
        why = obstacle or f"the first batch's log-probs differ from the plain forward's by {gap:.1e}"
        session.collate = collate_pairs
        log.info(f"batching: plain, because {why}")


def inference_collate(module, pairs: list, batch_size: int, pad_token_id: int, low_precision: bool):
    """The batching of a plain model's log-probs (an evaluation, no training): prefix sharing when the model
    allows it and its first batch agrees with the plain layout (as in training), else plain batches."""
    pack = 2 * max(
        (len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs), default=1
    )
    if not pairs or sharing_obstacle(module.model) is not None:
        return collate_pairs
    device = next(module.parameters()).device
    gap, _ = layouts_gap(
        lambda batch: sequence_logps(module, {k: v.to(device) for k, v in batch.items()}),
        pairs[:batch_size],
        pad_token_id,
        pack,
    )
    if gap <= shared_tolerance(low_precision):
        return functools.partial(collate_shared, pack_tokens=pack)
    return collate_pairs
