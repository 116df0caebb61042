"""One model's answers against a baseline's, by one judge: Table 1 (win : tie : lose, both orders or a reward gap)
and Table 2 (the 0-3 rubric), with bootstrap intervals over prompts and the length-controlled win rate beside. Used
by `iopo eval` and the online rounds."""

from __future__ import annotations

import math

from iopo.core import stats
from iopo.eval.judges import run_judge


def comparison_items(kind: str, model_recs: list[dict], base_recs: list[dict]) -> list[tuple]:
    """What judge_against asks a judge of `kind`: each pair in both orders (model first, then baseline first), or
    every answer of both to score."""
    if kind == "pairwise":
        ab = [(m["prompt"], m["answer"], b["answer"]) for m, b in zip(model_recs, base_recs, strict=True)]
        return ab + [(p, b, a) for p, a, b in ab]
    return [(r["prompt"], r["answer"]) for r in model_recs + base_recs]


def judge_against(
    judge,
    store,
    session: str,
    jcfg,
    model_recs: list[dict],
    base_recs: list[dict],
    *,
    n: int,
    boot: dict,
    progress,
    modes: list[str] | None = None,
) -> dict:
    """Table 1 (and Table 2 for rubric scores) of one model's answers against the baseline's, by one judge.

    The answer lists are aligned: n answers per prompt, prompt by prompt. Pairwise judges are asked both orders
    (MT-Bench's rule); a reward model's score gap gives the verdict; a 0-3 rubric gives Table 2. `boot` is
    {"n_boot", "confidence", "seed"} of the bootstrap over prompts. `modes` picks some of the judge's modes.
    """
    modes = modes or judge.modes
    n_prompts = len(model_recs) // n
    out: dict = {"n_prompts": n_prompts, "n_answers": len(model_recs)}
    # characters of the model's answer minus the baseline's, per prompt: for the length-controlled win rate
    diffs = [len(m["answer"]) - len(b["answer"]) for m, b in zip(model_recs, base_recs, strict=True)]
    diffs_by_prompt = [diffs[k * n : (k + 1) * n] for k in range(n_prompts)]

    def summary(outcomes_by_prompt: list[list[str]]) -> dict:
        flat = [o for group in outcomes_by_prompt for o in group]
        table = stats.outcome_rates(flat)
        table["ci"] = stats.bootstrap_rates(
            outcomes_by_prompt, boot["n_boot"], boot["confidence"], boot["seed"]
        )
        table["length_controlled"] = stats.length_controlled_win_rate(
            outcomes_by_prompt, diffs_by_prompt, boot["n_boot"], boot["confidence"], boot["seed"]
        )
        table["n"] = sum(o != "invalid" for o in flat)
        table["invalid"] = sum(o == "invalid" for o in flat)
        table["outcomes"] = outcomes_by_prompt  # per prompt, for pooled or cross-run intervals
        return table

    if "pairwise" in modes:
        items = comparison_items("pairwise", model_recs, base_recs)
        results, counts = run_judge(judge, store, "pairwise", items, session, progress)
        half = len(model_recs)
        combined = [
            stats.pairwise_outcome(results[i].get("winner"), results[half + i].get("winner"))
            for i in range(half)
        ]
        outcomes = [[o for o, _ in combined[k * n : (k + 1) * n]] for k in range(n_prompts)]
        table = summary(outcomes)
        both_valid = [d for o, d in combined if o != "invalid"]
        table["order_disagreement"] = sum(both_valid) / len(both_valid) if both_valid else math.nan
        first_a = [r.get("winner") == "A" for r in results if r.get("valid")]
        table["first_position_share"] = sum(first_a) / len(first_a) if first_a else math.nan
        table["requests"] = counts
        out["table1"] = table

    if "score" in modes:
        items = comparison_items("score", model_recs, base_recs)
        results, counts = run_judge(judge, store, "score", items, session, progress)
        scores = [r.get("score") if r.get("valid") else None for r in results]
        model_scores, base_scores = scores[: len(model_recs)], scores[len(model_recs) :]
        model_groups = [model_scores[k * n : (k + 1) * n] for k in range(n_prompts)]
        base_groups = [base_scores[k * n : (k + 1) * n] for k in range(n_prompts)]
        mean = {
            "model": _mean(model_scores),
            "baseline": _mean(base_scores),
            "model_ci": stats.bootstrap_mean(model_groups, **boot),
            "baseline_ci": stats.bootstrap_mean(base_groups, **boot),
        }
        if jcfg.facts.score_verdict == "gap":  # a reward model: the gap of two rewards is Table 1's verdict
            outcomes = [
                [stats.score_gap_outcome(m, b, jcfg.tie_margin) for m, b in zip(mg, bg, strict=True)]
                for mg, bg in zip(model_groups, base_groups, strict=True)
            ]
            table = summary(outcomes)
            table["tie_margin"] = jcfg.tie_margin
            table["mean_reward"] = mean
            table["requests"] = counts
            out["table1"] = table
        else:  # 0-3 rubric: Table 2
            outcomes = [
                [stats.rubric_outcome(m, b) for m, b in zip(mg, bg, strict=True)]
                for mg, bg in zip(model_groups, base_groups, strict=True)
            ]
            table = summary(outcomes)
            table["mean_score"] = mean
            table["requests"] = counts
            out["table2"] = table
    return out


def _mean(values: list) -> float:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else math.nan
