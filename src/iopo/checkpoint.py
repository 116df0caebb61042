"""Checkpoints: both players' weights (or adapters), optimizer and scheduler states, RNG states, data position and
the resolved config, written atomically (temp dir + rename) so a crash never leaves a half checkpoint behind."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from iopo.config import ConfigError, TrainConfig, changed_settings, dump_config

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"

# Settings that may differ between a run and its resumption without changing what is computed.
RESUME_FREE_KEYS = {
    "resume",
    "output_dir",  # a moved run folder resumes
    "overwrite",
    "progress_bar",
    "tensorboard",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "eval_batch_size",
    "eval_steps",
    "eval_at_end",
    "eval_reference_cache",
    "export",
    "merge_lora",
    # how FSDP holds the shards, not what is computed
    "distributed.fsdp_offload",
    "distributed.fsdp_reshard_after_forward",
    "distributed.fsdp_layers",
}
# A sharded (DCP) checkpoint is resharded on load: the per-process batch may change with the number of processes
# (the pairs per step over all processes, checked apart, may not).
RESHARD_FREE_KEYS = {"optim.batch_size"}


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temp folders of interrupted writes are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := CHECKPOINT_RE.match(p.name))
        and (p / STATE_FILE).is_file()  # a stray empty step folder is not one
    ]
    return [p for _, p in sorted(found)]


CHECKSUMS = "checksums.json"


def sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    """sha256 of every file of a checkpoint, written last (the checkpoint is complete when this file is)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    sums = {str(p.relative_to(folder)): sha256_file(p) for p in files}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1), encoding="utf-8")


def damage_of(folder: Path) -> str | None:
    """Why a checkpoint cannot be trusted (a missing, changed or truncated file), or None when it verifies.
    Checkpoints of an older iopo carry no checksums: they are taken as they are."""
    sums_file = folder / CHECKSUMS
    if not sums_file.is_file():
        return None
    try:
        sums = json.loads(sums_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{CHECKSUMS} is unreadable"
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != expected:
            return f"{name} does not match its checksum"
    return None


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start; refuses to overwrite finished work silently."""
    run_dir = cfg.run_dir
    if isinstance(cfg.resume, str) and cfg.resume.lower() not in ("true", "false"):
        path = Path(cfg.resume)
        if not (path / STATE_FILE).is_file():
            raise ConfigError(f"resume={cfg.resume}: not a checkpoint folder (no {STATE_FILE})")
        damage = damage_of(path)
        if damage is not None:
            raise ConfigError(f"resume={cfg.resume}: the checkpoint is damaged ({damage})")
        return path
    want = cfg.resume is True or (isinstance(cfg.resume, str) and cfg.resume.lower() == "true")
    existing = list_checkpoints(run_dir)
    if want and existing:
        damage = damage_of(existing[-1])
        if damage is None:
            return existing[-1]
        intact = next((p for p in reversed(existing[:-1]) if damage_of(p) is None), None)
        offer = (
            f"resume={intact} continues from the newest intact one"
            if intact
            else "no older intact one is left"
        )
        raise ConfigError(f"the newest checkpoint {existing[-1]} is damaged ({damage}); {offer}")
    inputs = [cfg.model.name_or_path, cfg.data.path, cfg.data.test_path]
    check_run_dir(run_dir, RUN_ARTIFACTS, inputs)  # a fresh start: may it write (and clean) here?
    started = existing or (run_dir / "metrics.jsonl").exists()
    if started and not (cfg.overwrite or want):  # want without checkpoints: nothing finished to lose
        what = f"checkpoints ({existing[-1].name})" if existing else "an earlier run (metrics.jsonl)"
        raise ConfigError(
            f"{run_dir} already holds {what}; "
            "pass resume=true to continue it, overwrite=true to start over, or another output_dir"
        )
    return None


RUN_MARKER = ".iopo-run"  # written into every run folder iopo starts: only such folders are ever cleaned


def is_iopo_run(run_dir: Path) -> bool:
    """A folder iopo started (its marker), or one an older iopo wrote (config.yaml beside its metrics/checkpoints)."""
    if (run_dir / RUN_MARKER).is_file():
        return True
    legacy = (run_dir / "metrics.jsonl").is_file() or (run_dir / "checkpoints").is_dir()
    return (run_dir / "config.yaml").is_file() and legacy


def check_run_dir(run_dir: Path, artifacts: tuple[str, ...], inputs: list[str | None]) -> None:
    """Refuse, in one line, a fresh run that would write into (and clean) a folder iopo does not own, or that would
    delete one of its own inputs (a model or data file inside the artifacts of an earlier run there)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} is a file, not a folder")
    if run_dir.is_dir() and not is_iopo_run(run_dir):
        found = sorted(p.name for p in run_dir.iterdir())
        if found:
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            raise ConfigError(
                f"output_dir {run_dir} is not an iopo run folder and not empty (it holds {shown}); iopo writes "
                "only into empty folders or its own runs: choose another output_dir"
            )
    for given in inputs:
        if not given or not Path(given).exists():
            continue
        where = Path(given).resolve()
        for name in artifacts:
            artifact = (run_dir / name).resolve()
            if where == artifact or artifact in where.parents:
                raise ConfigError(
                    f"'{given}' lies in {run_dir / name}, which a fresh run into {run_dir} replaces; copy it "
                    "elsewhere or choose another output_dir"
                )


