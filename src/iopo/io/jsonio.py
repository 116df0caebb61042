"""JSON and JSON Lines files written atomically (temp file, fsync, rename): a kill leaves the old file or the new
one, never half of one. Used by the online rounds and the rating page's exports."""

from __future__ import annotations

import json
import os
from pathlib import Path

from iopo.core import stats


def write_json(path: Path, value) -> None:
    """Write JSON atomically (temp file, fsync, rename): a kill leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps(stats.json_safe(value), indent=2, ensure_ascii=False, allow_nan=False))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSON Lines file (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
