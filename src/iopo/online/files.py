"""The files that join an online run's stages: each round's folder, its manifest (what the round used, which of
its stages are finished, with their seconds) and the answers read back from a finished generation file."""

from __future__ import annotations

import json
from pathlib import Path

from iopo.config import ConfigError
from iopo.io.checkpoint import sha256_file
from iopo.io.jsonio import read_jsonl, write_json


def file_hash(path: Path) -> str:
    return sha256_file(path)[:16]


def answers_of(path: Path, prompts: list[dict], n: int) -> list[dict]:
    """The answers of a finished generation file in prompt order, n per prompt (the file holds one model's)."""
    by_prompt = {(r["prompt_id"], r["sample"]): r for r in read_jsonl(path)}
    missing = [(p["prompt_id"], j) for p in prompts for j in range(n) if (p["prompt_id"], j) not in by_prompt]
    if missing:
        raise ConfigError(f"{path} lacks {len(missing)} answers (first: prompt {missing[0][0]}); start over")
    return [by_prompt[p["prompt_id"], j] for p in prompts for j in range(n)]


def round_dir(run: Path, k: int) -> Path:
    return run / f"round_{k}"


class Manifest:
    """round_k/manifest.json: what the round used and which of its stages are finished (with their seconds)."""

    def __init__(self, folder: Path, base):
        """`base` (a callable, so nothing is computed for a finished round) gives a new manifest's facts."""
        self.path = folder / "manifest.json"
        folder.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
        else:
            self.data = {**base(), "stages": {}}
            self.save()

    def done(self, stage: str) -> bool:
        return bool(self.data["stages"].get(stage, {}).get("done"))

    def finish(self, stage: str, seconds: float, **facts) -> None:
        self.data["stages"][stage] = {"done": True, "seconds": seconds, **facts}
        self.save()

    def set(self, **facts) -> None:
        self.data.update(facts)
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)
