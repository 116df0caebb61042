"""Hand-derived checks of every loss in iopo.core.losses (one value per pair) and of the METHODS table's rows.

Each expected number is derived in the test's docstring and recomputed with `math`, never by calling the code under
test. Notation: h = beta * [(pol_w - ref_w) - (pol_l - ref_l)]; -log sigma(h) = ln(1 + e^-h) = softplus(-h).
The losses compute in float32, so comparisons allow 1e-6 (relative for numbers above 1).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from iopo.config import TrainConfig
from iopo.core import losses
from iopo.core.losses import (
    IS_CLIPS,
    IS_LOGPS,
    clip_is_weight,
    dpo_loss,
    guard_is_ratio,
    hinge_loss,
    implicit_rewards,
    iopo_loss,
    ipo_loss,
    is_ratio,
    kto_pair_loss,
    reward_metrics,
    sft_loss,
)
from iopo.core.methods import METHODS

LN2 = math.log(2.0)


def t(*values, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


def neg_logsigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def close(value: torch.Tensor | float, expected: float, tol: float = 1e-6) -> None:
    value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    assert abs(value - expected) <= tol * max(1.0, abs(expected)), (value, expected)


def close_each(values: torch.Tensor, expected: list[float], tol: float = 1e-6) -> None:
    """Every pair's loss, one by one."""
    assert values.shape == (len(expected),), values.shape
    for value, want in zip(values.tolist(), expected, strict=True):
        close(value, want, tol)


def ones(n: int) -> torch.Tensor:
    return torch.ones(n)


# --------------------------------------------------------------------------------------------------- rewards


def test_implicit_rewards_and_reward_metrics():
    """r = beta (pol - ref). Pair 1: r_w = 0.1(-1+2) = 0.1, r_l = 0.1(-3+2) = -0.1.
    Pair 2: r_w = 0.1(-5+3) = -0.2, r_l = 0.1(-2+3) = 0.1.
    chosen mean -0.05, rejected mean 0, margins [0.2, -0.3] -> -0.05, accuracy 1/2."""
    close(implicit_rewards(t(-1.0), t(-2.0), 0.1)[0], 0.1)
    m = reward_metrics(t(-1.0, -5.0), t(-3.0, -2.0), t(-2.0, -3.0), t(-2.0, -3.0), 0.1)
    close(m["rewards/chosen"], -0.05)
    close(m["rewards/rejected"], 0.0)
    close(m["rewards/margins"], -0.05)
    close(m["rewards/accuracies"], 0.5)


# --------------------------------------------------------------------------------------------------- DPO


def test_dpo_single_pair():
    """h = 0.1*((-1-(-2)) - (-3-(-2))) = 0.1*(1+1) = 0.2; -log sigma(0.2) = ln(1+e^-0.2) = 0.598139..."""
    loss, _ = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), ones(1), ones(1), beta=0.1)
    close(loss, math.log(1 + math.exp(-0.2)))
    close(loss, 0.5981388693815918)


def test_dpo_batch_and_metrics():
    """Pair 1 as above: h = 0.2. Pair 2: h = 0.1*((-5+3) - (-2+3)) = 0.1*(-3) = -0.3.
    losses = [ln(1+e^-0.2), ln(1+e^0.3)] = [0.598139, 0.854355], mean 0.726247...
    rewards as in test_implicit_rewards_and_reward_metrics; logps/chosen = (-1-5)/2 = -3, logps/rejected = -2.5."""
    loss, m = dpo_loss(t(-1.0, -5.0), t(-3.0, -2.0), t(-2.0, -3.0), t(-2.0, -3.0), ones(2), ones(2), beta=0.1)
    close_each(loss, [neg_logsigmoid(0.2), neg_logsigmoid(-0.3)])
    close(loss.mean(), (neg_logsigmoid(0.2) + neg_logsigmoid(-0.3)) / 2)
    close(m["rewards/accuracies"], 0.5)
    close(m["rewards/margins"], -0.05)
    close(m["logps/chosen"], -3.0)
    close(m["logps/rejected"], -2.5)


