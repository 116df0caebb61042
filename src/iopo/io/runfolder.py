"""Run folders: where iopo may write, and what a fresh start may delete there.

The rules (README, "Folders"):
- iopo writes only into an empty folder or one it marked as its own (`.iopo-run`, written when it starts a run);
  a folder an older iopo wrote counts as its own only when its config.yaml validates as an iopo config.
- In its own folder a fresh start deletes only what iopo wrote there, piece by piece: its named files, its
  checkpoints (iopo.io.checkpoint names them), its TensorBoard event files, the files its exports listed in the
  marker. Each command says which places of its folder are its own (a dict of name -> the owner function here). Another file in
  any of those places stays, and a folder is removed only when it is left empty.
- When a fresh start would delete anything (the config and the marker aside), it needs `overwrite=true`.
- One process at a time: every command that writes a folder holds an exclusive lock on it (`hold`: flock on
  `.iopo-lock`) for its whole life; a second one is refused in one line naming the holder's PID before it touches
  anything. The kernel drops the lock of a process that dies, killed or not: a stale lock file is no lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from iopo.config import ConfigError, EvalConfig, OnlineConfig, TrainConfig, TrainRMConfig

MARKER = ".iopo-run"
LOCK = ".iopo-lock"  # flocked by the process that works in the folder; its content names that process
_EVENTS_RE = re.compile(r"^events\.out\.tfevents\.")
# What save_pretrained (model, tokenizer, peft adapter) writes: the export's files when a run's marker predates
# the export ledger.
_EXPORT_RE = re.compile(
    r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
    r"pytorch_model.*\.bin|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|chat_template\.(jinja|json)|"
    r"vocab\.json|merges\.txt|added_tokens\.json|tokenizer\.model|adapter_config\.json|adapter_model\.safetensors|"
    r"README\.md)$"
)
# Files that describe a run but hold no finished work: replacing them needs no overwrite=true.
_NOT_WORK = {MARKER, LOCK, "config.yaml"}


# ---------------------------------------------------------------- what iopo wrote, by kind of place


def own_file(path: Path) -> list[Path]:
    """A file iopo writes under a fixed name."""
    return [path] if path.is_file() or path.is_symlink() else []


def own_events(folder: Path) -> list[Path]:
    """TensorBoard's event files inside `folder`."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and _EVENTS_RE.match(p.name))


_LOGPS_RE = re.compile(r"^[0-9a-f]{32}\.(pt|tmp\d+)$")


def own_logps(folder: Path) -> list[Path]:
    """The kept log-probs files in `folder` (iopo.engine.refcache: <key>.pt, and a killed write's <key>.tmpPID)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and _LOGPS_RE.match(p.name))


def own_folder(folder: Path) -> list[Path]:
    """A folder whose whole content is iopo's format (an online round's checkpoint)."""
    return [folder] if folder.is_dir() else []


def own_export(folder: Path) -> list[Path]:
    """The files an export wrote into `folder`, as its run's marker lists them (else save_pretrained's names)."""
    if not folder.is_dir():
        return []
    listed = read_marker(folder.parent).get("exports", {}).get(folder.name)
    if listed is not None:
        return [folder / name for name in listed if (folder / name).is_file()]
    found = []
    for path in sorted(folder.rglob("*")):
        depth = len(path.relative_to(folder).parts)
        if path.is_file() and depth <= 2 and _EXPORT_RE.match(path.name):
            found.append(path)
    return found


def own_files_named(names: tuple[str, ...]) -> Callable[[Path], list[Path]]:
    """A folder iopo fills with files of these names (an online round, the start folder)."""

    def owned(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        found = [folder / n for n in names if (folder / n).is_file()]
        found += [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
        return found

    return owned


def owned_paths(run_dir: Path, places: dict[str, Callable[[Path], list[Path]]]) -> list[Path]:
    """Everything iopo wrote in `run_dir` under these places."""
    found: list[Path] = []
    for name, kind in places.items():
        found += kind(run_dir / name)
    return found


# ---------------------------------------------------------------- the marker


def read_marker(run_dir: Path) -> dict:
    try:
        found = json.loads((run_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _write_marker(run_dir: Path, content: dict) -> None:
    tmp = run_dir / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")
    tmp.replace(run_dir / MARKER)


def mark(run_dir: Path) -> None:
    """Make `run_dir` (if needed) and mark it as iopo's."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / MARKER).is_file():
        _write_marker(
            run_dir,
            {"written_by": "iopo", "note": "iopo deletes only what it wrote in folders with this file"},
        )


def record_export(run_dir: Path, folder: Path) -> None:
    """List the files an export just wrote into `folder` (under `run_dir`) in the run's marker."""
    content = read_marker(run_dir) or {"written_by": "iopo"}
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    content.setdefault("exports", {})[folder.name] = files
    _write_marker(run_dir, content)


