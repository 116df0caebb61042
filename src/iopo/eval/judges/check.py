"""A judge checked before it speaks: its verdicts on the split's labelled pairs (chosen against rejected, each pair
in both orders for a pairwise judge) give its agreement with the labels, with a bootstrap interval over prompts, and
its first-position share. A judge whose agreement interval reaches 0.5, or that picks one position nearly always,
is flagged uninformative: `iopo eval` stores the check beside its verdicts and says so in every table."""

from __future__ import annotations

import math

from iopo.core import stats
from iopo.eval.judges import run_judge

VERDICT_VALUE = {"win": 1.0, "tie": 0.5, "lose": 0.0}


def answer_text(answer) -> str:
    """A labelled answer as a judge reads it: the text, or the content of its assistant messages."""
    if isinstance(answer, str):
        return answer
    return "\n".join(m["content"] for m in answer if isinstance(m.get("content"), str))


def labelled_items(pairs, limit: int) -> tuple[list[tuple], list[int]]:
    """(prompt, chosen, rejected) of the first `limit` labelled pairs, and the prompt index of each."""
    items, prompt_of, index = [], [], {}
    for pair in pairs[:limit]:
        key = repr(pair.prompt)
        items.append((pair.prompt, answer_text(pair.chosen), answer_text(pair.rejected)))
        prompt_of.append(index.setdefault(key, len(index)))
    return items, prompt_of


def check_judge(judge, store, session: str, jcfg, pairs, *, boot: dict, progress) -> dict:
    """The judge's agreement with the labels of the first jcfg.check_pairs pairs and its first-position share
    (pairwise: both orders, MT-Bench's rule; score: the higher score wins, within tie_margin a tie)."""
    items, prompt_of = labelled_items(pairs, jcfg.check_pairs)
    if not items:
        return stats.judge_check([], None, 0, boot["confidence"], boot["seed"], jcfg.position_limit)
    first_share = None
    if "pairwise" in judge.modes:
        asked = items + [(p, r, c) for p, c, r in items]
        results, counts = run_judge(judge, store, "pairwise", asked, session, progress)
        half = len(items)
        verdicts = [
            stats.pairwise_outcome(results[i].get("winner"), results[half + i].get("winner"))[0]
            for i in range(half)
        ]
        first = [r.get("winner") == "A" for r in results if r.get("valid") and r.get("winner") in ("A", "B")]
        first_share = sum(first) / len(first) if first else math.nan
    else:
        asked = [(p, c) for p, c, _ in items] + [(p, r) for p, _, r in items]
        results, counts = run_judge(judge, store, "score", asked, session, progress)
        scores = [r.get("score") if r.get("valid") else None for r in results]
        half = len(items)
        verdicts = [
            stats.score_gap_outcome(scores[i], scores[half + i], jcfg.tie_margin) for i in range(half)
        ]
    by_prompt: list[list[float]] = [[] for _ in range(max(prompt_of) + 1)]
    for verdict, k in zip(verdicts, prompt_of, strict=True):
        if verdict in VERDICT_VALUE:
            by_prompt[k].append(VERDICT_VALUE[verdict])
    out = stats.judge_check(
        by_prompt, first_share, boot["n_boot"], boot["confidence"], boot["seed"], jcfg.position_limit
    )
    out["invalid"] = sum(v not in VERDICT_VALUE for v in verdicts)
    out["requests"] = counts
    return out


def check_line(name: str, check: dict) -> str:
    """One line for the log: what the check found and whether the judge's verdicts mean anything."""
    if not check["pairs"]:
        return f"judge {name}: not checked (no labelled pair was judged validly)"
    low, high = check["agreement_ci"]
    text = (
        f"judge {name}: agrees with the labels on {check['agreement']:.3f} [{low:.3f}, {high:.3f}] of "
        f"{check['pairs']} labelled pairs ({check['prompts']} prompts)"
    )
    if check.get("first_position_share") is not None:
        text += f", picks the first answer {check['first_position_share']:.3f} of the time"
    if check["informative"]:
        return text + ": informative"
    return (
        text + ": UNINFORMATIVE (" + "; ".join(check["reasons"]) + "); its verdicts below carry no evidence"
    )
