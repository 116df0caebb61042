"""Pure statistics of the evaluation: win/tie/lose outcomes, bootstrap confidence intervals over prompts, the
normal fit of margin distributions, and agreement rates. No torch, no I/O.

Outcomes are strings from the evaluated model's side: "win", "tie", "lose", plus "bad" (both answers scored 0 on
the 0-3 rubric, Table 2's "bad case") and "invalid" (the judge gave no usable verdict; reported, never counted
as a tie).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

OUTCOMES = ("win", "tie", "lose", "bad")


def pairwise_outcome(order_ab: str | None, order_ba: str | None) -> tuple[str, bool]:
    """MT-Bench's rule for one pair judged in both orders (Zheng et al. 2023, Sec. 3.4).

    order_ab is the verdict ("A", "B", "tie" or None = invalid) with the evaluated model's answer shown first,
    order_ba with it shown second. Returns (outcome, orders_disagree): a win (lose) only when both orders say so,
    any disagreement is a tie; an invalid reply in either order makes the pair invalid.
    """
    if order_ab is None or order_ba is None:
        return "invalid", False
    first = {"A": "win", "B": "lose", "tie": "tie"}[order_ab]
    second = {"B": "win", "A": "lose", "tie": "tie"}[order_ba]
    if first == second:
        return first, False
    return "tie", True


def score_gap_outcome(model_score: float | None, baseline_score: float | None, tie_margin: float) -> str:
    """A reward model's verdict: the score gap beyond ±tie_margin wins or loses, else a tie."""
    if model_score is None or baseline_score is None:
        return "invalid"
    gap = model_score - baseline_score
    if gap > tie_margin:
        return "win"
    if gap < -tie_margin:
        return "lose"
    return "tie"


def rubric_outcome(model_score: float | None, baseline_score: float | None) -> str:
    """Table 2 from 0-3 scores: the higher score wins, equal scores tie, both 0 is a bad case."""
    if model_score is None or baseline_score is None:
        return "invalid"
    if model_score == 0 and baseline_score == 0:
        return "bad"
    if model_score > baseline_score:
        return "win"
    if model_score < baseline_score:
        return "lose"
    return "tie"


def outcome_rates(outcomes: Sequence[str]) -> dict[str, float]:
    """Shares of win/tie/lose/bad among the valid outcomes (they sum to 1), NaN when none is valid."""
    valid = [o for o in outcomes if o != "invalid"]
    n = len(valid)
    return {k: (sum(o == k for o in valid) / n if n else math.nan) for k in OUTCOMES}