_RUN_SCHEMAS = (TrainConfig, OnlineConfig, TrainRMConfig, EvalConfig)


def _older_iopo_run(run_dir: Path) -> bool:
    """A folder an iopo from before the marker wrote: its config.yaml validates as one of iopo's configs, and it
    holds a run's traces (metrics, a checkpoint, an evaluation)."""
    traces = ("metrics.jsonl", "eval.json")
    if not any((run_dir / t).is_file() for t in traces) and not (run_dir / "checkpoints").is_dir():
        return False
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    if not isinstance(saved, dict):
        return False
    for schema in _RUN_SCHEMAS:
        try:
            schema.model_validate(saved)
            return True
        except ValueError:
            continue
    return False


def is_iopo_run(run_dir: Path) -> bool:
    """A folder iopo started (its marker), or one an older iopo wrote (see `_older_iopo_run`)."""
    return (run_dir / MARKER).is_file() or (run_dir.is_dir() and _older_iopo_run(run_dir))


# ---------------------------------------------------------------- the checks and the fresh start


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_writable(run_dir: Path, what: str = "output_dir") -> None:
    """Refuse, in one line, a folder iopo may not write into: a file, or a folder that is neither empty nor iopo's."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{what} {run_dir} is a file, not a folder")
    if run_dir.is_dir() and not is_iopo_run(run_dir):
        found = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)
        if found:
            raise ConfigError(
                f"{what} {run_dir} is not an iopo run folder and not empty (it holds {_shown(found)}); iopo writes "
                "only into empty folders or its own runs: choose another output_dir"
            )


def check_inputs(run_dir: Path, doomed: list[Path], inputs: list[str | None]) -> None:
    """Refuse a fresh start that would delete one of its own inputs (a model or data file an earlier run wrote)."""
    for given in inputs:
        if not given or not Path(given).exists():
            continue
        where = Path(given).resolve()
        for path in doomed:
            target = path.resolve()
            if where == target or target in where.parents or (where.is_dir() and where in target.parents):
                raise ConfigError(
                    f"'{given}' lies in {path.parent if path.is_file() else path}, which a fresh run into {run_dir} "
                    "replaces; copy it elsewhere or choose another output_dir"
                )


def fresh_start(
    run_dir: Path,
    places: dict[str, Callable[[Path], list[Path]]],
    inputs: list[str | None],
    overwrite: bool,
    hint: str = "pass resume=true to continue it, overwrite=true to start over, or another output_dir",
) -> list[Path]:
    """Check that a fresh run may start in `run_dir` and return what it would delete there (nothing is deleted
    yet: `clean` does it once every other check has passed)."""
    check_writable(run_dir)
    if not run_dir.is_dir():
        return []
    doomed = owned_paths(run_dir, places)
    check_inputs(run_dir, doomed, inputs)
    work = [p for p in doomed if p.name not in _NOT_WORK or p.parent != run_dir]
    if work and not overwrite:
        names = sorted({str(p.relative_to(run_dir)) for p in work})
        raise ConfigError(f"{run_dir} already holds an earlier run ({_shown(names)}); {hint}")
    return doomed


def clean(run_dir: Path, doomed: list[Path]) -> None:
    """Delete what `fresh_start` listed, then the folders that are left empty (never run_dir itself)."""
    parents = set()
    for path in doomed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        parents.update(p for p in path.parents if run_dir in p.parents)
    for folder in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


# ---------------------------------------------------------------- one process per folder


class RunLock:
    """The exclusive lock of a folder, held from `hold` until `release` (or the process's end)."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold(run_dir: Path, command: str, what: str = "output_dir") -> RunLock:
    """Lock `run_dir` for this process (made if missing; only a folder iopo may write into), or refuse in one line
    naming the process that holds it. Release it when the command ends (`with hold(...)`)."""
    check_writable(run_dir, what)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _holder(fd)
        os.close(fd)
        raise ConfigError(
            f"{run_dir} is in use by another iopo process ({holder}); wait for it to end, or choose another "
            f"{what}"
        ) from None
    os.ftruncate(fd, 0)
    note = {"pid": os.getpid(), "command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.pwrite(fd, (json.dumps(note) + "\n").encode(), 0)
    return RunLock(fd, path)


def _holder(fd: int) -> str:
    """Who holds a lock, as its file says (the holder writes it right after locking)."""
    for _ in range(20):  # the holder may not have written its note yet
        try:
            note = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
            return f"pid {note['pid']}, `{note['command']}` since {note['since']}"
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            time.sleep(0.05)
    return "pid unknown"
