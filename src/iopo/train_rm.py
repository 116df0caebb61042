"""`iopo train-rm`: a Bradley-Terry reward model (paper Eq. 2), the offline judge everyone has without a GPU or an
API key.

P(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l)), trained by minimising −log σ(r_w − r_l) over preference pairs read
through the same data pipeline as `iopo train` (every format, the same prompt-grouped split, the same chat
rendering). The backbone (default: the embedded SmolLM2) gets a scalar head (AutoModelForSequenceClassification,
num_labels=1, reading the last non-padding token); the result is a standard folder that
`AutoModelForSequenceClassification.from_pretrained` loads, and its held-out pairwise accuracy is reported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from iopo.config import ConfigError, TrainRMConfig, dump_config
from iopo.data import TokenizedPair, collate_pairs, load_training_data
from iopo.models import load_model, load_tokenizer, resolve_model_path


def _rm_places() -> dict:
    from iopo import runfolder

    names = ("config.yaml", "metrics.jsonl", "eval.json", "rejects.jsonl", "final", "tensorboard")
    return {name: runfolder.TRAIN_PLACES[name] for name in names}


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """Eq. 2 (Bradley-Terry): −mean log σ(r(x,y_w) − r(x,y_l)); inputs (B,) rewards. Also accuracy and margin."""
    margin = chosen_rewards.float() - rejected_rewards.float()  # (B,)
    loss = -F.logsigmoid(margin).mean()
    metrics = {
        "accuracy": (margin > 0).float().mean().item(),
        "margin": margin.mean().item(),
        "reward_chosen": chosen_rewards.float().mean().item(),
        "reward_rejected": rejected_rewards.float().mean().item(),
    }
    return loss, metrics


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


def _load_backbone(cfg: TrainRMConfig, tokenizer):
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


def _prepare_dir(cfg: TrainRMConfig) -> Path:
    from iopo import runfolder

    run_dir = cfg.run_dir
    inputs = [cfg.model.name_or_path, cfg.data.path, cfg.data.test_path]
    hint = "pass overwrite=true or another output_dir"
    doomed = runfolder.fresh_start(run_dir, _rm_places(), inputs, cfg.overwrite, hint)
    runfolder.clean(run_dir, doomed)
    runfolder.mark(run_dir)
    return run_dir


def train_rm(cfg: TrainRMConfig) -> dict:
    """Train, report held-out accuracy, save final/ (a standard sequence-classification folder) and eval.json."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from iopo import runfolder
    from iopo.trainer import _has_accelerator, _optimizer, _scheduler, micro_batch_indices, optimizer_steps

    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not _has_accelerator())
    set_seed(cfg.seed)
    run_dir = _prepare_dir(cfg) if accelerator.is_main_process else cfg.run_dir
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    started = time.time()
    with accelerator.main_process_first():
        tokenizer = load_tokenizer(cfg.model)
    train_pairs, test_pairs, report = load_training_data(
        cfg.data, tokenizer, run_dir if accelerator.is_main_process else None
    )
    if not train_pairs:
        raise ConfigError("no training pairs left after loading; check data.path and the rejects file")
    log = print if accelerator.is_main_process else (lambda *a, **k: None)
    log(f"[iopo] reward model data: {json.dumps(report)}")

    model = _load_backbone(cfg, tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    micro = cfg.optim.batch_size
    global_batch = micro * accelerator.num_processes
    accum = cfg.optim.gradient_accumulation_steps
    total = optimizer_steps(cfg.optim, len(train_pairs), global_batch)
    optimizer = _optimizer(params, cfg)
    scheduler = _scheduler(optimizer, cfg, total)
    model, optimizer = accelerator.prepare(model, optimizer)
    log(
        f"[iopo] reward model: {resolve_model_path(cfg.model)} + scalar head, steps={total}, "
        f"global_batch={global_batch}x{accum}, trainable={sum(p.numel() for p in params):,}"
    )

    writer = None
    if cfg.tensorboard and accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    bar = None
    if cfg.progress_bar and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="train-rm", unit="step", dynamic_ncols=True)
    pad = tokenizer.pad_token_id

    def evaluate_now() -> dict:
        return heldout_accuracy(
            accelerator.unwrap_model(model), test_pairs, cfg.eval_batch_size, pad, accelerator.device
        )

    def log_record(record: dict) -> None:
        if not accelerator.is_main_process:
            return
        with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    writer.add_scalar(key if "/" in key else f"train/{key}", value, record["step"])

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
            loss, metrics = bradley_terry_loss(chosen, rejected)
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
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = run_dir / "final"
        inner = accelerator.unwrap_model(model)
        if cfg.model.lora:
            inner = inner.merge_and_unload()
        inner.save_pretrained(final, safe_serialization=True)
        tokenizer.save_pretrained(final)
        runfolder.record_export(run_dir, final)
        (run_dir / "eval.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
        accuracy = results.get("pairwise_accuracy")
        shown = (
            f"{accuracy:.4f} on {results['n_pairs']} held-out pairs"
            if accuracy is not None
            else "n/a (no test pairs)"
        )
        log(
            f"[iopo] reward model saved to {final}; held-out pairwise accuracy {shown}; {time.time() - started:.0f}s"
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results
