"""iopo.online.pairs: the choice of an online round's pairs from its judgments, with no model and no files."""

from iopo.data.formats import PreferencePair
from iopo.online.pairs import human_rows, pairwise_confidence, select_pairs


def answers(texts_by_prompt: list[list[str]], prompt=None) -> list[dict]:
    out = []
    for p, texts in enumerate(texts_by_prompt):
        for text in texts:
            out.append({"prompt": prompt or f"q{p}?", "prompt_id": f"id{p}", "answer": text})
    return out


def scored(p: int, scores: list[float | None]) -> list[dict]:
    return [
        {
            "prompt": p,
            "answer": i,
            "other": None,
            "kind": "score",
            "result": {"score": s, "valid": s is not None},
        }
        for i, s in enumerate(scores)
    ]


def test_scores_pick_best_against_worst_above_the_tie_margin_ranked_by_gap():
    """Prompt 0: scores [1, 5, 3] -> best 1 (5) vs worst 0 (1), gap 4. Prompt 1: [2, 2.05] -> gap 0.05 <= 0.1, a tie.
    Prompt 2: [0, 9] -> gap 9. Prompt 3: one valid score -> nothing (one invalid). Ranked by gap: prompt 2 then 0;
    keep_ratio 0.5 of 2 separated -> ceil(1) = 1 kept: prompt 2's."""
    texts = [["a0", "b0", "c0"], ["a1", "b1", "c1"], ["a2", "b2", "c2"], ["a3", "b3", "c3"]]
    judged = (
        scored(0, [1, 5, 3]) + scored(1, [2, 2.05, 2]) + scored(2, [0, 9, 4]) + scored(3, [1, None, None])
    )
    rows, facts = select_pairs(answers(texts), judged, n=3, keep_ratio=0.5, tie_margin=0.1)
    assert facts == {"prompts": 4, "separated": 2, "kept": 1, "invalid_judgments": 2}
    assert rows == [
        {
            "prompt": "q2?",
            "chosen": "b2",
            "rejected": "a2",
            "prompt_id": "id2",
            "confidence": 9,
            "origin": "judge",
        }
    ]
    everything, _ = select_pairs(answers(texts), judged, n=3, keep_ratio=1.0, tie_margin=0.1)
    assert [(r["chosen"], r["rejected"]) for r in everything] == [("b2", "a2"), ("b0", "a0")]


def test_identical_answers_never_make_a_pair_and_chats_get_assistant_messages():
    chat = [{"role": "user", "content": "hi"}]
    judged = scored(0, [1, 5])
    rows, facts = select_pairs(answers([["same", "same"]]), judged, n=2, keep_ratio=1.0)
    assert rows == [] and facts["separated"] == 0
    rows, _ = select_pairs(answers([["x", "y"]], prompt=chat), judged, n=2, keep_ratio=1.0)
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "y"}]


def verdicts(p: int, i: int, j: int, first: str | None, second: str | None, p_a=(None, None)) -> list[dict]:
    """The two orders of answers i, j: (i first) says `first`, (j first) says `second`."""
    rows = []
    for (a, b), winner, prob in (((i, j), first, p_a[0]), ((j, i), second, p_a[1])):
        result = {"winner": winner, "valid": winner is not None}
        if prob is not None:
            result["p_a"] = prob
        rows.append({"prompt": p, "answer": a, "other": b, "kind": "pairwise", "result": result})
    return rows


def test_pairwise_keeps_pairs_whose_orders_agree_the_most_confident_per_prompt():
    """Prompt 0: (0, 1) both orders prefer answer 1 (B then A), probability margins 0.8 and 0.6 -> confidence
    0.7; (0, 2) the orders disagree (A, A) -> a tie, no pair; (1, 2) invalid in one order. Prompt 1: (0, 1) agree
    on answer 0 with no probabilities -> confidence 1, ranked first."""
    judged = (
        verdicts(0, 0, 1, "B", "A", p_a=(0.1, 0.8))
        + verdicts(0, 0, 2, "A", "A")
        + verdicts(0, 1, 2, None, "A")
    )
    judged += verdicts(1, 0, 1, "A", "B")
    rows, facts = select_pairs(answers([["a", "b", "c"], ["d", "e", "f"]]), judged, n=3, keep_ratio=1.0)
    assert facts["separated"] == 2 and facts["invalid_judgments"] == 1
    assert [(r["chosen"], r["rejected"], r["confidence"]) for r in rows] == [
        ("d", "e", 1.0),
        ("b", "a", 0.7000000000000001),
    ]
    assert pairwise_confidence({"p_a": 0.1}, {"p_a": 0.8}) == abs(0.1 - 0.5) + abs(0.8 - 0.5)


def test_human_rows_take_the_next_slice_of_one_seeded_order_each_round():
    human = [PreferencePair(f"p{i}", f"c{i}", f"r{i}", f"f:line {i}") for i in range(5)]
    first, second, third = (human_rows(human, 2, seed=7, k=k) for k in (1, 2, 3))
    order = [r["prompt"] for r in first + second + third]
    assert len(set(order[:5])) == 5 and order[5] == order[0]  # every pair once, then the order wraps
    assert human_rows(human, 2, seed=7, k=1) == first and human_rows(human, 0, seed=7, k=1) == []
    assert {r["origin"] for r in first} == {"human"}