def test_dpo_label_smoothing():
    """ls = 0.1, h = 0.2: 0.9*ln(1+e^-0.2) + 0.1*ln(1+e^0.2). Since ln(1+e^h) - ln(1+e^-h) = h this equals
    ln(1+e^-0.2) + 0.1*0.2 = 0.598139 + 0.02 = 0.618139..."""
    loss, _ = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), ones(1), ones(1), beta=0.1, label_smoothing=0.1)
    close(loss, 0.9 * math.log(1 + math.exp(-0.2)) + 0.1 * math.log(1 + math.exp(0.2)))
    close(loss, 0.5981388693815918 + 0.02)


# --------------------------------------------------------------------------------------------------- IPO


def test_ipo_sum_vs_mean():
    """beta = 0.1 -> target 1/(2 beta) = 5. pol_w = -10, pol_l = -30, ref_w = -12, ref_l = -28, |y_w| = 2, |y_l| = 4.
    sum:  (-10+12) - (-30+28) = 2 + 2 = 4;           (4 - 5)^2 = 1.
    mean: (-5+6) - (-7.5+7) = 1 + 0.5 = 1.5;         (1.5 - 5)^2 = 12.25."""
    args = (t(-10.0), t(-30.0), t(-12.0), t(-28.0), t(2.0), t(4.0))
    loss_sum, m = ipo_loss(*args, beta=0.1)  # default: the IPO paper's sum form
    loss_mean, m_mean = ipo_loss(*args, beta=0.1, average="mean")
    close(loss_sum, (4.0 - 5.0) ** 2)
    close(loss_mean, (1.5 - 5.0) ** 2)
    # Reward metrics stay on summed log-probs: 0.1*(2) and 0.1*(-2).
    close(m_mean["rewards/chosen"], 0.2)
    close(m_mean["rewards/rejected"], -0.2)
    close(m["rewards/margins"], m_mean["rewards/margins"])


def test_ipo_int_lengths():
    """Integer token counts work: same numbers as above with lengths (2, 4) as int64 -> 12.25."""
    loss, _ = ipo_loss(
        t(-10.0), t(-30.0), t(-12.0), t(-28.0), torch.tensor([2]), torch.tensor([4]), beta=0.1, average="mean"
    )
    close(loss, 12.25)


# --------------------------------------------------------------------------------------------------- hinge


def test_hinge_both_sides():
    """Pair 1: h = 0.2 -> max(0, 1 - 0.2) = 0.8, d loss_1/d pol_w = -beta = -0.1.
    Pair 2: logits (0+15) - (0-0) = 15, h = 1.5 -> max(0, -0.5) = 0, gradient 0.
    Per pair [0.8, 0]; batch mean 0.4, whose gradient w.r.t. pol_w = [-0.1/2, 0]."""
    pol_w = t(-1.0, 0.0, grad=True)
    loss, _ = hinge_loss(pol_w, t(-3.0, 0.0), t(-2.0, -15.0), t(-2.0, 0.0), ones(2), ones(2), beta=0.1)
    close_each(loss, [0.8, 0.0])
    loss.mean().backward()
    close(pol_w.grad[0], -0.05)
    assert pol_w.grad[1].item() == 0.0


# --------------------------------------------------------------------------------------------------- KTO-pair


def test_kto_pair_clamp_active():
    """Chosen log-ratios [-1, -3] (mean -2 -> KL_w clamped to 0); rejected [-2, -4] (mean -3 -> KL_l = 0).
    losses = [1-s(0.1(-1-0)), 1-s(0.1(-3-0)), 1-s(0.1(0+2)), 1-s(0.1(0+4))] = [1-s(-0.1), 1-s(-0.3), 1-s(0.2), 1-s(0.4)]
    = [0.524979, 0.574443, 0.450166, 0.401312]; per pair the mean of its chosen and rejected terms,
    [(0.524979 + 0.450166)/2, (0.574443 + 0.401312)/2], whose mean is TRL's mean over the 4: 0.487725..."""
    pol_w = t(-1.0, -3.0, grad=True)
    loss, _ = kto_pair_loss(pol_w, t(-2.0, -4.0), t(0.0, 0.0), t(0.0, 0.0), ones(2), ones(2), beta=0.1)
    s = {x: 1 - sigmoid(x) for x in (-0.1, -0.3, 0.2, 0.4)}
    close_each(loss, [(s[-0.1] + s[0.2]) / 2, (s[-0.3] + s[0.4]) / 2])
    close(loss.mean(), 0.48772501171641724)
    # Clamp active: KL_w carries no gradient, so d/d pol_w_1 = (1/4) * (-0.1) * s'(-0.1) only.
    loss.mean().backward()
    close(pol_w.grad[0], 0.25 * -0.1 * sigmoid(-0.1) * (1 - sigmoid(-0.1)))