def mark_run_dir(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / RUN_MARKER
    if not marker.is_file():
        marker.write_text(
            json.dumps({"written_by": "iopo", "note": "iopo cleans only folders with this file"}) + "\n"
        )


RUN_ARTIFACTS = (
    "checkpoints",
    "metrics.jsonl",
    "tensorboard",
    "eval.json",
    "eval_reference_logps.pt",
    "rejects.jsonl",
    "final",
)


def clear_artifacts(run_dir: Path, artifacts: tuple[str, ...]) -> None:
    """Delete an earlier run's own files and folders by name (check_run_dir has made sure the folder is iopo's)."""
    for name in artifacts:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def prepare_run_dir(run_dir: Path, resume_step: int | None) -> None:
    """Fresh start: clear an earlier run's artifacts (allowed by overwrite=true, checked in resolve_resume).
    Resume: drop the metrics logged after the checkpoint, which the resumed run logs again."""
    mark_run_dir(run_dir)
    if resume_step is None:
        clear_artifacts(run_dir, RUN_ARTIFACTS)
        return
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        kept = [
            line
            for line in metrics.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= resume_step
        ]
        metrics.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def check_resume_config(saved: dict, cfg: TrainConfig, sharded: bool = False) -> None:
    free = RESUME_FREE_KEYS | (RESHARD_FREE_KEYS if sharded else set())
    diffs = changed_settings(saved, cfg, free, then="checkpoint")
    if diffs:
        raise ConfigError("cannot resume with changed settings: " + "; ".join(diffs))


def rng_state() -> dict:
    """Every RNG's state in a form `torch.load(weights_only=True)` reads (tensors, ints, floats, strings, lists):
    loading a checkpoint never unpickles arbitrary objects."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state_file(path: Path):
    """torch.load with weights_only=True: tensors and plain containers only, never code. A file that needs more (an
    older iopo's RNG pickle, a tampered checkpoint) or cannot be read is one ConfigError naming it."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise ConfigError(f"checkpoint file {path} is missing") from None
    except pickle.UnpicklingError:
        raise ConfigError(
            f"{path} holds objects other than tensors and plain containers (an older iopo's RNG state, or a "
            "tampered file) and is not unpickled; start over with overwrite=true, or resume from a checkpoint "
            "this version wrote"
        ) from None
    except Exception as e:  # RuntimeError (damaged zip), EOFError (truncated), ...
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ConfigError(f"cannot load checkpoint file {path}: {reason}") from None


def begin_write(run_dir: Path, step: int) -> tuple[Path, Path]:
    """(temp folder to fill, final folder). The temp folder is renamed into place by `finish_write`."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    begin_folder(tmp)
    return tmp, final


def begin_folder(tmp: Path) -> None:
    """An empty temp folder for a checkpoint at a chosen place (the online rounds' round_k/checkpoint)."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def write_common(tmp: Path, cfg: TrainConfig, state: dict) -> None:
    (tmp / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")


def finish_write(tmp: Path, final: Path, keep: int | None) -> None:
    write_checksums(tmp)
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after resuming from it)
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep:
        for old in list_checkpoints(final.parent.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
