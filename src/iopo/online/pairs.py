"""The pairs of an online round, chosen from its judgments: pure functions of the answers and the verdicts (no
model, no files), so the rule is testable on its own.

A prompt's answers become one pair when the judge separates two of them: by score (the best against the worst,
their gap above the tie margin) or by verdicts in both orders that agree (MT-Bench's rule). Identical answers never
make a pair. The separated pairs are ranked by the judge's confidence (a score gap, or a local judge's probability
margin) and the top `keep_ratio` of them kept (the paper's 1:5); ties in confidence go by prompt id.
"""

from __future__ import annotations

import math
import random

from iopo.core import stats


def pairwise_confidence(first: dict, second: dict) -> float:
    """How sure the two orders are together: the mean probability margin when the judge gives one (a local
    judge), else 1 (an LLM that agreed with itself in both orders)."""
    margins = [abs(r["p_a"] - 0.5) * 2 for r in (first, second) if isinstance(r.get("p_a"), (int, float))]
    return sum(margins) / len(margins) if len(margins) == 2 else 1.0


def completion(prompt, answer: str):
    """An answer as a pair's completion: text for a text prompt, one assistant message for a conversation."""
    return answer if isinstance(prompt, str) else [{"role": "assistant", "content": answer}]


def _best_by_score(rows: list[dict], answers: list[dict], tie_margin: float) -> tuple[tuple | None, int]:
    """(gap, best, worst) of a prompt's scored answers when the gap passes the tie margin, and the invalid scores."""
    scored = [(r["result"].get("score"), r["answer"]) for r in rows if r["result"].get("valid")]
    invalid = len(rows) - len(scored)
    if len(scored) < 2:
        return None, invalid
    best, worst = max(scored), min(scored)
    gap = best[0] - worst[0]
    if gap > tie_margin and answers[best[1]]["answer"] != answers[worst[1]]["answer"]:
        return (gap, best[1], worst[1]), invalid
    return None, invalid


def _best_by_verdicts(rows: list[dict], answers: list[dict]) -> tuple[tuple | None, int]:
    """(confidence, better, worse) of the most confident pair whose two orders agree, and the invalid pairs."""
    verdicts = {(r["answer"], r["other"]): r["result"] for r in rows}
    best_pair, invalid = None, 0
    for (i, j), first in verdicts.items():
        if i > j:
            continue
        second = verdicts[j, i]
        outcome, _ = stats.pairwise_outcome(
            first.get("winner") if first.get("valid") else None,
            second.get("winner") if second.get("valid") else None,
        )
        if outcome == "invalid":
            invalid += 1
        if outcome not in ("win", "lose") or answers[i]["answer"] == answers[j]["answer"]:
            continue
        better, worse = (i, j) if outcome == "win" else (j, i)
        confidence = pairwise_confidence(first, second)
        if best_pair is None or confidence > best_pair[0]:
            best_pair = (confidence, better, worse)
    return best_pair, invalid


def select_pairs(
    answers: list[dict], judged: list[dict], n: int, keep_ratio: float, tie_margin: float = 0.0
) -> tuple[list[dict], dict]:
    """The judged pairs of a round and what the choice saw.

    `answers`: the round's answers in prompt order, n per prompt ({"prompt", "prompt_id", "answer"}); `judged`: one
    row per judgment, {"prompt": prompt index, "answer": i, "other": j or None, "kind": "score" | "pairwise",
    "result": the judge's result}; `tie_margin`: a score gap at or below it separates nothing (a reward model's).
    Returns (pair rows {"prompt", "chosen", "rejected", "prompt_id", "confidence", "origin": "judge"}, facts
    {"prompts", "separated", "kept", "invalid_judgments"}).
    """
    candidates = []  # (confidence, prompt index, better answer index, worse answer index)
    by_prompt: dict[int, list[dict]] = {}
    for row in judged:
        by_prompt.setdefault(row["prompt"], []).append(row)
    invalid = 0
    for p, rows in sorted(by_prompt.items()):
        mine = answers[p * n : (p + 1) * n]
        if rows[0]["kind"] == "score":
            found, bad = _best_by_score(rows, mine, tie_margin)
        else:
            found, bad = _best_by_verdicts(rows, mine)
        invalid += bad
        if found is not None:
            candidates.append((found[0], p, found[1], found[2]))
    candidates.sort(key=lambda c: (-c[0], answers[c[1] * n]["prompt_id"]))
    keep = math.ceil(keep_ratio * len(candidates))
    pairs = []
    for confidence, p, better, worse in candidates[:keep]:
        a, b = answers[p * n + better], answers[p * n + worse]
        pairs.append(
            {
                "prompt": a["prompt"],
                "chosen": completion(a["prompt"], a["answer"]),
                "rejected": completion(a["prompt"], b["answer"]),
                "prompt_id": a["prompt_id"],
                "confidence": confidence,
                "origin": "judge",
            }
        )
    facts = {
        "prompts": len(by_prompt),
        "separated": len(candidates),
        "kept": keep,
        "invalid_judgments": invalid,
    }
    return pairs, facts


def human_rows(human: list, per_round: int, seed: int, k: int) -> list[dict]:
    """`per_round` human pairs of the train split for round k: the next slice of one seeded order (wrapping)."""
    if not per_round or not human:
        return []
    order = list(range(len(human)))
    random.Random(seed + 1).shuffle(order)
    picked = [order[(i + (k - 1) * per_round) % len(order)] for i in range(per_round)]
    return [
        {
            "prompt": human[i].prompt,
            "chosen": human[i].chosen,
            "rejected": human[i].rejected,
            "origin": "human",
            "source": human[i].source,
        }
        for i in picked
    ]
