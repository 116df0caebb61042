"""Run folders (iopo.runfolder): a user's folder is never written into, and in its own folder a fresh start
deletes only what iopo wrote there, and only with overwrite=true."""

import json
import os
import subprocess
import sys

import pytest

from iopo.config import ConfigError
from iopo.io import runfolder
from iopo.io.checkpoint import TRAIN_PLACES

from tiny import run_overrides, write_pairs


def iopo(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-m", "iopo", *args], capture_output=True, text=True, env=env, timeout=300
    )


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


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
