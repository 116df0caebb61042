"""Docs that run: every `iopo ...` command line in the README and docs/ (in code blocks) parses and validates, as
`iopo COMMAND ... --print-config` would, from the checkout's root (its configs/). A command the docs show must not
stop on an unknown key or a bad value."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from iopo.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "experiments" / "README.md"]


def command_lines() -> list[tuple[str, str]]:
    """(where, command) for each `iopo COMMAND ...` line of a fenced code block (continuations joined, comments
    cut)."""
    found = []
    for doc in DOCS:
        in_block, pending, start = False, "", 0
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_block = not in_block
                continue
            if not in_block:
                continue
            text = pending + line.strip()
            if pending == "":
                start = number
            if text.endswith("\\"):
                pending = text[:-1] + " "
                continue
            pending = ""
            text = re.sub(r"\s+#\s.*$", "", text).strip()
            if text.startswith("iopo ") and not text.startswith(("iopo --", "iopo: ", "iopo -h")):
                found.append((f"{doc.relative_to(ROOT)}:{start}", text))
    return found


LINES = command_lines()


def test_the_docs_show_commands():
    commands = {shlex.split(line)[1] for _, line in LINES}
    assert {"train", "train-rm", "eval", "online", "rate", "plot", "report", "generate"} <= commands
    assert len(LINES) >= 30


@pytest.mark.parametrize(("where", "line"), LINES, ids=[where for where, _ in LINES])
def test_each_documented_command_validates(where, line, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    argv = shlex.split(line)[1:]
    code = main([*argv, "--print-config"])
    err = capsys.readouterr().err
    assert code == 0, f"{where}: `{line}` -> {err.strip()}"


def test_print_config_shows_each_settings_help_and_loads_back(tmp_path, capsys, monkeypatch):
    """`--print-config` (its --help says: every setting, with its help) is YAML with the help as comments, and it
    loads back as the same config; `label=path` as a bare argument of `iopo eval` names a model."""
    import yaml

    from iopo.config import EvalConfig, load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    judge = ["judges.rm.type=reward_model", "judges.rm.model=run"]
    assert main(["eval", "mine=run", "run", *judge, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "# Models to evaluate" in printed and "# 0 = greedy" in printed
    data = yaml.safe_load(printed)
    assert data["models"] == ["mine=run", "run"] and data["judges"]["rm"]["type"] == "reward_model"
    (tmp_path / "printed.yaml").write_text(printed)
    again = load_config(tmp_path / "printed.yaml", [], EvalConfig)
    assert again == load_config(None, ['models=["mine=run", "run"]', *judge], EvalConfig)
    # a key that is a setting stays an override, and an unknown one is still refused in one line
    assert main(["eval", "run", "baseline=run", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["baseline"] == "run"
    assert main(["eval", "run", "modell.x=run", "--print-config"]) == 2


def test_the_python_api_example_runs(tmp_path, tiny_model_dir):
    """docs/examples/python_api.py, the Python API's documented example, run as a user would (on the tiny model):
    two trainings from configs built in code, one evaluation, results read as objects, the export loaded."""
    import os
    import subprocess
    import sys

    from tiny import write_pairs

    env = {
        **os.environ,
        "IOPO_EXAMPLE_MODEL": str(tiny_model_dir),
        "IOPO_EXAMPLE_DATA": str(write_pairs(tmp_path / "pairs.jsonl", n=24)),
        "IOPO_EXAMPLE_OUT": str(tmp_path / "api"),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    script = ROOT / "docs" / "examples" / "python_api.py"
    done = subprocess.run(
        [sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "iopo: margin reward" in out and "dpo: margin reward" in out
    assert len(re.findall(r"^eval .*: pairwise accuracy", out, re.M)) == 2 and "LlamaForCausalLM" in out
    assert (tmp_path / "api" / "iopo" / "final" / "README.md").is_file()
