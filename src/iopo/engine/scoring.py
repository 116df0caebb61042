"""Log-probs of a test split and the implicit-reward metrics they give (Sec. 6.2): batched over the split,
sharded over processes and gathered back in order, for a session's policy or for a plain model."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from iopo.core.logprobs import SequenceLogProbs, language_model, sequence_logps
from iopo.core.losses import offline_metrics
from iopo.data.collate import collate_pairs
from iopo.data.tokenize import TokenizedPair
from iopo.engine import refcache, sharding
from iopo.engine.batching import inference_collate
from iopo.engine.players import BASE, Player, player_logps
from iopo.engine.session import Session
from iopo.io.log import get_logger
from iopo.io.models import load_model, model_fingerprint
from iopo.io.runlog import mark_phase

log = get_logger(__name__)


@torch.no_grad()
def dataset_logps(
    forward: Callable[[dict], dict],
    pairs: list[TokenizedPair],
    batch_size: int,
    pad_token_id: int,
    accelerator=None,
    progress: str | None = None,
    collate=collate_pairs,
) -> dict[str, torch.Tensor]:
    """Summed completion log-probs of every pair, sharded over processes and gathered back in order.

    `forward(batch) -> {"chosen_logps", "rejected_logps", ...}` runs one concatenated forward (see logprobs.py).
    `accelerator` None means one process on the CPU; `progress` is a progress-bar label (main process only);
    `collate(pairs, pad_token_id)` makes a batch (collate_pairs, or prefix-shared batches).
    Returns chosen_logps and rejected_logps, (N,) float32 on the CPU, on every process.
    """
    if accelerator is None:
        accelerator = _SingleProcess()
    n = len(pairs)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank = math.ceil(n / world) if n else 0
    # Pad the last shard with its own last pair so every process runs the same number of batches.
    mine = [min(i, n - 1) for i in range(rank * per_rank, (rank + 1) * per_rank)] if n else []
    chosen, rejected = [], []
    bar = None
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=per_rank * world, desc=progress, unit="pair", dynamic_ncols=True, leave=False)
    for start in range(0, per_rank, batch_size):
        chunk = [pairs[i] for i in mine[start : start + batch_size]]
        batch = collate(chunk, pad_token_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        out = forward(batch)
        chosen.append(out["chosen_logps"].float())
        rejected.append(out["rejected_logps"].float())
        if bar is not None:
            bar.update(len(chunk) * world)
    if bar is not None:
        bar.close()
    local = torch.stack([torch.cat(chosen), torch.cat(rejected)]) if chosen else torch.zeros(2, 0)
    local = local.to(accelerator.device)
    gathered = accelerator.gather(local[None]) if world > 1 else local[None]  # (world, 2, per_rank)
    flat = gathered.permute(1, 0, 2).reshape(2, -1)[:, :n].cpu()  # rank-major order == pair order
    return {"chosen_logps": flat[0], "rejected_logps": flat[1]}


class _SingleProcess:
    num_processes, process_index, is_main_process = 1, 0, True
    device = torch.device("cpu")


def session_logps(session: Session, pairs: list[TokenizedPair], progress: str | None = None) -> dict:
    """The policy's chosen/rejected log-probs of `pairs` (no autograd, eval mode), in the session's batching."""
    policy, accelerator = session.policy, session.accelerator

    def forward(batch):
        with sharding.autocast(accelerator, policy.module):
            return player_logps(policy, batch, session.players, grad=False)

    return dataset_logps(
        forward,
        pairs,
        session.cfg.eval_batch_size,
        session.tokenizer.pad_token_id,
        accelerator,
        progress,
        session.collate or collate_pairs,
    )


def policy_metrics(
    session: Session, test_pairs, ref_logps: dict, label: str | None = None, keep_in: Path | None = None
) -> dict:
    """Margin reward and pairwise accuracy of the policy vs the reference log-probs `ref_logps` of `test_pairs`.
    `keep_in`: the policy's log-probs are read from there when an earlier run kept them for these weights and pairs
    (a finished run resumed only to export and score), else computed and kept there for `iopo eval` (keep_logps)."""
    key = _kept_key(session, test_pairs) if keep_in is not None else None
    # with several processes every one computes (they share the batches), so nothing is read
    alone = session.accelerator.num_processes == 1
    policy, _ = refcache.read_logps([keep_in], key, len(test_pairs)) if key and alone else (None, None)
    if policy is None:
        policy = session_logps(session, test_pairs, label)
        if key is not None:
            refcache.write_logps(keep_in, key, policy)
    return offline_metrics(
        policy["chosen_logps"],
        policy["rejected_logps"],
        ref_logps["chosen_logps"],
        ref_logps["rejected_logps"],
        session.cfg.loss.beta,
    )


def keep_logps(session: Session, run_dir: Path, pairs, logps: dict) -> None:
    """Keep the policy's log-probs of `pairs` in run_dir/logps/ (see _kept_key)."""
    key = _kept_key(session, pairs)
    if key is not None:
        refcache.write_logps(run_dir, key, logps)


