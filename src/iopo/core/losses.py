"""Preference losses on a pair batch: DPO, IPO, RSO hinge, KTO-pair, SFT and IOPO (Wang et al., IJCAI 2025).

Every loss has the same positional signature, so a row of `iopo.core.methods.METHODS` names one:

    loss_fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
            chosen_lengths, rejected_lengths, *, <options>) -> (losses, metrics)

All six inputs are (B,) tensors. The logps are `logp_pi(y|x)`: log-probs summed over the completion's tokens only
(see `iopo.core.logprobs.sequence_logps`); the lengths are those completions' token counts (int or float). For
IOPO the "policy" is the AGENT (the player being trained) and the "reference" is the ENV (the frozen other player).
`losses` holds one value per pair, (B,): the training step reduces them (a mean over pairs, or for SFT over the
chosen tokens of the whole step; weights possible). `metrics` maps TRL-style names to 0-d detached float32 tensors
(batch means). Everything is computed in float32, whatever the model's dtype, because bf16 log-prob differences
and exp() are too coarse.

Pure tensor math: no model, no config, no I/O. Variants are picked by name from dicts (IS_CLIPS, IS_LOGPS,
IPO_AVERAGES); a bad name raises ValueError naming the choices. Equation numbers are the IOPO paper's unless
another paper is named; docs/algorithm.md maps each equation to its function.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Metrics = dict[str, Tensor]


def _pick(table: dict[str, Callable], name: str, what: str) -> Callable:
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(table)}")
    return table[name]


def _f32(*tensors: Tensor) -> tuple[Tensor, ...]:
    # Models may run bf16; differences of summed log-probs and exp() need float32.
    return tuple(t.float() for t in tensors)


def _stat(x: Tensor) -> Tensor:
    """0-d detached float32 mean, the form every metric takes."""
    return x.detach().float().mean()


# ---------------------------------------------------------------------------------------------------------------
# Implicit rewards and pair metrics (Sec. 3, Sec. 6.2)
# ---------------------------------------------------------------------------------------------------------------


def implicit_rewards(policy_logps: Tensor, reference_logps: Tensor, beta: float) -> Tensor:
    """Sec. 3 (r-hat after Eq. 8): r(x, y) = beta * (logp_policy(y|x) - logp_ref(y|x)), per sequence (B,)."""
    return beta * (policy_logps.float() - reference_logps.float())


def reward_metrics(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> Metrics:
    """Sec. 6.2: mean implicit rewards, margin reward and pairwise accuracy (TRL's rewards/* names)."""
    chosen = implicit_rewards(policy_chosen_logps, reference_chosen_logps, beta).detach()  # (B,)
    rejected = implicit_rewards(policy_rejected_logps, reference_rejected_logps, beta).detach()  # (B,)
    return {
        "rewards/chosen": _stat(chosen),
        "rewards/rejected": _stat(rejected),
        "rewards/margins": _stat(chosen - rejected),
        "rewards/accuracies": _stat(chosen > rejected),
    }


def _pair_metrics(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float) -> Metrics:
    return {**reward_metrics(pc, pr, rc, rr, beta), "logps/chosen": _stat(pc), "logps/rejected": _stat(pr)}


def dpo_logits(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
) -> Tensor:
    """DPO Eq. 7 (inner term / beta): (logp_pi(y_w) - logp_ref(y_w)) - (logp_pi(y_l) - logp_ref(y_l)), shape (B,)."""
    return (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)


# ---------------------------------------------------------------------------------------------------------------
# Baselines (Sec. 6.2), all against a frozen reference
# ---------------------------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """DPO Eq. 7: -log sigma(h), h = beta * dpo_logits; label_smoothing > 0 gives conservative DPO.

    Conservative DPO assumes labels are flipped with probability `label_smoothing`:
    -(1 - ls) * log sigma(h) - ls * log sigma(-h). Off (0) by default, as in the paper.
    """
    pc, pr, rc, rr = _f32(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    h = beta * dpo_logits(pc, pr, rc, rr)  # (B,)
    # logsigmoid is the stable form of log(1 / (1 + e^-h)).
    losses = -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)  # (B,)
    return losses, _pair_metrics(pc, pr, rc, rr, beta)


def _sum_logps(logps: Tensor, lengths: Tensor) -> Tensor:
    return logps


def _mean_logps(logps: Tensor, lengths: Tensor) -> Tensor:
    # clamp: an empty completion has logp 0; keep it 0 instead of 0/0.
    return logps / lengths.float().clamp(min=1.0)


# How a sequence's log-prob is averaged: summed over tokens (the papers) or per-token mean (TRL's IPO).
IPO_AVERAGES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"sum": _sum_logps, "mean": _mean_logps}


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    average: str = "sum",
) -> tuple[Tensor, Metrics]:
    """IPO paper (Azar et al. 2023, Eq. 17): (dpo_logits - 1/(2*beta))^2, beta playing the role of tau.

    Default `average="sum"`: summed completion log-probs, as in the IPO paper. `average="mean"`: every log-prob is
    divided by its completion length first (what TRL does). The rewards/* metrics always use summed log-probs, so
    they share one scale with the other methods.
    """
    pc, pr, rc, rr = _f32(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    avg = _pick(IPO_AVERAGES, average, "IPO average")
    logits = dpo_logits(
        avg(pc, chosen_lengths), avg(pr, rejected_lengths), avg(rc, chosen_lengths), avg(rr, rejected_lengths)
    )
    # Regress the log-ratio margin to a fixed target instead of pushing it to infinity (IPO's fix to DPO overfitting).
    losses = (logits - 1.0 / (2.0 * beta)) ** 2  # (B,)
    return losses, _pair_metrics(pc, pr, rc, rr, beta)


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Metrics]:
    """RSO (Liu et al. 2023) / SLiC hinge: max(0, 1 - h), h = beta * dpo_logits; zero gradient once h >= 1."""
    pc, pr, rc, rr = _f32(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = torch.relu(1.0 - beta * dpo_logits(pc, pr, rc, rr))  # (B,)
    return losses, _pair_metrics(pc, pr, rc, rr, beta)


def kto_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Metrics]:
    """KTO-pair: HALOs report eq. 7 as TRL implemented it before 0.9.6 (ALGORITHM.md, Baselines).

    KL_w = clamp(mean_B(logp_pi(y_w) - logp_ref(y_w)), min=0), KL_l likewise (not detached, as TRL);
    per pair ([1 - sigma(beta(Δc - KL_l))] + [1 - sigma(beta(KL_w - Δr))]) / 2, whose mean over the batch is TRL's
    mean over the 2B entries. The KL estimates are batch means, so a pair's value depends on its batch.
    """
    pc, pr, rc, rr = _f32(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    chosen_logratios = pc - rc  # (B,)
    rejected_logratios = pr - rr  # (B,)
    # The batch mean is KTO's estimate of KL(pi || ref); a KL cannot be negative, hence the clamp.
    chosen_kl = chosen_logratios.mean().clamp(min=0)  # ()
    rejected_kl = rejected_logratios.mean().clamp(min=0)  # ()
    # Each half is compared with the KL of the OTHER half, as in the KTO report.
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - rejected_kl))  # (B,)
    rejected_losses = 1 - torch.sigmoid(beta * (chosen_kl - rejected_logratios))  # (B,)
    return (chosen_losses + rejected_losses) / 2, _pair_metrics(pc, pr, rc, rr, beta)


def sft_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
) -> tuple[Tensor, Metrics]:
    """SFT (Sec. 6.2 baseline): per pair, the NLL of y_w summed over its tokens, -logp(y_w).

    Its method row reduces them over the chosen tokens, -sum logp(y_w) / sum |y_w| over the whole step (all
    micro-batches and processes): the token-level mean, as TRL. No reference, so no rewards/* metrics; rejected
    completions are ignored. `nll` is this batch's token mean.
    """
    pc = policy_chosen_logps.float()
    losses = -pc  # (B,)
    nll = losses.sum() / chosen_lengths.float().sum().clamp(min=1.0)
    return losses, {"logps/chosen": _stat(pc), "nll": _stat(nll)}


# ---------------------------------------------------------------------------------------------------------------
# The game-theoretic relatives (docs/algorithm.md, "Relatives"): SPPO, INPO, SPIN, XPO
# ---------------------------------------------------------------------------------------------------------------


def sppo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    chosen_win: Tensor | None = None,
    rejected_win: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """SPPO (Wu et al. 2024, Eq. 4.6 with eta = 1/beta), per pair, the sum of each answer's square:
    (h_w - (P_w - 1/2)/beta)^2 + (h_l - (P_l - 1/2)/beta)^2, h = logp_pi(y) - logp_t(y) (the reference is the
    policy the round began with; offline, the starting model).

    P_w, P_l: each answer's estimated win probability against that policy (B,), from an online round's judge.
    Without them (human pairs) P_w = 1 and P_l = 0: the hard form (h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2,
    TRL's `sppo_hard`.
    """
    pc, pr, rc, rr = _f32(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    win_w = torch.ones_like(pc) if chosen_win is None else chosen_win.float()  # (B,)
    win_l = torch.zeros_like(pr) if rejected_win is None else rejected_win.float()  # (B,)
    losses = ((pc - rc) - (win_w - 0.5) / beta) ** 2 + ((pr - rr) - (win_l - 0.5) / beta) ** 2  # (B,)
    metrics = _pair_metrics(pc, pr, rc, rr, beta)
    if chosen_win is not None:
        metrics["sppo/win_chosen"], metrics["sppo/win_rejected"] = _stat(win_w), _stat(win_l)
    return losses, metrics


def inpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    eta: float,
    beta: float,
) -> tuple[Tensor, Metrics]:
    """INPO (Zhang et al., ICLR 2025, Eq. 9): per pair (h - 1/(2 eta))^2, h = Delta_pi - (tau/eta) Delta_ref -
    ((eta - tau)/eta) Delta_t, Delta = logp(y_w) - logp(y_l).

    The reference log-probs it is given are already that blend, (tau/eta) logp_ref + ((eta - tau)/eta) logp_t (the
    session's env, iopo.engine.players.Blend): h is then dpo_logits of the policy against them. Offline (one
    round, pi_t = pi_ref) the blend is the starting model and INPO is IPO with beta = eta. `beta` only scales the
    rewards/* metrics, as for every method.
    """
    pc, pr, rc, rr = _f32(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = (dpo_logits(pc, pr, rc, rr) - 1.0 / (2.0 * eta)) ** 2  # (B,)
    return losses, _pair_metrics(pc, pr, rc, rr, beta)


def spin_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    form: str = "logistic",
) -> tuple[Tensor, Metrics]:
    """SPIN (Chen et al. 2024, Eq. 4.7) on (data answer y_w, the policy's own answer y_l), h = beta * dpo_logits
    against the previous round's policy (the opponent): "logistic" -log sigma(h) (the paper's, DPO's form),
    "hinge" max(0, 1 - h) (its code's other loss_type), or "ipo" (dpo_logits - 1/(2 beta))^2 on summed log-probs
    (not in SPIN's code: IPO's regression in SPIN's setting)."""
    if form not in SPIN_FORMS:
        raise ValueError(f"unknown SPIN loss {form!r}; choose one of {sorted(SPIN_FORMS)}")
    loss = SPIN_FORMS[form]
    return loss(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        beta=beta,
    )


SPIN_FORMS: dict[str, Callable[..., tuple[Tensor, Metrics]]] = {
    "logistic": dpo_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
}


def xpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    alpha: float,
    reference_side: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """XPO (Xie et al. 2024, Alg. 1; OAT's XPOLearner): DPO's -log sigma(beta * dpo_logits) plus alpha * logp_pi
    of the pair's answer sampled from the reference model (the optimism term: minimising it lowers the policy's
    probability of what the reference would say, pushing it to explore).

    reference_side (B,): 1 where the reference's answer is the chosen one, 0 where it is the rejected one, 0.5
    where neither is (no term; also the whole term when reference_side is None: offline pairs, plain DPO).
    """
    losses, metrics = dpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        beta=beta,
    )
    if reference_side is None:
        return losses, metrics
    side = reference_side.float()  # (B,)
    has = (side != 0.5).float()  # pairs that hold a reference answer
    ref_answer_logps = side * policy_chosen_logps.float() + (1.0 - side) * policy_rejected_logps.float()
    bonus = has * ref_answer_logps  # (B,)
    metrics["xpo/reference_logps"] = _stat(bonus.sum() / has.sum().clamp(min=1.0))
    return losses + alpha * bonus, metrics


# ---------------------------------------------------------------------------------------------------------------
# IOPO (Sec. 4): clipped importance-sampling weight times the DPO term, agent against env
# ---------------------------------------------------------------------------------------------------------------


def logp_margin(
    chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor
) -> Tensor:
    """Eq. 11 (log of the right form): Delta = logp(y_w|x) - logp(y_l|x) on summed log-probs, shape (B,)."""
    return chosen_logps.float() - rejected_logps.float()


def mean_logp_margin(
    chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor
) -> Tensor:
    """Eq. 11 variant (is_logp="mean"): Delta on per-token mean log-probs, logp_w/|y_w| - logp_l/|y_l|, shape (B,)."""
    return _mean_logps(chosen_logps.float(), chosen_lengths) - _mean_logps(
        rejected_logps.float(), rejected_lengths
    )


# Which log-probs the IS ratio is built from. "mean" keeps long completions from always overflowing exp().
IS_LOGPS: dict[str, Callable[..., Tensor]] = {"sum": logp_margin, "mean": mean_logp_margin}


def iopo_logits(agent_margin: Tensor, env_margin: Tensor) -> Tensor:
    """Eq. 14/15 (h / beta, as corrected in ALGORITHM.md): Delta_agent - Delta_env, shape (B,).

    Equals dpo_logits with the env as reference: (logp_A(y_w) - logp_E(y_w)) - (logp_A(y_l) - logp_E(y_l)).
    """
    return agent_margin - env_margin


def is_ratio(env_margin: Tensor) -> Tensor:
    """Eq. 11 (second case): rho = pi_env(y_w|x) / pi_env(y_l|x) = exp(Delta_env), detached, float32, shape (B,).

    Built from the env alone, so it is a constant for the agent's gradient (Eq. 15, Theorem 2).
    """
    return torch.exp(env_margin.detach().float())


def guard_is_ratio(rho: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 11 (first case): rho = 1 where exp() under/overflowed (0 or inf) or is NaN; returns (rho, guarded mask)."""
    guarded = (rho == 0) | ~torch.isfinite(rho)  # (B,) bool
    return torch.where(guarded, torch.ones_like(rho), rho), guarded


def pessimistic_clip(rho: Tensor, epsilon: float) -> Tensor:
    """Eq. 12: w = min(rho, clip(rho, 1 - eps, 1 + eps)), the PPO-style clip: caps at 1 + eps, no floor."""
    return torch.minimum(rho, rho.clamp(1.0 - epsilon, 1.0 + epsilon))


def symmetric_clip(rho: Tensor, epsilon: float) -> Tensor:
    """Eq. 12 variant (is_clip="symmetric"): w = clip(rho, 1 - eps, 1 + eps), bounded on both sides."""
    return rho.clamp(1.0 - epsilon, 1.0 + epsilon)


IS_CLIPS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "paper": pessimistic_clip,
    "symmetric": symmetric_clip,
}


def clip_is_weight(rho: Tensor, epsilon: float, mode: str = "paper") -> Tensor:
    """Eq. 12: the clipped IS weight, variant picked by name from IS_CLIPS ("paper" default, or "symmetric")."""
    return _pick(IS_CLIPS, mode, "is_clip")(rho, epsilon)


def iopo_loss(
    agent_chosen_logps: Tensor,
    agent_rejected_logps: Tensor,
    env_chosen_logps: Tensor,
    env_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    epsilon: float = 0.3,
    is_clip: str = "paper",
    is_logp: str = "sum",
    reverse_preference: bool = False,
) -> tuple[Tensor, Metrics]:
    """Eq. 14/15 (with Eq. 11, 12): per pair -w * log sigma(beta * (Delta_agent - Delta_env)); L is their mean.

    The same function serves both phases of Alg. 1: the trained player is the agent, the frozen one the env. Env
    log-probs are detached here too, so no gradient reaches the env even if the caller forgot no_grad.
    `reverse_preference=True` is the adversary="reversed" ablation: both players use Delta' = -Delta (y_l preferred),
    which flips the sign of h and turns rho into 1/rho. Metrics keep the data's orientation (y_w is "chosen").
    """
    margin_fn = _pick(IS_LOGPS, is_logp, "is_logp")
    ac, ar = agent_chosen_logps.float(), agent_rejected_logps.float()
    ec, er = env_chosen_logps.detach().float(), env_rejected_logps.detach().float()
    sign = -1.0 if reverse_preference else 1.0

    agent_margin = logp_margin(ac, ar, chosen_lengths, rejected_lengths)  # (B,)
    env_margin = logp_margin(ec, er, chosen_lengths, rejected_lengths)  # (B,)
    h = beta * iopo_logits(sign * agent_margin, sign * env_margin)  # (B,)
    # rho may use other log-probs than h (is_logp); the reversed adversary gets 1/rho.
    ratio_margin = sign * margin_fn(ec, er, chosen_lengths, rejected_lengths)  # (B,)
    rho, guarded = guard_is_ratio(is_ratio(ratio_margin))  # (B,)
    weight = clip_is_weight(rho, epsilon, is_clip)  # (B,), constant for autograd
    losses = -(weight * F.logsigmoid(h))  # (B,)

    metrics = _pair_metrics(ac, ar, ec, er, beta)
    metrics.update(
        {
            "is/weight_mean": _stat(weight),
            "is/weight_min": weight.detach().float().min(),
            "is/weight_max": weight.detach().float().max(),
            "is/capped_frac": _stat(rho > 1.0 + epsilon),
            "is/low_frac": _stat(rho < 1.0 - epsilon),  # weights below 1 - eps before clipping
            # pairs whose weight was raised to 1 - eps: only the symmetric clip floors, the paper's keeps them low
            "is/floored_frac": _stat(rho < 1.0 - epsilon)
            if is_clip == "symmetric"
            else _stat(torch.zeros_like(rho)),
            "is/guarded_frac": _stat(guarded),
        }
    )
    return losses, metrics


# ---------------------------------------------------------------------------------------------------------------
# The reward model (`iopo train-rm`) and the test-split metrics (Sec. 6.2)
# ---------------------------------------------------------------------------------------------------------------


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> tuple[Tensor, dict]:
    """Eq. 2 (Bradley-Terry): per pair -log σ(r(x,y_w) − r(x,y_l)); inputs (B,) rewards. Also accuracy and margin
    (batch means, as floats)."""
    margin = chosen_rewards.float() - rejected_rewards.float()  # (B,)
    metrics = {
        "accuracy": (margin > 0).float().mean().item(),
        "margin": margin.mean().item(),
        "reward_chosen": chosen_rewards.float().mean().item(),
        "reward_rejected": rejected_rewards.float().mean().item(),
    }
    return -F.logsigmoid(margin), metrics


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
