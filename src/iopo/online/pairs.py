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


def judgments_by_prompt(judged: list[dict]) -> dict[int, list[dict]]:
    """A round's judgment rows grouped by their prompt index, in the order they came."""
    by_prompt: dict[int, list[dict]] = {}
    for row in judged:
        by_prompt.setdefault(row["prompt"], []).append(row)
    return by_prompt


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
    by_prompt = judgments_by_prompt(judged)
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


# ---------------------------------------------------------------- SPPO: win probabilities against the policy


def _pair_probability(first: dict, second: dict) -> float | None:
    """P(answer i beats answer j) from a pairwise judge's two orders (i shown first, then second): the mean of the
    probability of i in each order when the judge gives probabilities (a local judge), else of the verdicts (win 1,
    tie 1/2, lose 0); None when either order is invalid."""
    if not (first.get("valid") and second.get("valid")):
        return None
    if all(isinstance(r.get("p_a"), (int, float)) for r in (first, second)):
        return (first["p_a"] + (1.0 - second["p_a"])) / 2
    value = {"A": 1.0, "tie": 0.5, "B": 0.0}
    return (value[first["winner"]] + (1.0 - value[second["winner"]])) / 2


def _score_probability(score_i: float, score_j: float, verdict: str) -> float:
    """P(answer i beats answer j) from two scores: Bradley-Terry sigma(r_i - r_j) for a reward model's scores
    ("gap"), else a rubric's comparison (higher 1, equal 1/2, lower 0)."""
    if verdict == "gap":
        return 1.0 / (1.0 + math.exp(-(score_i - score_j)))
    return 1.0 if score_i > score_j else 0.5 if score_i == score_j else 0.0


def win_probabilities(rows: list[dict], n: int, verdict: str = "gap") -> list[float | None]:
    """SPPO's P-hat(y_i > pi_t) for each of a prompt's n answers, the K answers being samples of pi_t: as the SPPO
    authors' compute_prob.py, the mean of P(y_i > y_j) over all K answers j, the answer itself included at 1/2
    (over the answers with a valid comparison, and itself). `rows` are the prompt's judgments (score or pairwise,
    as select_pairs reads them). An answer with no valid comparison gets None."""
    if rows and rows[0]["kind"] == "score":
        scores = {r["answer"]: r["result"].get("score") for r in rows if r["result"].get("valid")}
        table = {
            (i, j): _score_probability(scores[i], scores[j], verdict)
            for i in scores
            for j in scores
            if i != j
        }
    else:
        verdicts = {(r["answer"], r["other"]): r["result"] for r in rows}
        table = {}
        for (i, j), first in verdicts.items():
            if (j, i) in verdicts:
                p = _pair_probability(first, verdicts[j, i])
                if p is not None:
                    table[i, j] = p
    out: list[float | None] = []
    for i in range(n):
        seen = [table[i, j] for j in range(n) if (i, j) in table]
        out.append((sum(seen) + 0.5) / (len(seen) + 1) if seen else None)
    return out


def sppo_pairs(
    answers: list[dict], judged: list[dict], n: int, verdict: str = "gap"
) -> tuple[list[dict], dict]:
    """SPPO's pairs of a round (as its authors build them): per prompt, the answer with the highest estimated win
    probability against the policy as chosen and the lowest as rejected, each carrying its P-hat (extras
    chosen_win, rejected_win) for the soft loss. A prompt whose answers are all the same text, or with fewer than
    two answers that have a P-hat, makes no pair. Returns (pair rows, facts)."""
    by_prompt = judgments_by_prompt(judged)
    pairs, unusable = [], 0
    for p, rows in sorted(by_prompt.items()):
        mine = answers[p * n : (p + 1) * n]
        wins = win_probabilities(rows, n, verdict)
        known = [(w, i) for i, w in enumerate(wins) if w is not None]
        # the first answer among equals: max/min over (P-hat, -index) and (P-hat, index)
        best = max(known, key=lambda t: (t[0], -t[1]), default=None)
        worst = min(known, key=lambda t: (t[0], t[1]), default=None)
        if len(known) < 2 or mine[best[1]]["answer"] == mine[worst[1]]["answer"]:
            unusable += 1
            continue
        a, b = mine[best[1]], mine[worst[1]]
        pairs.append(
            {
                "prompt": a["prompt"],
                "chosen": completion(a["prompt"], a["answer"]),
                "rejected": completion(a["prompt"], b["answer"]),
                "prompt_id": a["prompt_id"],
                "extras": {"chosen_win": best[0], "rejected_win": worst[0]},
                "origin": "judge",
            }
        )
    facts = {"prompts": len(by_prompt), "kept": len(pairs), "unusable_prompts": unusable}
    return pairs, facts


# ---------------------------------------------------------------- SPIN: the data's answer against the policy's own


def self_play_pairs(answers: list[dict], data_answers: dict[str, object]) -> tuple[list[dict], dict]:
    """SPIN's pairs of a round: chosen = the data's answer to the prompt (`data_answers`, by prompt id, as a
    completion), rejected = each of the policy's own answers to it. An own answer equal to the data's makes no pair
    (counted)."""
    pairs, same = [], 0
    for a in answers:
        data = data_answers[a["prompt_id"]]
        own = completion(a["prompt"], a["answer"])
        if own == data:
            same += 1
            continue
        pairs.append(
            {
                "prompt": a["prompt"],
                "chosen": data,
                "rejected": own,
                "prompt_id": a["prompt_id"],
                "origin": "self-play",
            }
        )
    return pairs, {"answers": len(answers), "kept": len(pairs), "same_as_data": same}


# ---------------------------------------------------------------- XPO: the policy's answer against the reference's


def exploration_pairs(
    answers: list[dict], judged: list[dict], n: int, tie_margin: float = 0.0
) -> tuple[list[dict], dict]:
    """XPO's pairs of a round: per prompt, the policy's answers and, last of the prompt's n, the starting model's;
    the judge's separated pair (select_pairs' rule, every one kept), with extras reference_side = 1 when the
    reference's answer is the chosen one, 0 when it is the rejected one, 1/2 when the pair holds none of it (two
    policy answers). A tie makes no pair: it holds no preference."""
    rows, facts = select_pairs(answers, judged, n, 1.0, tie_margin)
    reference = {a["prompt_id"]: completion(a["prompt"], a["answer"]) for a in answers[n - 1 :: n]}
    for row in rows:
        ref = reference[row["prompt_id"]]
        row["extras"] = {
            "reference_side": 1.0 if row["chosen"] == ref else 0.0 if row["rejected"] == ref else 0.5
        }
    facts["reference_chosen"] = sum(row["extras"]["reference_side"] == 1.0 for row in rows)
    return rows, facts
