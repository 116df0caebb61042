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

from iopo import runfolder
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
    # A fresh start: may it write here, and may it delete what an earlier run there wrote? resume=true with no
    # checkpoint to resume may replace the traces of a run killed before its first one, never an export.
    inputs = [cfg.model.name_or_path, cfg.data.path, cfg.data.test_path]
    unfinished = (
        want and not runfolder.own_export(run_dir / "final") and not (run_dir / "eval.json").is_file()
    )
    runfolder.fresh_start(run_dir, runfolder.TRAIN_PLACES, inputs, cfg.overwrite or unfinished)
    return None


def prepare_run_dir(run_dir: Path, resume_step: int | None) -> None:
    """Fresh start: delete what an earlier run there wrote (resolve_resume has checked that it may).
    Resume: drop the metrics logged after the checkpoint, which the resumed run logs again."""
    runfolder.mark(run_dir)
    if resume_step is None:
        runfolder.clean(run_dir, runfolder.owned_paths(run_dir, runfolder.TRAIN_PLACES))
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