def bootstrap_rates(
    outcomes_by_prompt: Sequence[Sequence[str]], n_boot: int, confidence: float, seed: int
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of the outcome shares, resampling prompts (all of a prompt's outcomes together).

    Prompts, not outcomes, are the unit: several answers to one prompt are not independent. Returns
    {outcome: (low, high)}; (nan, nan) when nothing is valid or n_boot is 0.
    """
    groups = [[o for o in group if o != "invalid"] for group in outcomes_by_prompt]
    groups = [g for g in groups if g]
    if not groups or n_boot <= 0:
        return {k: (math.nan, math.nan) for k in OUTCOMES}
    counts = np.array(
        [[sum(o == k for o in g) for k in OUTCOMES] for g in groups], dtype=np.float64
    )  # (P, 4)
    totals = counts.sum(1)  # (P,)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(groups), size=(n_boot, len(groups)))  # (n_boot, P)
    shares = counts[picks].sum(1) / totals[picks].sum(1, keepdims=True)  # (n_boot, 4)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(shares, [alpha, 1 - alpha], axis=0)
    return {k: (float(low[i]), float(high[i])) for i, k in enumerate(OUTCOMES)}


def bootstrap_mean(
    values_by_prompt: Sequence[Sequence[float]], n_boot: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of the values, resampling prompts."""
    groups = [[v for v in g if v is not None and math.isfinite(v)] for g in values_by_prompt]
    groups = [g for g in groups if g]
    if not groups or n_boot <= 0:
        return (math.nan, math.nan)
    sums = np.array([sum(g) for g in groups], dtype=np.float64)
    counts = np.array([len(g) for g in groups], dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(groups), size=(n_boot, len(groups)))
    means = sums[picks].sum(1) / counts[picks].sum(1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def normal_fit(values: Sequence[float]) -> tuple[float, float]:
    """Maximum-likelihood normal (mean, std) of the margin distribution (Fig. 3's fitted curve)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std())


def agreement_rate(a: Sequence[str | None], b: Sequence[str | None]) -> tuple[float, int]:
    """Share of items where two raters (or judges) give the same label, over items both labelled; and that count."""
    both = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if not both:
        return math.nan, 0
    return sum(x == y for x, y in both) / len(both), len(both)


def json_safe(value):
    """Strict JSON has no NaN or infinity: they become null (callers add a flag saying what that means)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def cohen_kappa(a: Sequence, b: Sequence) -> tuple[float, int]:
    """Cohen's κ of two raters over the items both labelled (None = not labelled), and that count.

    κ = (p_o - p_e) / (1 - p_e), p_e from each rater's own label shares (Cohen 1960). NaN when fewer than two
    items are shared or p_e = 1 (both raters used one and the same label throughout: agreement is not measurable).
    """
    both = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    n = len(both)
    if n < 2:
        return math.nan, n
    labels = sorted({x for x, _ in both} | {y for _, y in both}, key=str)
    p_o = sum(x == y for x, y in both) / n
    p_e = sum((sum(x == c for x, _ in both) / n) * (sum(y == c for _, y in both) / n) for c in labels)
    if p_e >= 1.0:
        return math.nan, n
    return float((p_o - p_e) / (1 - p_e)), n


def krippendorff_alpha(units: Sequence[Sequence], metric: str = "nominal") -> tuple[float, int]:
    """Krippendorff's α over units, each the list of values its raters gave (None = missing), for any number of
    raters; and the number of pairable values. metric "nominal" (labels) or "interval" (numbers, e.g. 0-3 scores).

    From the coincidence matrix (Krippendorff 2011, "Computing Krippendorff's alpha-reliability"): units with
    fewer than two values are not pairable and are left out; α = 1 - D_o / D_e. NaN when nothing is pairable or
    every value is the same (D_e = 0).
    """
    if metric not in ("nominal", "interval"):
        raise ValueError(f"unknown metric {metric!r}")
    values = [[v for v in unit if v is not None] for unit in units]
    values = [u for u in values if len(u) >= 2]
    if not values:
        return math.nan, 0
    labels = sorted({v for u in values for v in u}, key=lambda v: (str(type(v)), v))
    index = {v: i for i, v in enumerate(labels)}
    coincidence = np.zeros((len(labels), len(labels)), dtype=np.float64)
    for unit in values:
        counts = np.zeros(len(labels), dtype=np.float64)
        for v in unit:
            counts[index[v]] += 1
        coincidence += (np.outer(counts, counts) - np.diag(counts)) / (len(unit) - 1)
    n_c = coincidence.sum(1)
    n = n_c.sum()
    if metric == "nominal":
        delta = 1.0 - np.eye(len(labels))
    else:
        x = np.asarray(labels, dtype=np.float64)
        delta = (x[:, None] - x[None, :]) ** 2
    d_o = (coincidence * delta).sum() / n
    d_e = (np.outer(n_c, n_c) * delta).sum() / (n * (n - 1))
    if d_e == 0:
        return math.nan, int(n)
    return float(1.0 - d_o / d_e), int(n)


# ---------------------------------------------------------------- length-controlled win rate, judge checks

OUTCOME_VALUE = {"win": 1.0, "tie": 0.5, "lose": 0.0}


def _logistic_fit(x: np.ndarray, y: np.ndarray, iterations: int = 50) -> tuple[float, float]:
    """(intercept, slope) of a logistic regression of y in [0, 1] (a tie counts half) on x, by Newton's method,
    with scikit-learn's default L2 penalty on the slope (C = 1: 0.5 * slope^2), which keeps the fit finite when
    length separates the verdicts perfectly, and a tiny one (1e-4) on the intercept for an all-win sample."""
    theta = np.zeros(2)
    ridge = np.array([1e-4, 1.0])
    design = np.stack([np.ones_like(x), x], 1)  # (N, 2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(design @ theta)))
        grad = design.T @ (y - p) - ridge * theta
        hess = (design * (p * (1 - p))[:, None]).T @ design + np.diag(ridge)
        step = np.linalg.solve(hess, grad)
        theta = theta + step
        if np.abs(step).max() < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def length_controlled_win_rate(
    outcomes_by_prompt: Sequence[Sequence[str]],
    length_diffs_by_prompt: Sequence[Sequence[float]],
    n_boot: int,
    confidence: float,
    seed: int,
) -> dict:
    """AlpacaEval 2's length-controlled win rate (Dubois et al. 2024), without its per-instruction term: a logistic
    regression of each verdict (win 1, tie 1/2, lose 0) on tanh(length difference / its standard deviation), read
    at a length difference of zero: sigmoid(intercept), the win rate the judge would give if both answers had the
    same length. Beside it the raw rate (ties counted half), the slope (how much the judge pays for length), and a
    bootstrap interval over prompts (the fit repeated per draw). Invalid verdicts are left out."""
    rows = [
        (OUTCOME_VALUE[o], float(d), k)
        for k, (group, diffs) in enumerate(zip(outcomes_by_prompt, length_diffs_by_prompt, strict=True))
        for o, d in zip(group, diffs, strict=True)
        if o in OUTCOME_VALUE
    ]
    if not rows:
        return {"win_rate": math.nan, "ci": (math.nan, math.nan), "raw": math.nan, "slope": math.nan, "n": 0}
    y = np.array([r[0] for r in rows])
    d = np.array([r[1] for r in rows])
    prompt = np.array([r[2] for r in rows])
    scale = float(d.std()) or 1.0
    x = np.tanh(d / scale)
    intercept, slope = _logistic_fit(x, y)
    out = {
        "win_rate": 1.0 / (1.0 + math.exp(-intercept)),
        "raw": float(y.mean()),
        "slope": slope,
        "length_scale": scale,
        "n": len(rows),
        "ci": (math.nan, math.nan),
    }
    prompts = np.unique(prompt)
    if n_boot > 0 and len(prompts) > 1:
        members = [np.flatnonzero(prompt == p) for p in prompts]
        rng = np.random.default_rng(seed)
        draws = np.empty(n_boot)
        for b in range(n_boot):
            index = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
            draws[b] = 1.0 / (1.0 + math.exp(-_logistic_fit(x[index], y[index])[0]))
        alpha = (1 - confidence) / 2
        low, high = np.quantile(draws, [alpha, 1 - alpha])
        out["ci"] = (float(low), float(high))
    return out


def judge_check(
    agreement_by_prompt: Sequence[Sequence[float]],
    first_position_share: float | None,
    n_boot: int,
    confidence: float,
    seed: int,
    position_limit: float,
) -> dict:
    """Whether a judge is worth asking, from its verdicts on labelled pairs: per pair 1 when it prefers the labelled
    chosen answer, 1/2 for a tie, 0 for the rejected. Uninformative when the agreement's interval (bootstrap over
    prompts) reaches 0.5, or when, asked in both orders, it picks the first answer more than `position_limit` (or
    less than 1 - position_limit) of the time."""
    values = [v for g in agreement_by_prompt for v in g]
    agreement = float(np.mean(values)) if values else math.nan
    ci = bootstrap_mean(agreement_by_prompt, n_boot, confidence, seed)
    reasons = []
    if not values:
        reasons.append("no labelled pair was judged")
    elif not ci[0] > 0.5:
        reasons.append(
            f"its agreement with the labels, {agreement:.3f} [{ci[0]:.3f}, {ci[1]:.3f}], reaches 0.5"
        )
    if first_position_share is not None and not (
        1 - position_limit <= first_position_share <= position_limit
    ):
        reasons.append(f"it picks the first answer {first_position_share:.3f} of the time")
    return {
        "pairs": len(values),
        "prompts": sum(1 for g in agreement_by_prompt if g),
        "agreement": agreement,
        "agreement_ci": ci,
        "first_position_share": first_position_share,
        "position_limit": position_limit,
        "informative": not reasons,
        "reasons": reasons,
    }


def wilson_interval(accuracy: float | None, n: int | None, z: float = 1.959964) -> tuple[float, float] | None:
    """The 95% Wilson interval of a share `accuracy` of n pairs."""
    if accuracy is None or not n:
        return None
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
