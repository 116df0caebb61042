"""Implicit-reward metrics (paper Sec. 6.2, Table 2 left): margin reward and pairwise accuracy of the implicit reward
r(x, y) = β·(logp_π(y|x) − logp_ref(y|x)), with π_ref the common starting model so methods share one scale."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from iopo.data import TokenizedPair, collate_pairs


def offline_metrics(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> dict:
    """Sec. 6.2: margin reward = mean of r(x,y_w) − r(x,y_l); pairwise accuracy = share with r(x,y_w) > r(x,y_l).

    All inputs are (N,) summed completion log-probs over the test split. Also returns the per-pair margins (for
    the margin distributions of Fig. 3) and their spread.
    """
    chosen_rewards = beta * (policy_chosen_logps.double() - reference_chosen_logps.double())  # (N,)
    rejected_rewards = beta * (policy_rejected_logps.double() - reference_rejected_logps.double())  # (N,)
    margins = chosen_rewards - rejected_rewards
    n = margins.numel()
    finite = torch.isfinite(margins)
    non_finite = int((~finite).sum())
    # Accuracy is never computed from NaN: with a non-finite margin the metrics are None and the count says why.
    ok = n > 0 and non_finite == 0
    return {
        "n_pairs": n,
        "beta": beta,
        "margin_reward": margins.mean().item() if ok else None,
        "margin_reward_std": margins.std().item() if ok and n > 1 else None,
        "pairwise_accuracy": (margins > 0).double().mean().item() if ok else None,
        "reward_chosen": chosen_rewards.mean().item() if ok else None,
        "reward_rejected": rejected_rewards.mean().item() if ok else None,
        "non_finite_pairs": non_finite,
        "margins": [round(m, 6) if math.isfinite(m) else None for m in margins.tolist()],
    }


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


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_table(results: dict, title: str) -> str:
    rows = [
        ("pairs", f"{results['n_pairs']}"),
        ("beta", f"{results['beta']:g}"),
        ("margin reward", _num(results["margin_reward"])),
        ("pairwise accuracy", _num(results["pairwise_accuracy"])),
        ("reward chosen", _num(results["reward_chosen"])),
        ("reward rejected", _num(results["reward_rejected"])),
    ]
    if results.get("non_finite_pairs"):
        rows.append(("non-finite pairs", f"{results['non_finite_pairs']}"))
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * max(len(title), width + 12)]
    lines += [f"{k:<{width}}  {v:>10}" for k, v in rows]
    return "\n".join(lines)
