"""Run folders (iopo.runfolder): a user's folder is never written into, and in its own folder a fresh start
deletes only what iopo wrote there, and only with overwrite=true."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from iopo.config import ConfigError
from iopo.io import runfolder
from iopo.io.checkpoint import TRAIN_PLACES

from tiny import run_iopo as iopo
from tiny import run_overrides, write_pairs


def snapshot(folder):
    """Every file's bytes (the lock's note aside: it names whichever process held the folder last)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != runfolder.LOCK
    }


def lightning_folder(path):
    """The layout of many tools' run folders (a LightningCLI log folder): config.yaml beside checkpoints/."""
    (path / "checkpoints").mkdir(parents=True)
    (path / "config.yaml").write_text("trainer:\n  max_epochs: 3\nmodel:\n  lr: 0.001\n")
    (path / "checkpoints" / "epoch=2-step=300.ckpt").write_bytes(b"weights of a week")
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    (path / "final").mkdir()
    (path / "final" / "model.safetensors").write_bytes(b"someone else's model")
    return path


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_of_another_tool_is_never_written_into(tmp_path, tiny_model_dir, overwrite):
    data = write_pairs(tmp_path / "pairs.jsonl")
    mine = lightning_folder(tmp_path / "lightning_logs" / "version_0")
    before = snapshot(mine)
    extra = ["overwrite=true"] if overwrite else []
    done = iopo("train", *run_overrides(tiny_model_dir, data, mine, "iopo.n_iter=1", *extra))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert "not an iopo run folder" in done.stderr and "checkpoints" in done.stderr
    assert snapshot(mine) == before and not (mine / runfolder.MARKER).exists()


def test_a_config_yaml_that_is_not_iopos_does_not_make_a_folder_iopos(tmp_path):
    folder = lightning_folder(tmp_path / "run")
    assert not runfolder.is_iopo_run(folder)
    # An iopo run from before the marker: its config validates as an iopo config.
    older = tmp_path / "older"
    older.mkdir()
    (older / "config.yaml").write_text("method: dpo\nloss:\n  beta: 0.2\n")
    (older / "metrics.jsonl").write_text('{"step": 1}\n')
    assert runfolder.is_iopo_run(older)
    (older / "metrics.jsonl").unlink()  # a config alone is no run
    assert not runfolder.is_iopo_run(older)


def test_a_fresh_start_in_iopos_own_folder_deletes_only_what_iopo_wrote(tmp_path, tiny_model_dir):
    data = write_pairs(tmp_path / "pairs.jsonl")
    run = tmp_path / "run"
    args = run_overrides(tiny_model_dir, data, run, "iopo.n_iter=1", "tensorboard=true")
    assert iopo("train", *args).returncode == 0
    marker = json.loads((run / runfolder.MARKER).read_text())
    assert "model.safetensors" in marker["exports"]["final"]
    # A person's files beside and inside iopo's places.
    notes = {
        "notes.txt": b"my notes",
        "checkpoints/README": b"where I keep my own checkpoints",
        "checkpoints/mine.ckpt": b"my checkpoint",
        "final/USAGE.md": b"how I use this model",
        "tensorboard/my-plot.png": b"png",
    }
    for name, content in notes.items():
        (run / name).write_bytes(content)
    before = snapshot(run)

    # Without overwrite=true a fresh start that would delete anything is refused, in one line, touching nothing.
    again = iopo("train", *args)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "overwrite=true" in again.stderr
    assert snapshot(run) == before

    # With it, iopo's own files are replaced and the person's stay, byte for byte.
    redo = iopo("train", *args, "overwrite=true", "seed=7")
    assert redo.returncode == 0, redo.stderr[-2000:]
    after = snapshot(run)
    for name, content in notes.items():
        assert after[name] == content, name
    assert after["final/model.safetensors"] != before["final/model.safetensors"]  # seed 7's model
    assert "seed: 7" in (run / "config.yaml").read_text()
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1  # the old event file went


def test_resume_without_a_checkpoint_never_replaces_an_export(tmp_path):
    run = tmp_path / "run"
    runfolder.mark(run)
    (run / "final").mkdir()
    (run / "final" / "model.safetensors").write_bytes(b"finished")
    from iopo.config import TrainConfig
    from iopo.io.checkpoint import resolve_resume

    cfg = TrainConfig(output_dir=str(run), resume=True)
    with pytest.raises(ConfigError, match="already holds an earlier run"):
        resolve_resume(cfg)
    # the traces of a run killed before its first checkpoint may go
    (run / "final" / "model.safetensors").unlink()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert resolve_resume(cfg) is None


