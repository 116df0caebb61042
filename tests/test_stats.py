"""Win/tie/lose rules, bootstrap intervals, the normal fit and the judge-reply parsers, by hand."""

import math

import pytest

from iopo.core import stats
from iopo.eval.judges.prompts import parse_score, parse_winner


@pytest.mark.parametrize(
    ("ab", "ba", "outcome", "disagree"),
    [
        ("A", "B", "win", False),  # model first: A; model second: B -> both say the model
        ("B", "A", "lose", False),
        ("tie", "tie", "tie", False),
        ("A", "A", "tie", True),  # position bias: "A" whatever is shown first -> a tie (MT-Bench)
        ("B", "B", "tie", True),
        ("A", "tie", "tie", True),
        (None, "B", "invalid", False),
        ("A", None, "invalid", False),
    ],
)
def test_pairwise_outcome_mt_bench_rule(ab, ba, outcome, disagree):
    assert stats.pairwise_outcome(ab, ba) == (outcome, disagree)


def test_score_gap_and_rubric_outcomes():
    assert stats.score_gap_outcome(1.0, 0.5, 0.0) == "win"
    assert stats.score_gap_outcome(1.0, 0.5, 0.5) == "tie"  # |gap| <= margin
    assert stats.score_gap_outcome(0.2, 0.5, 0.1) == "lose"
    assert stats.score_gap_outcome(None, 0.5, 0.1) == "invalid"
    assert stats.rubric_outcome(0, 0) == "bad"
    assert stats.rubric_outcome(1, 1) == "tie"
    assert stats.rubric_outcome(3, 2) == "win"
    assert stats.rubric_outcome(0, 2) == "lose"


def test_outcome_rates_leave_out_invalid_and_sum_to_one():
    rates = stats.outcome_rates(["win", "win", "tie", "lose", "bad", "invalid"])
    assert rates == {"win": 0.4, "tie": 0.2, "lose": 0.2, "bad": 0.2}
    assert all(math.isnan(v) for v in stats.outcome_rates(["invalid"]).values())


def test_bootstrap_resamples_prompts_not_answers():
    # Every prompt's outcomes are all the same: resampling prompts can only give shares that are multiples of 1/4.
    groups = [["win", "win"], ["win", "win"], ["lose", "lose"], ["tie", "tie"]]
    ci = stats.bootstrap_rates(groups, n_boot=2000, confidence=0.95, seed=0)
    low, high = ci["win"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0
    assert (low * 4).is_integer() and (high * 4).is_integer()
    # A unanimous sample has a degenerate interval; the same seed gives the same interval.
    assert stats.bootstrap_rates([["win"]] * 5, 500, 0.95, 1)["win"] == (1.0, 1.0)
    assert stats.bootstrap_rates(groups, 300, 0.9, 7) == stats.bootstrap_rates(groups, 300, 0.9, 7)


def test_bootstrap_interval_shrinks_with_more_prompts():
    few = [["win"], ["lose"]] * 5
    many = [["win"], ["lose"]] * 200
    width = {k: stats.bootstrap_rates(v, 1000, 0.95, 0)["win"] for k, v in (("few", few), ("many", many))}
    assert width["many"][1] - width["many"][0] < width["few"][1] - width["few"][0]


def test_normal_fit_is_the_ml_estimate():
    mean, std = stats.normal_fit([1.0, 2.0, 3.0, float("nan")])
    assert mean == pytest.approx(2.0)
    assert std == pytest.approx(math.sqrt(2 / 3))  # population std: the maximum-likelihood fit


@pytest.mark.parametrize(
    ("reply", "winner"),
    [
        ('{"winner": "A"}', "A"),
        ('```json\n{"winner": "tie"}\n```', "tie"),
        ('Sure. {"winner": "B"}', "B"),
        ("B", "B"),
        ("[[A]]", "A"),
        ("Winner: b", "B"),
        ("A is better than B", None),  # ambiguous free text is invalid, never a guess
        ('{"winner": "C"}', None),
        ('{"winner": 1}', None),
        ("", None),
        (None, None),
    ],
)
def test_parse_winner_is_strict(reply, winner):
    assert parse_winner(reply) == winner


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ('{"score": 2}', 2),
        ("3", 3),
        ("2/3", 2),
        ("Score: 0", 0),
        ('{"score": 5}', None),
        ('{"score": true}', None),
        ("I'd say 2", None),
        ('{"score": 1.0}', 1),
    ],
)
def test_parse_score_is_strict(reply, score):
    assert parse_score(reply) == score


def test_cohen_kappa_by_hand():
    # 10 items; rater a says x 6 times, rater b 5 times; they agree on 7 (4 x, 3 y).
    a = ["x"] * 6 + ["y"] * 4
    b = ["x"] * 4 + ["y"] * 2 + ["y"] * 3 + ["x"]
    # p_o = 0.7; p_e = 0.6*0.5 + 0.4*0.5 = 0.5; kappa = (0.7 - 0.5) / 0.5 = 0.4
    assert stats.cohen_kappa(a, b) == (pytest.approx(0.4), 10)
    # Items one rater left out are not counted; identical constant labels give no measurable kappa.
    assert stats.cohen_kappa(a + [None], b + ["x"]) == (pytest.approx(0.4), 10)
    assert math.isnan(stats.cohen_kappa(["x", "x"], ["x", "x"])[0])
    assert stats.cohen_kappa(["x", "y"], ["y", "x"])[0] == pytest.approx(-1.0)


def test_krippendorff_alpha_matches_the_published_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", 4 observers x 12 units with gaps:
    # alpha = 0.743 (nominal) and 0.849 (interval).
    rows = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    units = [[row[j] for row in rows] for j in range(12)]
    nominal, n = stats.krippendorff_alpha(units, "nominal")
    assert round(nominal, 3) == 0.743 and n == 40  # unit 12 has one value: not pairable
    assert round(stats.krippendorff_alpha(units, "interval")[0], 3) == 0.849
    # Two raters who always agree: alpha 1; who always disagree on two labels: below 0.
    assert stats.krippendorff_alpha([["a", "a"], ["b", "b"]])[0] == pytest.approx(1.0)
    assert stats.krippendorff_alpha([["a", "b"], ["b", "a"]])[0] < 0
    assert math.isnan(stats.krippendorff_alpha([["a", "a"], ["a", "a"]])[0])
    assert math.isnan(stats.krippendorff_alpha([["a"], [None, "b"]])[0])