def test_kto_pair_clamp_inactive_and_not_detached():
    """Chosen log-ratios [2, 4] -> KL_w = 3; rejected [1, 3] -> KL_l = 2 (both positive, clamp passes them).
    losses = [1-s(0.1(2-2)), 1-s(0.1(4-2)), 1-s(0.1(3-1)), 1-s(0.1(3-3))] = [0.5, 1-s(0.2), 1-s(0.2), 0.5],
    mean = (1 + 2(1-s(0.2)))/4 = 0.475083...
    KL_w is NOT detached (TRL pre-0.9.6): d/d pol_w_1 = (1/4)[-0.1 s'(0) - 0.1*(1/2) s'(0.2) - 0.1*(1/2) s'(0)],
    with s'(z) = s(z)(1 - s(z)): = -0.0124690..."""
    pol_w = t(2.0, 4.0, grad=True)
    loss, _ = kto_pair_loss(pol_w, t(1.0, 3.0), t(0.0, 0.0), t(0.0, 0.0), ones(2), ones(2), beta=0.1)
    close_each(loss, [(0.5 + (1 - sigmoid(0.2))) / 2, ((1 - sigmoid(0.2)) + 0.5) / 2])
    close(loss.mean(), (0.5 + 2 * (1 - sigmoid(0.2)) + 0.5) / 4)
    loss.mean().backward()

    def ds(z):
        return sigmoid(z) * (1 - sigmoid(z))

    close(pol_w.grad[0], 0.25 * (-0.1 * ds(0.0) - 0.05 * ds(0.2) - 0.05 * ds(0.0)))


# --------------------------------------------------------------------------------------------------- SFT


def test_sft_per_pair_nll_and_token_level_mean():
    """logp(y_w) = [-6, -1] over [3, 1] tokens: per pair the summed NLL [6, 1]; the batch's token-level NLL
    (6 + 1)/(3 + 1) = 1.75 (not the mean of per-sequence means (2 + 1)/2 = 1.5). References may be None."""
    loss, m = sft_loss(t(-6.0, -1.0), t(-9.0, -9.0), None, None, t(3.0, 1.0), t(1.0, 1.0))
    close_each(loss, [6.0, 1.0])
    close(m["nll"], 1.75)
    close(m["logps/chosen"], -3.5)
    assert set(m) == {"nll", "logps/chosen"}


# --------------------------------------------------------------------------------------------------- IOPO


