"""The `iopo` command end to end on a tiny model: files written, one-line errors, refusal to overwrite finished work."""

import json
import os
import subprocess
import sys

import pytest

from tiny import run_iopo as iopo
from tiny import run_overrides, write_pairs


def base_args(tmp_path, model_dir, data):
    return run_overrides(
        model_dir, data, tmp_path / "run", "optim.learning_rate=1e-3", "iopo.n_iter=1", "tensorboard=true"
    )


def test_cli_trains_exports_and_evaluates(tmp_path, tiny_model_dir):
    data = write_pairs(tmp_path / "pairs.jsonl")
    done = iopo("train", *base_args(tmp_path, tiny_model_dir, data))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "margin reward" in done.stdout and "pairwise accuracy" in done.stdout
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "eval.json",
        "final/config.json",
        "final/model.safetensors",
        "final/tokenizer.json",
        "checkpoints/step-0000002/trainer_state.json",
    ):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert not (run / "rejects.jsonl").exists()  # user data without bad rows
    assert json.loads((run / "eval.json").read_text())["n_pairs"] == 4

    # Running again into the same folder would lose the finished run: refused with one line.
    again = iopo("train", *base_args(tmp_path, tiny_model_dir, data))
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "resume=true" in again.stderr

    # resume=true on a finished run: nothing left to train, exports and evaluates again, reading the policy's test
    # log-probs that the first run kept for these weights (the same metrics, nothing computed twice).
    first = json.loads((run / "eval.json").read_text())
    resumed = iopo("train", *base_args(tmp_path, tiny_model_dir, data), "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    again_eval = json.loads((run / "eval.json").read_text())
    assert {k: again_eval[k] for k in ("margin_reward", "pairwise_accuracy")} == {
        k: first[k] for k in ("margin_reward", "pairwise_accuracy")
    }
    # read, not computed: plant chosen = rejected + 5 in the kept file of the final weights, resume once more
    import torch

    kept = max((run / "logps").glob("*.pt"), key=lambda p: p.stat().st_mtime_ns)
    logps = torch.load(kept, weights_only=True)
    logps["chosen_logps"] = logps["rejected_logps"] + 5.0
    torch.save(logps, kept)
    ref = torch.load(run / "eval_reference_logps.pt", weights_only=True)
    planted = iopo("train", *base_args(tmp_path, tiny_model_dir, data), "resume=true")
    assert planted.returncode == 0, planted.stderr[-2000:]
    margins = 0.5 * (5.0 - (ref["chosen_logps"] - ref["rejected_logps"]))  # loss.beta=0.5
    assert json.loads((run / "eval.json").read_text())["margin_reward"] == pytest.approx(
        float(margins.mean()), abs=1e-5
    )


def test_cli_bad_row_is_one_line_naming_file_row_field(tmp_path, tiny_model_dir):
    data = write_pairs(tmp_path / "pairs.jsonl")
    lines = data.read_text().splitlines()
    row = json.loads(lines[5])
    row["rejected"] = row["chosen"]
    lines[5] = json.dumps(row)
    data.write_text("\n".join(lines) + "\n")
    done = iopo("train", *base_args(tmp_path, tiny_model_dir, data))
    assert done.returncode == 2
    message = done.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert str(data) in message and "line 6" in message and "rejected" in message  # lines counted from 1

    skipped = iopo("train", *base_args(tmp_path, tiny_model_dir, data), "data.skip_invalid=true")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    rejects = [json.loads(x) for x in (tmp_path / "run" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["line"] == 6
    assert '"rejected": 1' in skipped.stdout


def test_cli_missing_data_file(tmp_path, tiny_model_dir):
    done = iopo("train", *base_args(tmp_path, tiny_model_dir, tmp_path / "nope.jsonl"))
    assert done.returncode == 2 and "nope.jsonl" in done.stderr and "Traceback" not in done.stderr


def test_cli_unloadable_model_is_one_line(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    done = iopo(
        "train", f"model={tmp_path / 'no-such-model'}", f"data={data}", f"output_dir={tmp_path / 'run'}"
    )
    assert done.returncode == 2 and not (tmp_path / "run").exists()  # refused before the folder is made
    assert done.stderr.startswith("iopo: error: cannot load model")
    assert "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0


def test_iopo_help_lists_every_command():
    done = iopo("--help")
    assert done.returncode == 0
    for command in ("train", "train-rm", "generate", "eval", "plot", "report"):
        assert command in done.stdout
    shown = iopo(
        "eval", "runs/a", "runs/b", "judges.rm.type=reward_model", "judges.rm.model=rm", "--print-config"
    )
    assert shown.returncode == 0, shown.stderr
    assert "- runs/a\n- runs/b" in shown.stdout and "type: reward_model" in shown.stdout


def test_plots_and_reports_never_import_torch():
    code = (
        "import sys, iopo.report.plots, iopo.report.markdown, iopo.core.stats; print('torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_iopo_never_cleans_a_folder_it_does_not_own(tmp_path, tiny_model_dir):
    data = write_pairs(tmp_path / "pairs.jsonl")
    mine = tmp_path / "my-stuff"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "eval.json").write_text("{}")  # a name iopo also writes: still not iopo's
    args = run_overrides(tiny_model_dir, data, mine, "iopo.n_iter=1", "overwrite=true")
    done = iopo("train", *args)
    assert done.returncode == 2 and "not an iopo run folder" in done.stderr and "thesis.tex" in done.stderr
    assert (mine / "thesis.tex").read_text() == "years of work" and (mine / "eval.json").read_text() == "{}"

    # A run's own folder is marked, and its inputs are never deleted by a fresh run into it.
    run = tmp_path / "run"
    assert iopo("train", *run_overrides(tiny_model_dir, data, run, "iopo.n_iter=1")).returncode == 0
    assert (run / ".iopo-run").is_file()
    again = iopo("train", *run_overrides(run / "final", data, run, "iopo.n_iter=1", "overwrite=true"))
    assert again.returncode == 2 and "lies in" in again.stderr
    assert (run / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("output_dir=", "must name a folder"),
        ("output_dir=runs/{name}", "no other braces"),
        ("output_dir=  ", "must name"),
    ],
)
def test_output_dir_must_be_a_plain_folder_name(value, message):
    done = iopo("train", value, "--print-config")
    assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1
