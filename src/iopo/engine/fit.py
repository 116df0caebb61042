"""The optimizer steps: `train_step` (one step of one agent against its env, Alg. 1 steps 5 and 10) and `fit`
(the steps of a schedule over pairs, continuing a session), with the reduction of the per-pair losses, the
gradient clipping and the non-finite guard.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch

from iopo.core.logprobs import chosen_token_count
from iopo.data.tokenize import TokenizedPair
from iopo.engine import sharding
from iopo.engine.batching import choose_batching
from iopo.engine.players import Blend, Player, env_logps, player_logps
from iopo.engine.session import Session, gathered, micro_batch_indices, next_sample
from iopo.io.runlog import mark_phase, write_record


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm; the step's update was not applied. The trainer adds the step number."""

    def __init__(self, quantity: str, value: float, player: str, step: int | None = None, kept: str = ""):
        self.quantity, self.value, self.player, self.step = quantity, value, player, step
        at = f"step {step}" if step is not None else "a step"
        super().__init__(
            f"non-finite {quantity} ({value}) at {at} of the {player}: the update was not applied and nothing was "
            f"exported{kept} (lower optim.learning_rate, check the data, or use float32)"
        )


def train_step(
    agent: Player,
    env: Player | Blend | None,
    players: dict[str, Player],
    micro_batches: list[dict],
    loss_fn,
    accelerator,
    max_grad_norm: float | None,
    reduce: str = "pairs",
    pair_values: tuple[str, ...] = (),
) -> dict[str, float]:
    """One optimizer step of `agent` against `env` (the frozen other player, the reference, the previous policy, a
    blend of them, or None for SFT). The loss also gets the batch's per-pair tensors named in `pair_values` (those
    it carries) as keywords.

    The loss gives one value per pair; the step reduces them as the METHODS row says (`reduce`): "pairs", the mean
    over the step's pairs (weighted when the batches carry a per-pair "weight" tensor), or "chosen_tokens", the
    mean over every chosen token of the step, on every process (SFT's token-level NLL).
    Gradients are accumulated over the micro-batches (synchronised across processes on the last one only), clipped,
    and applied by the agent's own optimizer; no other player's parameters or optimizer state are touched.
    Returns the step's metrics (means over micro-batches; min/max keep their extremes) and the gradient norm.
    """
    agent.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    n_micro = len(micro_batches)
    fsdp = sharding.is_fsdp(agent.module)
    # A mean over the whole step (its tokens or weights) needs its denominator before the first backward.
    total = step_denominator(accelerator, micro_batches, reduce)
    for k, batch in enumerate(micro_batches):
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        if fsdp:  # FSDP2 reduce-scatters the gradients on the last micro-batch only
            sharding.set_gradient_sync(agent.module, k == n_micro - 1)
            sync = nullcontext()
        else:
            sync = nullcontext() if k == n_micro - 1 else accelerator.no_sync(agent.module)
        with sync:
            with sharding.autocast(accelerator, agent.module):
                env_out = env_logps(env, batch, players) if env is not None else {}
                agent_out = player_logps(agent, batch, players, grad=True)
            pair_losses, metrics = loss_fn(
                agent_out["chosen_logps"],
                agent_out["rejected_logps"],
                env_out.get("chosen_logps"),
                env_out.get("rejected_logps"),
                agent_out["chosen_lengths"],
                agent_out["rejected_lengths"],
                **{key: batch[key] for key in pair_values if key in batch},
            )
            loss = reduce_losses(pair_losses, batch, total, accelerator.num_processes)
            accelerator.backward(loss / n_micro if total is None else loss)
        for key, value in {"loss": loss.detach(), **metrics}.items():
            summed = total is not None and key == "loss"  # the step's loss is the sum of its shares
            sums[key] = _combine(key, sums.get(key), float(value), n_micro, 1.0 if summed else None)
    sums["grad_norm"] = _clip(accelerator, agent.params, max_grad_norm, fsdp)
    # Before the update: a non-finite loss or gradient (the norm is the same on every process after the gradient
    # all-reduce) stops the run here, so no NaN reaches the weights, a checkpoint or the export.
    for quantity in ("loss", "grad_norm"):
        if not math.isfinite(sums[quantity]):
            agent.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(quantity, sums[quantity], agent.name)
    sums["learning_rate"] = agent.optimizer.param_groups[0]["lr"]  # the rate this step used
    agent.optimizer.step()
    # Free the gradients now rather than at this player's next step: kept, they would sit beside the other
    # player's during its steps and through the evaluations, checkpoint and export (one more model's worth).
    agent.optimizer.zero_grad(set_to_none=True)
    if agent.scheduler is not None:
        agent.scheduler.step()
    return sums


def step_denominator(accelerator, micro_batches: list[dict], reduce: str) -> float | None:
    """What the step's per-pair losses are divided by, over all its micro-batches and processes: the chosen tokens
    ("chosen_tokens"), the pairs' weights (a "weight" tensor in the batches), or None for the plain mean over pairs
    (each micro-batch's mean, averaged: the same number, as the micro-batches are equal)."""
    if reduce == "chosen_tokens":
        local = float(sum(chosen_token_count(b) for b in micro_batches))
    elif any("weight" in b for b in micro_batches):
        local = float(sum(float(b["weight"].sum()) for b in micro_batches))
    else:
        return None
    if accelerator.num_processes > 1:
        local = float(sum(row[0] for row in gathered(accelerator, [local])))
    return max(local, 1.0)


