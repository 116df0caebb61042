"""Judges checked before they speak (iopo eval): agreement with the split's labels and the first-position share,
the uninformative flag, and the length-controlled win rate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_eval import _eval_args, work  # noqa: F401  the tiny models, data and reward model of test_eval

from iopo.cli import main as iopo_main
from iopo.config.evaluation import JudgeConfig
from iopo.core import stats
from iopo.data.formats import PreferencePair
from iopo.eval.judges.check import check_judge, check_line
from iopo.io.store import Store

BOOT = {"n_boot": 300, "confidence": 0.95, "seed": 0}


class StubJudge:
    """A pairwise judge by rule: `rule(prompt, a, b)` -> "A" | "B" | "tie"."""

    name, modes, facts = "stub", ["pairwise"], None

    def __init__(self, rule, judge_id):
        self.rule, self.judge_id, self.asked = rule, judge_id, 0

    def pairwise(self, items):
        for i, (prompt, a, b) in enumerate(items):
            self.asked += 1
            yield i, {"winner": self.rule(prompt, a, b), "valid": True}, {"requests": 1}

    def close(self):
        pass


def _pairs(n_prompts=20, per_prompt=2):
    return [
        PreferencePair(
            f"question {k}", f"good answer {k}.{j}", f"bad {k}.{j}", f"data.jsonl:{k * per_prompt + j}"
        )
        for k in range(n_prompts)
        for j in range(per_prompt)
    ]


def _cfg(**kw):
    return JudgeConfig(type="openai", base_url="http://127.0.0.1:9/v1", **kw)


def test_a_judge_that_always_answers_a_is_uninformative(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    judge = StubJudge(lambda p, a, b: "A", "always-a")
    check = check_judge(judge, store, "s", _cfg(check_pairs=30), _pairs(), boot=BOOT, progress=False)
    # Both orders of 30 pairs: "A" both times is one win and one loss -> a tie by MT-Bench's rule, agreement 1/2.
    assert judge.asked == 60 and check["pairs"] == 30 and check["prompts"] == 15
    assert check["agreement"] == 0.5 and check["first_position_share"] == 1.0
    assert not check["informative"] and len(check["reasons"]) == 2
    assert "UNINFORMATIVE" in check_line("stub", check)
    # Asked again: every verdict comes from the store.
    again = StubJudge(lambda p, a, b: "A", "always-a")
    check_judge(again, store, "s", _cfg(check_pairs=30), _pairs(), boot=BOOT, progress=False)
    assert again.asked == 0
    store.close()


def test_a_judge_that_reads_the_labels_is_informative_and_a_coin_is_not(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    knows = StubJudge(lambda p, a, b: "A" if a.startswith("good") else "B", "knows")
    check = check_judge(knows, store, "s", _cfg(), _pairs(), boot=BOOT, progress=False)
    assert check["pairs"] == 40 and check["agreement"] == 1.0 and check["first_position_share"] == 0.5
    assert (
        check["informative"] and check["reasons"] == [] and check_line("k", check).endswith(": informative")
    )

    rng = np.random.default_rng(1)
    coin = StubJudge(lambda p, a, b: "A" if rng.random() < 0.5 else "B", "coin")
    check = check_judge(coin, store, "s", _cfg(), _pairs(), boot=BOOT, progress=False)
    low, high = check["agreement_ci"]
    assert low <= 0.5 <= high and not check["informative"]
    assert check["reasons"][0].startswith("its agreement with the labels")
    # A slightly position-biased but label-reading judge: first-position share 0.75 is within the 0.8 limit.
    mostly = StubJudge(
        lambda p, a, b: "A" if a.startswith("good") or int(p.split()[1]) % 2 else "B", "mostly"
    )
    check = check_judge(mostly, store, "s", _cfg(), _pairs(), boot=BOOT, progress=False)
    assert check["first_position_share"] == 0.75 and check["agreement"] == 0.75
    assert check["informative"]
    check = check_judge(mostly, store, "s", _cfg(position_limit=0.7), _pairs(), boot=BOOT, progress=False)
    assert not check["informative"] and "first answer 0.750" in check["reasons"][0]
    store.close()


def test_length_controlled_win_rate_removes_a_pure_length_preference():
    rng = np.random.default_rng(0)
    diffs = rng.normal(30, 50, 300)  # the model's answers are longer on average
    outcomes = ["win" if d > 0 else "lose" for d in diffs]  # a judge that rewards length only
    lc = stats.length_controlled_win_rate([[o] for o in outcomes], [[d] for d in diffs], 300, 0.95, 0)
    assert lc["raw"] == pytest.approx(np.mean(diffs > 0)) and lc["raw"] > 0.65
    assert abs(lc["win_rate"] - 0.5) < 0.03 and lc["ci"][0] < 0.5 < lc["ci"][1] and lc["slope"] > 3
    # A judge blind to length: the controlled rate is the raw one.
    blind = ["win" if rng.random() < 0.7 else "lose" for _ in diffs]
    lc = stats.length_controlled_win_rate([[o] for o in blind], [[d] for d in diffs], 0, 0.95, 0)
    assert abs(lc["win_rate"] - lc["raw"]) < 0.02 and math.isnan(lc["ci"][0])


def test_length_controlled_fit_by_hand():
    # x = tanh(d / sd(d)) with d = -1, +1 (sd 1): x = -tanh(1), +tanh(1); ties count half. With one win at +x and
    # one tie at -x the fitted probabilities are the solution of the penalised score equations, found by Newton;
    # check them against a direct minimisation of the penalised negative log-likelihood.
    out = stats.length_controlled_win_rate([["win", "tie"]], [[1.0, -1.0]], 0, 0.95, 0)
    x, y = np.array([math.tanh(1), -math.tanh(1)]), np.array([1.0, 0.5])
    grid = np.linspace(-4, 4, 161)  # steps of 0.05
    best = min(
        ((a, b) for a in grid for b in grid),
        key=lambda t: (
            -np.sum(y * (t[0] + t[1] * x) - np.log1p(np.exp(t[0] + t[1] * x)))
            + 0.5 * 1.0 * t[1] ** 2
            + 0.5 * 1e-4 * t[0] ** 2
        ),
    )
    assert out["win_rate"] == pytest.approx(1 / (1 + math.exp(-best[0])), abs=0.01)
    assert out["slope"] == pytest.approx(best[1], abs=0.03) and out["raw"] == 0.75


def test_iopo_eval_checks_each_judge_and_stores_it(work, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "ev"
    args = [a for a in _eval_args(work, out) if "check_pairs" not in a]
    assert iopo_main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    for name in ("rm", "loc"):
        check = result["judges"][name]["check"]
        assert (
            check["pairs"] + check["invalid"] == 6 and check["requests"]["new"] > 0
        )  # the split's 6 labelled pairs
        assert 0.0 <= check["agreement"] <= 1.0 and isinstance(check["informative"], bool)
        assert f"judge {name}: agrees with the labels on" in printed
        assert (check["first_position_share"] is None) == (name == "rm")
        label = next(iter(result["judges"][name]["models"]))
        lc = result["judges"][name]["models"][label]["table1"]["length_controlled"]
        assert lc["n"] == result["judges"][name]["models"][label]["table1"]["n"]
    assert "length-controlled win rate" in printed
    # Six pairs cannot show any judge informative: the tiny judge is flagged, and the report says so beside its row.
    assert not result["judges"]["loc"]["check"]["informative"]
    from iopo.report.markdown import write_report

    report = write_report([str(out)], tmp_path / "r" / "report.md").read_text()
    assert "loc **(uninformative)** (local)" in report and "agrees with the split's labels on" in report
    assert "length-controlled win rate" in report