def test_clean_removes_only_listed_files_and_the_folders_left_empty(tmp_path):
    run = tmp_path / "run"
    runfolder.mark(run)
    (run / "checkpoints" / "step-0000001").mkdir(parents=True)
    (run / "checkpoints" / "step-0000001" / "trainer_state.json").write_text("{}")
    (run / "checkpoints" / ".tmp-step-0000002").mkdir()
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1.host").write_text("x")
    (run / "final" / "protagonist").mkdir(parents=True)
    (run / "final" / "protagonist" / "adapter_model.safetensors").write_text("x")
    runfolder.record_export(run, run / "final")
    (run / "final" / "mine.txt").write_text("kept")
    doomed = runfolder.fresh_start(run, TRAIN_PLACES, [], overwrite=True)
    runfolder.clean(run, doomed)
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert left == [runfolder.MARKER, "final", "final/mine.txt"]


def test_an_input_inside_what_a_fresh_start_deletes_is_refused(tmp_path):
    run = tmp_path / "run"
    runfolder.mark(run)
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    runfolder.record_export(run, run / "final")
    with pytest.raises(ConfigError, match="lies in"):
        runfolder.fresh_start(run, TRAIN_PLACES, [str(run / "final")], overwrite=True)


# ---------------------------------------------------------------- one process per folder (item 2)


def test_a_folder_in_use_is_refused_naming_the_holder_and_a_killed_holder_holds_nothing(
    tmp_path, tiny_model_dir
):
    data = write_pairs(tmp_path / "pairs.jsonl")
    run = tmp_path / "run"
    args = run_overrides(tiny_model_dir, data, run, "iopo.n_iter=1")
    with runfolder.hold(run, "iopo train (a test)"):
        runfolder.mark(run)  # an iopo folder another process works in
        before = snapshot(run)
        refused = iopo("train", *args)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr[-2000:]
        assert f"in use by another iopo process (pid {os.getpid()}, `iopo train (a test)`" in refused.stderr
        assert snapshot(run) == before  # nothing touched: no config.yaml, no metrics
    # A holder killed with -9 leaves its lock file behind, but the kernel has dropped the lock itself.
    code = f"import sys, time\nfrom pathlib import Path\nfrom iopo.io import runfolder\nrunfolder.hold(Path({str(run)!r}), 'doomed')\nprint('held', flush=True)\ntime.sleep(60)\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "held"
    assert "doomed" in iopo("train", *args).stderr
    holder.kill()
    holder.wait()
    done = iopo("train", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "final" / "model.safetensors").is_file() and (run / runfolder.LOCK).is_file()


