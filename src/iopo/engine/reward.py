"""The reward model's training (`iopo train-rm`): Bradley-Terry (Eq. 2) on preference pairs, a scalar head on a
pretrained backbone (AutoModelForSequenceClassification, num_labels=1, reading the last non-padding token), and
its held-out pairwise accuracy."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from iopo.config import ConfigError, TrainRMConfig
from iopo.core.logprobs import reward_sharing_obstacle, sequence_rewards, shared_tolerance
from iopo.core.losses import bradley_terry_loss
from iopo.core.stats import wilson_interval
from iopo.data.collate import collate_pairs, layouts_gap
from iopo.data.tokenize import TokenizedPair
from iopo.engine.batching import shared_collate
from iopo.engine.session import make_optimizer, make_scheduler, micro_batch_indices, optimizer_steps
from iopo.io.log import get_logger
from iopo.io.models import freeze_lower_layers, load_model, resolve_model_path
from iopo.io.runlog import mark_phase, open_trackers, progress_bar, write_record

log = get_logger(__name__)


class PairRewards(torch.nn.Module):
    """A sequence-classification reward model whose forward gives the rewards (2B,) of a pair batch, chosen
    sequences first (plain or prefix-shared: core.logprobs.sequence_rewards). Wrapping the model keeps DDP's hooks
    on the path of every forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        return sequence_rewards(self.model, batch)


def choose_reward_batching(cfg, module: PairRewards, sample: list[TokenizedPair], pad_token_id: int, device):
    """The collate of the reward model's batches, as cfg.batching says; under auto the shared layout only when the
    model allows it and this sample's rewards agree with the plain forward's."""
    pack = shared_collate(cfg)  # as training's: packed rows of up to 2 x data.max_length tokens
    obstacle = reward_sharing_obstacle(module.model)
    if cfg.batching == "plain":
        return collate_pairs
    if cfg.batching == "shared":
        if obstacle:
            raise ConfigError(
                f"batching=shared: the model cannot share prompts: {obstacle}; use batching=plain"
            )
        return pack
    gap = math.inf
    if obstacle is None:
        was_training = module.training
        module.eval()

        def forward(batch: dict) -> torch.Tensor:
            return module({k: v.to(device) for k, v in batch.items()})

        try:
            gap, obstacle = layouts_gap(forward, sample, pad_token_id, 2 * cfg.data.max_length)
        finally:
            module.train(was_training)
    if gap <= shared_tolerance(cfg.mixed_precision != "no"):
        log.info(f"batching: prefix sharing + packing (first batch agrees with the plain forward: {gap:.1e})")
        return pack
    log.info(
        f"batching: plain, because {obstacle or f'the first batch differs from the plain forward by {gap:.1e}'}"
    )
    return collate_pairs