def env_pair(*deltas: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Env log-probs with Delta_env = logp(y_w) - logp(y_l) = delta: y_w at delta - 5, y_l at -5."""
    return t(*[d - 5.0 for d in deltas]), t(*[-5.0] * len(deltas))


def test_iopo_step_one_is_w_ln2():
    """Step one: agent == env, so h = 0 and -w log sigma(0) = w ln 2.
    Delta_env = ln 1.2 -> rho = 1.2, inside [0.7, 1.3] -> w = 1.2 -> loss = 1.2 ln 2 = 0.831777..."""
    ec, er = env_pair(math.log(1.2))
    loss, m = iopo_loss(ec.clone(), er.clone(), ec, er, ones(1), ones(1), beta=0.1, epsilon=0.3)
    close(loss, 1.2 * LN2)
    close(m["is/weight_mean"], 1.2)
    close(m["rewards/margins"], 0.0)


def test_iopo_clip_paper_vs_symmetric_and_metrics():
    """agent == env (h = 0), eps = 0.3, Delta_env = [ln 1.2, ln 2, ln 0.5] -> rho = [1.2, 2, 0.5].
    paper w = min(rho, clip(rho, 0.7, 1.3)) = [1.2, min(2, 1.3), min(0.5, 0.7)] = [1.2, 1.3, 0.5] (cap, no floor);
    losses = ln2 * w, mean ln2 * 3.0/3 = ln 2.
    symmetric w = clip(rho, 0.7, 1.3) = [1.2, 1.3, 0.7]; mean ln2 * 3.2/3 = 0.739357...
    capped (rho > 1.3) = 1/3 in both modes; low (rho < 0.7) = 1/3 in both; floored (raised to 0.7) = 1/3 only under
    the symmetric clip (the paper's clip floors nothing: 0); guarded 0."""
    ec, er = env_pair(math.log(1.2), math.log(2.0), math.log(0.5))
    args = (ec.clone(), er.clone(), ec, er, ones(3), ones(3))
    loss_p, m_p = iopo_loss(*args, beta=0.1)
    loss_s, m_s = iopo_loss(*args, beta=0.1, is_clip="symmetric")
    close_each(loss_p, [LN2 * 1.2, LN2 * 1.3, LN2 * 0.5])
    close_each(loss_s, [LN2 * 1.2, LN2 * 1.3, LN2 * 0.7])
    close(loss_p.mean(), LN2 * (1.2 + 1.3 + 0.5) / 3)
    close(loss_s.mean(), LN2 * (1.2 + 1.3 + 0.7) / 3)
    close(m_p["is/weight_min"], 0.5)
    close(m_s["is/weight_min"], 0.7)
    close(m_p["is/weight_max"], 1.3)
    close(m_p["is/weight_mean"], 1.0)
    for m in (m_p, m_s):
        close(m["is/capped_frac"], 1 / 3)
        close(m["is/low_frac"], 1 / 3)
        close(m["is/guarded_frac"], 0.0)
    close(m_p["is/floored_frac"], 0.0)
    close(m_s["is/floored_frac"], 1 / 3)


def test_clip_is_weight_helper():
    """Eq. 12 directly: rho = [0.5, 1.2, 2] -> paper [0.5, 1.2, 1.3], symmetric [0.7, 1.2, 1.3]."""
    rho = t(0.5, 1.2, 2.0)
    assert torch.allclose(clip_is_weight(rho, 0.3), t(0.5, 1.2, 1.3))
    assert torch.allclose(clip_is_weight(rho, 0.3, "symmetric"), t(0.7, 1.2, 1.3))


def test_iopo_guard_overflow_underflow():
    """float32 exp overflows above ~88.7 and underflows to 0 below ~-103.9.
    Delta_env = 200 -> exp = inf -> rho = 1; Delta_env = -200 -> exp = 0 -> rho = 1; Delta_env = ln 2 -> w = 1.3.
    agent == env, so losses = ln2 * [1, 1, 1.3], mean 0.762462...; guarded 2/3; capped 1/3 (a guarded rho is 1,
    not capped)."""
    ec, er = env_pair(200.0, -200.0, math.log(2.0))
    loss, m = iopo_loss(ec.clone(), er.clone(), ec, er, ones(3), ones(3), beta=0.1)
    close_each(loss, [LN2, LN2, LN2 * 1.3])
    close(loss.mean(), LN2 * 3.3 / 3)
    close(m["is/guarded_frac"], 2 / 3)
    close(m["is/capped_frac"], 1 / 3)
    close(m["is/floored_frac"], 0.0)


def test_iopo_guard_float64_input_still_float32():
    """Inputs in float64 are cast to float32 first, so Delta_env = 200 still overflows and is guarded (w = 1, not 1.3)."""
    ec, er = env_pair(200.0)
    ec, er = ec.double(), er.double()
    loss, m = iopo_loss(ec.clone(), er.clone(), ec, er, ones(1), ones(1), beta=0.1)
    assert loss.dtype == torch.float32
    close(loss, LN2)
    close(m["is/guarded_frac"], 1.0)


def test_guard_nan_inf_zero():
    """Eq. 11 first case: rho in {NaN, inf, 0} -> 1; rho = 2 is kept. is_ratio(NaN) = exp(NaN) = NaN -> guarded."""
    rho, guarded = guard_is_ratio(t(float("nan"), float("inf"), 0.0, 2.0))
    assert rho.tolist() == [1.0, 1.0, 1.0, 2.0]
    assert guarded.tolist() == [True, True, True, False]
    rho, guarded = guard_is_ratio(is_ratio(t(float("nan"), float("-inf"), float("inf"))))
    assert rho.tolist() == [1.0, 1.0, 1.0]
    assert guarded.all()


def test_iopo_nan_env_is_guarded():
    """A NaN env log-prob: rho = exp(NaN) -> guarded to 1 -> w = 1 (h is NaN then, so only the weight is checked)."""
    ec, er = t(float("nan"), -5.0 + math.log(1.2)), t(-5.0, -5.0)
    _, m = iopo_loss(t(-1.0, -1.0), t(-2.0, -2.0), ec, er, ones(2), ones(2), beta=0.1)
    close(m["is/guarded_frac"], 0.5)
    close(m["is/weight_min"], 1.0)
    close(m["is/weight_max"], 1.2)


def test_iopo_weight_detached_and_agent_gradient():
    """Agent Delta = -1 - (-3) = 2; env Delta = ln 1.2 (y_w at ln1.2 - 3, y_l at -3); B = 1, beta = 0.1.
    h = 0.1 (2 - ln 1.2) = 0.181768...; w = 1.2; loss = 1.2 ln(1 + e^-h) = 0.727665...
    dL/d agent_w = -w beta sigma(-h) = -0.054562..., dL/d agent_l = +0.054562...; the env gets no gradient."""
    agent_w, agent_l = t(-1.0, grad=True), t(-3.0, grad=True)
    env_w, env_l = t(math.log(1.2) - 3.0, grad=True), t(-3.0, grad=True)
    loss, m = iopo_loss(agent_w, agent_l, env_w, env_l, ones(1), ones(1), beta=0.1)
    h = 0.1 * (2.0 - math.log(1.2))
    close(loss, 1.2 * neg_logsigmoid(h))
    loss.backward()
    close(agent_w.grad[0], -1.2 * 0.1 * sigmoid(-h))
    close(agent_l.grad[0], 1.2 * 0.1 * sigmoid(-h))
    assert env_w.grad is None and env_l.grad is None
    assert not is_ratio(env_w).requires_grad
    assert all(not v.requires_grad and v.dim() == 0 and v.dtype == torch.float32 for v in m.values())


def test_iopo_is_logp_mean():
    """Env: logp(y_w) = -6 over 5 tokens, logp(y_l) = -1.3 over 1 token; agent == env (h = 0).
    sum:  Delta = -6 + 1.3 = -4.7 -> rho = e^-4.7 = 0.0090953 -> paper w = rho (no floor) -> loss = 0.0090953 ln 2.
    mean: Delta = -6/5 - (-1.3/1) = 0.1 -> rho = e^0.1 = 1.1051709 -> w = rho -> loss = 1.1051709 ln 2."""
    ec, er = t(-6.0), t(-1.3)
    args = (ec.clone(), er.clone(), ec, er, t(5.0), t(1.0))
    loss_sum, _ = iopo_loss(*args, beta=0.1)
    loss_mean, m = iopo_loss(*args, beta=0.1, is_logp="mean")
    close(loss_sum, math.exp(-4.7) * LN2)
    close(loss_mean, math.exp(0.1) * LN2)
    close(m["is/weight_mean"], math.exp(0.1))


def test_iopo_reverse_preference():
    """Same pair as the gradient test: h = 0.1(2 - ln 1.2), rho = 1.2.
    reversed: Delta' = -Delta for both players -> h' = -h, rho' = 1/1.2 = 0.8333 (inside [0.7, 1.3]) -> w = 0.8333;
    loss = (1/1.2) ln(1 + e^h) = 0.656796...; rewards keep the data's orientation, so they do not change."""
    args = (t(-1.0), t(-3.0), t(math.log(1.2) - 3.0), t(-3.0), ones(1), ones(1))
    h = 0.1 * (2.0 - math.log(1.2))
    loss, m = iopo_loss(*args, beta=0.1)
    loss_rev, m_rev = iopo_loss(*args, beta=0.1, reverse_preference=True)
    close(loss, 1.2 * neg_logsigmoid(h))
    close(loss_rev, (1 / 1.2) * neg_logsigmoid(-h))
    close(m_rev["is/weight_mean"], 1 / 1.2)
    close(m_rev["rewards/margins"], m["rewards/margins"])


def test_iopo_metrics_rewards_against_env():
    """rewards use the env as reference: r_w = 0.1(-1 - (ln1.2 - 3)), r_l = 0.1(-3 + 3) = 0;
    margin = 0.1(2 - ln 1.2) = h > 0 -> accuracy 1; logps/chosen = -1, logps/rejected = -3."""
    _, m = iopo_loss(t(-1.0), t(-3.0), t(math.log(1.2) - 3.0), t(-3.0), ones(1), ones(1), beta=0.1)
    close(m["rewards/chosen"], 0.1 * (2.0 - math.log(1.2)))
    close(m["rewards/rejected"], 0.0)
    close(m["rewards/margins"], 0.1 * (2.0 - math.log(1.2)))
    close(m["rewards/accuracies"], 1.0)
    close(m["logps/chosen"], -1.0)
    close(m["logps/rejected"], -3.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda a: iopo_loss(*a, beta=0.1, is_clip="ppo"),
        lambda a: iopo_loss(*a, beta=0.1, is_logp="median"),
        lambda a: ipo_loss(*a, beta=0.1, average="token"),
        lambda a: clip_is_weight(a[0], 0.3, "both"),
    ],
)
def test_unknown_variant_names_raise(call):
    args = (t(-1.0), t(-2.0), t(-1.0), t(-2.0), ones(1), ones(1))
    with pytest.raises(ValueError, match=r"choose one of \["):
        call(args)


def test_variant_tables():
    assert set(IS_CLIPS) == {"paper", "symmetric"}
    assert set(IS_LOGPS) == {"sum", "mean"}


# --------------------------------------------------------------------------------------------------- table


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_row_names_a_loss_with_the_uniform_signature(name):
    """Six positional (B,) tensors (bf16 here, as from a bf16 model), the row's options read from a default config
    for each of its players; one float32 loss per pair with a gradient; metrics are 0-d detached float32 tensors."""
    method = METHODS[name]
    fn = getattr(losses, method.loss)
    params = list(inspect.signature(fn).parameters.values())
    assert len([p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]) == 6
    assert all(p.kind is p.KEYWORD_ONLY for p in params[6:])
    for agent in method.players:
        policy = [torch.tensor([-3.0, -4.0], dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
        reference = [torch.tensor([-3.5, -3.5], dtype=torch.bfloat16) for _ in range(2)]
        lengths = [torch.tensor([3, 4]), torch.tensor([2, 5])]
        options = method.options(TrainConfig(method=name), agent)
        pair_losses, metrics = fn(*policy, *reference, *lengths, **options)
        assert pair_losses.shape == (2,) and pair_losses.dtype == torch.float32
        assert torch.isfinite(pair_losses).all()
        pair_losses.sum().backward()
        assert policy[0].grad is not None
        assert "logps/chosen" in metrics
        for key, value in metrics.items():
            assert value.dim() == 0 and value.dtype == torch.float32 and not value.requires_grad, key


def test_the_method_table_decides_players_env_and_reduction():
    """IOPO is the one game (two players, each the other's env, alternating rounds of n_mu then n_nu); the
    baselines train one policy against the frozen start, SFT against nothing and over the chosen tokens."""
    iopo = METHODS["iopo"]
    assert iopo.players == ("protagonist", "adversary") and iopo.env == "other" and iopo.is_game
    assert iopo.other("protagonist") == "adversary" and iopo.other("adversary") == "protagonist"
    cfg = TrainConfig(method="iopo", iopo={"n_mu": 2, "n_nu": 3, "adversary": "reversed"})
    assert iopo.game_round(cfg) == ["protagonist"] * 2 + ["adversary"] * 3
    assert not iopo.options(cfg, "protagonist")["reverse_preference"]
    assert iopo.options(cfg, "adversary")["reverse_preference"]
    for name in ("dpo", "ipo", "hinge", "kto_pair"):
        assert METHODS[name].players == ("policy",) and METHODS[name].env == "reference"
        assert METHODS[name].reduce == "pairs" and not METHODS[name].is_game
    assert METHODS["sft"].env == "none" and METHODS["sft"].reduce == "chosen_tokens"