def test_two_trainings_started_into_one_folder_leave_one_run_that_its_config_describes(
    tmp_path, tiny_model_dir
):
    """The second `iopo train` into a folder the first is training in is refused before it touches anything:
    the folder's config.yaml stays the first's (seed 1), and metrics.jsonl has each step once."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    run = tmp_path / "run"
    first = run_overrides(tiny_model_dir, data, run, "iopo.n_iter=300", "seed=1", "eval_at_end=false")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "iopo", "train", *first], env=env, stderr=subprocess.PIPE, text=True
    )
    for _ in range(600):  # until the first holds the folder
        if (run / "metrics.jsonl").is_file() or proc.poll() is not None:
            break
        time.sleep(0.05)
    second = iopo(
        "train", *run_overrides(tiny_model_dir, data, run, "iopo.n_iter=1", "seed=2", "overwrite=true")
    )
    first_was_running = proc.poll() is None
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    assert first_was_running  # else this proves nothing: the first run must still be training
    assert second.returncode == 2 and f"(pid {proc.pid}, `iopo train`" in second.stderr, second.stderr[-2000:]
    assert "seed: 1" in (run / "config.yaml").read_text()
    steps = [
        r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "agent" in r
    ]
    assert steps == list(range(1, 601))


def test_an_eval_folder_in_use_is_refused_before_anything_is_asked(tmp_path, tiny_model_dir):
    ev = tmp_path / "ev"
    with runfolder.hold(ev, "iopo rate (a test)", what="eval folder"):
        done = iopo("eval", str(tiny_model_dir), f"output_dir={ev}", "progress_bar=false")
        assert done.returncode == 2 and "in use by another iopo process" in done.stderr
        assert sorted(p.name for p in ev.iterdir()) == [runfolder.LOCK]


# ---------------------------------------------------------------- torn and lost files (item 3)


def test_a_torn_metrics_line_and_a_lost_reference_cache_do_not_stop_a_resume(tmp_path, tiny_model_dir):
    """A kill -9 can cut metrics.jsonl's last line mid-write, and the starting model's test log-probs
    (eval_reference_logps.pt) are a cache: truncated or deleted, the resumed run computes them again from the
    starting weights and ends where the uninterrupted run ends."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    common = ["iopo.n_iter=2", "save_steps=1", "save_total_limit=4", "eval_steps=2"]
    straight = tmp_path / "straight"
    assert iopo("train", *run_overrides(tiny_model_dir, data, straight, *common)).returncode == 0
    expected = json.loads((straight / "eval.json").read_text())
    for damage in ("truncate", "delete"):
        run = tmp_path / damage
        args = run_overrides(tiny_model_dir, data, run, *common)
        assert iopo("train", *args).returncode == 0
        for name in ("step-0000004", "step-0000003"):  # back to step 2, as a kill would have left it
            shutil.rmtree(run / "checkpoints" / name)
        with (run / "metrics.jsonl").open("a") as f:
            f.write('{"step": 3, "loss": 0.69')  # the tail a kill cut
        ref = run / "eval_reference_logps.pt"
        if damage == "truncate":
            ref.write_bytes(ref.read_bytes()[:100])
        else:
            ref.unlink()
        resumed = iopo("train", *args, "resume=true")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "dropped 1 unreadable line" in resumed.stdout
        assert "computing the starting model's test log-probs again" in resumed.stdout
        result = json.loads((run / "eval.json").read_text())
        assert result["margins"] == expected["margins"]
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(steps) and len([s for s in steps if s == 3]) == 1


# ---------------------------------------------------------------- inputs checked before any folder (item 4)


def test_bad_inputs_are_refused_before_the_run_folder_is_made(tmp_path, tiny_model_dir):
    data = write_pairs(tmp_path / "pairs.jsonl")
    run = tmp_path / "run"
    bad_model = iopo("train", *run_overrides(tmp_path / "no-model", data, run))
    assert bad_model.returncode == 2 and not run.exists(), bad_model.stderr[-2000:]
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    assert iopo("train", *run_overrides(not_a_model, data, run)).returncode == 2 and not run.exists()
    columns = iopo("train", *run_overrides(tiny_model_dir, data, run, "data.columns={chosen: answer.0}"))
    assert columns.returncode == 2 and "answer" in columns.stderr and not run.exists()
    rm = iopo("train-rm", f"model={tmp_path / 'nope'}", f"data={data}", f"output_dir={run}")
    assert rm.returncode == 2 and not run.exists()
    online = [
        f"model={tiny_model_dir}",
        f"data={data}",
        f"output_dir={run}",
        "method=iter_dpo",
        "rounds=1",
        "steps_per_round=1",
        "judge.type=reward_model",
        f"judge.model={tmp_path / 'no-rm'}",
        "progress_bar=false",
    ]
    refused = iopo("online", *online)
    assert refused.returncode == 2 and "no-rm" in refused.stderr and not run.exists(), refused.stderr[-2000:]
    # the corrected command is not taken for "an online run with other settings": there is no run yet
    fixed = [a for a in online if not a.startswith("judge.")] + [
        "method=dpo",
        "score_prompts=0",
        "data.max_length=64",
        "data.max_prompt_length=32",
        "data.test_size=4",
    ]
    done = iopo("online", *fixed)
    assert done.returncode == 0, done.stderr[-2000:]
    ev = tmp_path / "ev"
    judged = iopo(
        "eval",
        str(tiny_model_dir),
        f"output_dir={ev}",
        "judges.rm.type=reward_model",
        f"judges.rm.model={tmp_path / 'no-rm'}",
    )
    assert judged.returncode == 2 and not ev.exists()