def reduce_losses(pair_losses: torch.Tensor, batch: dict, total: float | None, world: int) -> torch.Tensor:
    """One micro-batch's part of the step's loss. Without a step-wide denominator: the batch's mean (the step
    averages them). With one: the sum of this batch's (weighted) losses over it, times the processes (the
    gradient all-reduce takes their mean), so that the step's loss is the true mean over every token or weight."""
    if total is None:
        return pair_losses.mean()
    if "weight" in batch:
        pair_losses = pair_losses * batch["weight"].to(pair_losses.dtype)
    return pair_losses.sum() / total * world


def fit(
    session: Session, pairs: list[TokenizedPair], schedule: list[tuple[str, int]], on_step=None, **fields
):
    """Run the optimizer steps of `schedule` (one (agent, round) per step) on `pairs`, continuing the session's step
    count and data position. `on_step(session)` runs after every step (checkpoints, evaluation); `fields` are added
    to every logged record (e.g. the online round)."""
    cfg, accelerator = session.cfg, session.accelerator
    micro = cfg.optim.batch_size
    if session.collate is None and schedule:
        choose_batching(session, next_sample(session, pairs))
    for agent_name, round_index in schedule:
        agent = session.players[agent_name]
        env = session.env_of(agent_name)
        micro_batches = []
        for k in range(cfg.optim.gradient_accumulation_steps):
            indices = micro_batch_indices(session.position + k, session.global_batch, len(pairs), cfg.seed)
            mine = indices[accelerator.process_index * micro : (accelerator.process_index + 1) * micro]
            micro_batches.append(session.collate([pairs[i] for i in mine], session.tokenizer.pad_token_id))
        mark_phase(f"train step {session.step + 1} ({agent_name})")
        tick = time.perf_counter()
        try:
            sums = train_step(
                agent,
                env,
                session.players,
                micro_batches,
                session.loss_fns[agent_name],
                accelerator,
                cfg.optim.max_grad_norm,
                session.method.reduce,
                session.method.pair_values,
            )
        except NonFiniteError as e:
            kept = (
                f"; {session.last_saved} holds the last finite state saved"
                if session.last_saved
                else "; no checkpoint was saved"
            )
            raise NonFiniteError(e.quantity, e.value, e.player, session.step + 1, kept) from None
        sums["step_seconds"] = time.perf_counter() - tick
        session.step += 1
        session.position += len(micro_batches)  # only a finished step moves the data position
        if session.step % cfg.logging_steps == 0 or session.step == session.total_steps:
            record = _reduce(accelerator, sums)
            record.update(
                step=session.step,
                agent=agent_name,
                round=round_index,
                epoch=session.position * session.global_batch / len(pairs),
                **fields,
            )
            log_metrics(session, record)
        if session.bar is not None:
            session.bar.set_postfix(loss=f"{sums['loss']:.4f}", phase=f"{agent_name}@{round_index}")
            session.bar.update(1)
        if on_step is not None:
            on_step(session)


def log_metrics(session: Session, record: dict) -> None:
    """One record into the run's metrics.jsonl and TensorBoard (main process only)."""
    write_record(record, session.metrics_file, session.writer, session.accelerator.is_main_process)


def log_eval(session: Session, at_step: int, metrics: dict, **fields) -> None:
    keys = ("margin_reward", "pairwise_accuracy", "reward_chosen", "reward_rejected", "margin_reward_std")
    record = {"step": at_step, **{f"eval/{k}": metrics[k] for k in keys}, **fields}
    log_metrics(session, record)


# ---------------------------------------------------------------- helpers of the step


def _clip(accelerator, params, max_norm: float | None, fsdp: bool = False) -> float:
    if fsdp:  # the norm over all shards (a replicated DTensor); an infinite limit only measures it
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf))
    if max_norm:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _combine(key: str, acc: float | None, value: float, n_micro: int, share: float | None = None) -> float:
    """Fold one micro-batch's metric into the step's: min/max stay extremes, the rest average (a loss that is a
    mean over the whole step adds up its micro-batches' shares instead)."""
    if key.endswith("_min"):
        return value if acc is None else min(acc, value)
    if key.endswith("_max"):
        return value if acc is None else max(acc, value)
    if share is not None:
        return (acc or 0.0) + value
    return (acc or 0.0) + value / n_micro


def _reduce(accelerator, sums: dict[str, float]) -> dict[str, float]:
    """Combine the step's metrics over processes (mean, or min/max for the extremes)."""
    if accelerator.num_processes == 1:
        return dict(sums)
    keys = sorted(sums)
    table = torch.tensor(gathered(accelerator, [sums[k] for k in keys]), dtype=torch.float64)  # (world, K)
    out = {}
    for i, key in enumerate(keys):
        column = table[:, i]
        out[key] = float(
            column.min() if key.endswith("_min") else column.max() if key.endswith("_max") else column.mean()
        )
    return out
