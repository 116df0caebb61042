"""The reward model's training (`iopo train-rm`): Bradley-Terry (Eq. 2) on preference pairs, a scalar head on a
pretrained backbone (AutoModelForSequenceClassification, num_labels=1, reading the last non-padding token), and
its held-out pairwise accuracy."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from iopo.config import ConfigError, TrainRMConfig
from iopo.core.losses import bradley_terry_loss
from iopo.data.collate import collate_pairs
from iopo.data.tokenize import TokenizedPair
from iopo.engine.session import make_optimizer, make_scheduler, micro_batch_indices, optimizer_steps
from iopo.io.log import get_logger
from iopo.io.models import load_model, resolve_model_path
from iopo.io.runlog import progress_bar, tensorboard_writer, write_record

log = get_logger(__name__)


def pair_rewards(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen rows (0..B-1) and rejected rows (B..2B-1) of a collated pair batch."""
    rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
        :, 0
    ]  # (2B,)
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:]


@torch.no_grad()
def heldout_accuracy(model, pairs: list[TokenizedPair], batch_size: int, pad_token_id: int, device) -> dict:
    """Pairwise accuracy (r_w > r_l) and mean reward margin on held-out pairs, with the per-pair margins."""
    was_training = model.training
    model.eval()
    margins: list[float] = []
    for start in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[start : start + batch_size], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        chosen, rejected = pair_rewards(model, batch)
        margins += (chosen.float() - rejected.float()).tolist()
    model.train(was_training)
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
    """Bradley-Terry training of a scalar head on a pretrained backbone (Eq. 2): the trained model (prepared by
    accelerate) and its results (steps, pairs seen, held-out accuracy and margins), logged into run_dir."""
    model = load_backbone(cfg, tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    micro = cfg.optim.batch_size
    global_batch = micro * accelerator.num_processes
    accum = cfg.optim.gradient_accumulation_steps
    total = optimizer_steps(cfg.optim, len(train_pairs), global_batch)
    optimizer = make_optimizer(params, cfg)
    scheduler = make_scheduler(optimizer, cfg, total)
    model, optimizer = accelerator.prepare(model, optimizer)
    log.info(
        f"reward model: {resolve_model_path(cfg.model)} + scalar head, steps={total}, "
        f"global_batch={global_batch}x{accum}, trainable={sum(p.numel() for p in params):,}"
    )
    is_main = accelerator.is_main_process
    writer = tensorboard_writer(cfg.tensorboard, run_dir, is_main)
    bar = progress_bar(cfg.progress_bar, total, 0, "train-rm", is_main=is_main)
    pad = tokenizer.pad_token_id

    def evaluate_now() -> dict:
        return heldout_accuracy(
            accelerator.unwrap_model(model), test_pairs, cfg.eval_batch_size, pad, accelerator.device
        )

    def log_record(record: dict) -> None:
        write_record(record, run_dir / "metrics.jsonl", writer, is_main)

    model.train()
    position = 0
    for step in range(1, total + 1):
        tick = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for k in range(accum):
            indices = micro_batch_indices(position + k, global_batch, len(train_pairs), cfg.seed)
            mine = indices[accelerator.process_index * micro : (accelerator.process_index + 1) * micro]
            batch = collate_pairs([train_pairs[i] for i in mine], pad)
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
    if writer is not None:
        writer.close()
    return model, results
