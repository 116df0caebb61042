"""A function judge (judges.NAME.type=function): a Python callable scores answers, in iopo eval and as the online
rounds' annotator; an edited function is asked again, a non-finite score stops the run in one line."""

from __future__ import annotations

import json

import pytest
from test_online import _cli_args  # the online tests' settings (conftest's `work`: tiny model, data, RM)

from iopo.cli import main as iopo_main
from iopo.commands.online import online
from iopo.config import ConfigError, OnlineConfig, load_config
from iopo.config.evaluation import JudgeConfig
from iopo.eval.judges import build_judge

SCORER = """
def length_score(prompt, answer):
    return float(len(answer))


def bad(prompt, answer):
    return float("nan")
"""


def _file(tmp_path, text=SCORER):
    path = tmp_path / "scorer.py"
    path.write_text(text)
    return path


def test_a_function_scores_answers_and_its_id_follows_its_source(tmp_path):
    path = _file(tmp_path)
    judge = build_judge("len", JudgeConfig(type="function", function=f"{path}:length_score"))
    assert judge.modes == ["score"] and judge.facts.score_verdict == "gap"
    got = {i: r for i, r, _ in judge.score([("q", "ab"), ("q", "abcd")])}
    assert got == {0: {"score": 2.0, "valid": True}, 1: {"score": 4.0, "valid": True}}
    first = judge.judge_id
    _file(tmp_path, SCORER + "\n# edited\n")
    assert build_judge("len", JudgeConfig(type="function", function=f"{path}:length_score")).judge_id != first
    # an importable module works too
    assert build_judge("m", JudgeConfig(type="function", function="math:fabs")).judge_id.startswith(
        "function:math"
    )


def test_function_judge_errors_are_one_line(tmp_path):
    path = _file(tmp_path)
    with pytest.raises(ValueError, match="a function judge needs function"):
        JudgeConfig(type="function")
    for spec, message in (
        ("nocolon", "must be 'module:callable'"),
        (f"{tmp_path / 'missing.py'}:f", "not found"),
        (f"{path}:nothing", "has no callable 'nothing'"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ):
        with pytest.raises(ConfigError, match=message):
            build_judge("j", JudgeConfig(type="function", function=spec))
    judge = build_judge("j", JudgeConfig(type="function", function=f"{path}:bad"))
    with pytest.raises(ConfigError, match="returned nan for item 0; a score must be a finite number"):
        list(judge.score([("q", "a")]))


def test_online_iter_dpo_annotated_by_a_function(work, tmp_path):
    """Iter-DPO's annotator can be a rule: here the longer answer is chosen, and every kept pair says so."""
    path = _file(tmp_path)
    out = tmp_path / "run"
    args = [a for a in _cli_args(work, out) if not a.startswith("judge.")]
    cfg = load_config(
        None,
        ["method=iter_dpo", *args, "judge.type=function", f"judge.function={path}:length_score"],
        OnlineConfig,
    )
    summary = online(cfg)
    assert summary["status"] == "done"
    kept = 0
    for k in (1, 2):
        folder = out / f"round_{k}"
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["judge"]["type"] == "function"
        pairs = [json.loads(x) for x in (folder / "pairs.jsonl").read_text().splitlines()]
        for pair in pairs:
            assert len(pair["chosen"]) > len(pair["rejected"])
            assert pair["confidence"] == len(pair["chosen"]) - len(pair["rejected"])
        kept += len(pairs)
    assert kept > 0


def test_iopo_eval_with_a_function_judge(tmp_path, tiny_model_dir):
    path = _file(tmp_path)
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"q{i}", "chosen": "a long answer " * (i + 1), "rejected": "no"}) + "\n"
            for i in range(8)
        )
    )
    out = tmp_path / "ev"
    code = iopo_main(
        [
            "eval",
            str(tiny_model_dir),
            f"baseline={tiny_model_dir}",
            f"data={data}",
            "data.test_size=4",
            "split=test",
            "metrics=false",
            "generation.max_new_tokens=4",
            "progress_bar=false",
            "bootstrap=50",
            "judges.len.type=function",
            f"judges.len.function={path}:length_score",
            f"output_dir={out}",
        ]
    )
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    check = result["judges"]["len"]["check"]
    assert check["agreement"] == 1.0 and check["pairs"] == 4  # the chosen answers are the longer ones
    table = result["judges"]["len"]["models"][tiny_model_dir.name]["table1"]
    assert table["tie"] == 1.0  # a model against itself: the same answers, the same lengths