def pair_rewards(module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen sequences (B,) and the rejected ones (B,) of a collated pair batch."""
    rewards = module(batch)  # (2B,)
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:]


@torch.no_grad()
def heldout_accuracy(
    module,
    pairs: list[TokenizedPair],
    batch_size: int,
    pad_token_id: int,
    device,
    collate=collate_pairs,
    progress: bool = False,
) -> dict:
    """Pairwise accuracy (r_w > r_l) and mean reward margin on held-out pairs, with the per-pair margins
    (`progress`: a bar over the pairs)."""
    was_training = module.training
    module.eval()
    margins: list[float] = []
    bar = progress_bar(progress, len(pairs), 0, "held-out pairs", unit="pair")
    for start in range(0, len(pairs), batch_size):
        batch = collate(pairs[start : start + batch_size], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        chosen, rejected = pair_rewards(module, batch)
        margins += (chosen.float() - rejected.float()).tolist()
        if bar is not None:
            bar.update(len(chosen))
    if bar is not None:
        bar.close()
    module.train(was_training)
    n = len(margins)
    return {
        "n_pairs": n,
        "pairwise_accuracy": sum(m > 0 for m in margins) / n if n else None,
        "mean_margin": sum(margins) / n if n else None,
        "margins": [round(m, 6) for m in margins],
    }


def load_backbone(cfg: TrainRMConfig, tokenizer):
    model = load_model(cfg.model, reward_head=True)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-padding token
    if cfg.trainable_layers:
        freeze_lower_layers(model, cfg.trainable_layers)
    if cfg.model.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.model.lora_r,
            lora_alpha=cfg.model.lora_alpha,
            lora_dropout=cfg.model.lora_dropout,
            target_modules=cfg.model.lora_target_modules,
            task_type="SEQ_CLS",  # also trains the new score head in full
        )
        model = get_peft_model(model, lora)
    return model


def train_reward_model(
    cfg, accelerator, tokenizer, train_pairs, test_pairs, run_dir: Path
) -> tuple[object, dict]:
    """Bradley-Terry training of a scalar head on a pretrained backbone (Eq. 2): the trained PairRewards module
    (prepared by accelerate; its `.model` is the sequence-classification model) and its results (steps, pairs seen,
    held-out accuracy and margins), logged into run_dir."""
    module = PairRewards(load_backbone(cfg, tokenizer))
    params = [p for p in module.parameters() if p.requires_grad]
    micro = cfg.optim.batch_size
    global_batch = micro * accelerator.num_processes
    accum = cfg.optim.gradient_accumulation_steps
    total = optimizer_steps(cfg.optim, len(train_pairs), global_batch)
    optimizer = make_optimizer(params, cfg, fused=True)
    scheduler = make_scheduler(optimizer, cfg, total)
    sample = [
        train_pairs[i] for i in micro_batch_indices(0, global_batch, len(train_pairs), cfg.seed)[:micro]
    ]
    collate = choose_reward_batching(cfg, module, sample, tokenizer.pad_token_id, accelerator.device)
    model, optimizer = accelerator.prepare(module, optimizer)
    log.info(
        f"reward model: {resolve_model_path(cfg.model)} + scalar head, steps={total}, "
        f"global_batch={global_batch}x{accum}, trainable={sum(p.numel() for p in params):,}"
    )
    is_main = accelerator.is_main_process
    writer = open_trackers(cfg, run_dir, is_main)
    bar = progress_bar(cfg.progress_bar, total, 0, "train-rm", is_main=is_main)
    pad = tokenizer.pad_token_id

    def evaluate_now() -> dict:
        mark_phase("held-out accuracy")
        return heldout_accuracy(
            accelerator.unwrap_model(model),
            test_pairs,
            cfg.eval_batch_size,
            pad,
            accelerator.device,
            collate,
            progress=cfg.progress_bar and is_main,
        )

    def log_record(record: dict) -> None:
        write_record(record, run_dir / "metrics.jsonl", writer, is_main)

    model.train()
    position = 0
    mark_phase("train-rm steps")
    for step in range(1, total + 1):
        tick = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for k in range(accum):
            indices = micro_batch_indices(position + k, global_batch, len(train_pairs), cfg.seed)
            mine = indices[accelerator.process_index * micro : (accelerator.process_index + 1) * micro]
            batch = collate([train_pairs[i] for i in mine], pad)
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            with accelerator.autocast():
                chosen, rejected = pair_rewards(model, batch)
            pair_losses, metrics = bradley_terry_loss(chosen, rejected)
            loss = pair_losses.mean()
            if not torch.isfinite(loss):
                raise ConfigError(f"reward model: non-finite loss at step {step}; lower optim.learning_rate")
            accelerator.backward(loss / accum)
            for key, value in {"loss": loss.item(), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + value / accum
        position += accum
        if cfg.optim.max_grad_norm:
            sums["grad_norm"] = float(accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm))
        sums["learning_rate"] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        sums["step_seconds"] = time.perf_counter() - tick
        if step % cfg.logging_steps == 0 or step == total:
            log_record({"step": step, **sums})
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step < total and test_pairs:
            held = evaluate_now()
            mark_phase("train-rm steps")
            log_record(
                {
                    "step": step,
                    "eval/pairwise_accuracy": held["pairwise_accuracy"],
                    "eval/margin": held["mean_margin"],
                }
            )
        if bar is not None:
            bar.set_postfix(loss=f"{sums['loss']:.4f}", acc=f"{sums['accuracy']:.2f}")
            bar.update(1)
    if bar is not None:
        bar.close()

    results = {
        "kind": "reward_model",
        "n_train_pairs": len(train_pairs),  # available in the training split
        "pairs_seen": total
        * global_batch
        * accum,  # used by the optimizer steps (repeats when over one epoch)
        "steps": total,
    }
    if test_pairs:
        held = evaluate_now()
        log_record(
            {
                "step": total,
                "eval/pairwise_accuracy": held["pairwise_accuracy"],
                "eval/margin": held["mean_margin"],
            }
        )
        results |= held
        interval = wilson_interval(held["pairwise_accuracy"], held["n_pairs"])
        results["pairwise_accuracy_ci"] = list(interval) if interval else None  # 95% Wilson
    if writer is not None:
        writer.close()
    return model, results