def _kept_key(session: Session, pairs) -> str | None:
    """The key under which the policy's log-probs of `pairs` are kept, as `iopo eval` keys a model it loads
    (refcache.logps_key: the weights' fingerprint, float32, the pairs), so that evaluating the exported model on the
    same split reads them instead of computing them again. Only where the key can match: float32 training, full
    weights, not sharded, on the main process (else None: nothing is kept or read, the log-probs are computed)."""
    cfg, policy = session.cfg, session.policy
    if (
        cfg.mixed_precision != "no"
        or policy.adapter is not None
        or sharding.is_fsdp(policy.module)
        or not session.accelerator.is_main_process
    ):
        return None
    return refcache.logps_key(model_fingerprint(language_model(policy.module)), "float32", pairs)


def model_logps(
    model, tokenizer, pairs: list[TokenizedPair], batch_size: int, low_precision: bool, progress=None
):
    """A plain model's chosen/rejected log-probs of `pairs` (evaluation: no training, one process), batched as
    `inference_collate` chooses."""
    module = SequenceLogProbs(model).eval()
    collate = inference_collate(module, pairs, batch_size, tokenizer.pad_token_id, low_precision)
    with torch.inference_mode():
        return dataset_logps(
            lambda batch: sequence_logps(module, batch),
            pairs,
            batch_size,
            tokenizer.pad_token_id,
            progress=progress,
            collate=collate,
        )


def starting_logps(
    session: Session, test_pairs: list[TokenizedPair], path: Path, progress: str | None = None
) -> dict:
    """The starting model's log-probs of the test split (the reference of the implicit reward), computed once
    before the first step and kept in `path` for a resumed run (or shared through eval_reference_cache).

    The file is a cache: missing, truncated, foreign or of another split, it is computed again and said so (after
    the first step, from the starting weights: the frozen reference, the base without adapters, or the starting
    model loaded again)."""
    found = refcache.load_logps(path, len(test_pairs))
    if found is not None:
        return found
    if session.step == 0:
        mark_phase("reference log-probs")
        logps = refcache.reference_logps(
            session, test_pairs, lambda: session_logps(session, test_pairs, progress)
        )
    else:
        why = "damaged or of another test split" if path.is_file() else "missing"
        log.info(f"{path} is {why}: computing the starting model's test log-probs again")
        mark_phase("reference log-probs")
        logps = _from_the_start(session, test_pairs, progress)
    if session.accelerator.is_main_process:
        refcache.save_logps(path, logps, tmp=path.with_name(f".{path.name}.tmp"))
    return logps


def _from_the_start(session: Session, test_pairs: list[TokenizedPair], progress: str | None) -> dict:
    """The starting weights' log-probs once training has moved the players: the frozen reference when there is one
    (it is the starting model), the shared base with every adapter disabled (LoRA), else the starting model loaded
    again (full fine-tuning of a game or of SFT), in the session's batching and precision."""
    cfg, accelerator = session.cfg, session.accelerator
    start = session.reference
    if start is None and session.policy.adapter is not None:
        start = Player("start", session.policy.module, adapter=BASE)
    if start is not None:

        def forward(batch):
            with sharding.autocast(accelerator, start.module):
                return player_logps(start, batch, session.players, grad=False)

    else:
        model = load_model(cfg.model).eval().requires_grad_(False)
        module = SequenceLogProbs(model, cfg.logps_chunk_tokens).to(accelerator.device).eval()

        def forward(batch):
            with accelerator.autocast():
                return sequence_logps(module, batch)

    pad = session.tokenizer.pad_token_id
    collate = session.collate or collate_pairs
    return dataset_logps(forward, test_pairs, cfg.eval_batch_size, pad, accelerator, progress, collate)
