"""The eval folder's SQLite store (WAL): generations, judgments and the cost ledger, written as each arrives.

A judgment is keyed by the judge's identity (type, model, settings that change its replies), the kind of question
(one pairwise order, or a 0-3 / reward score) and the exact texts, so a crashed or repeated eval finds what was
already paid for and asks again only for what is missing. The ledger has one row per fetched judgment (or failed
attempt) with its requests, tokens, seconds and money; per-session sums show what this invocation cost.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    key TEXT PRIMARY KEY, model TEXT, fingerprint TEXT, settings TEXT, prompt_id TEXT, sample INTEGER,
    prompt TEXT, answer TEXT, finish_reason TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, created REAL
);
CREATE TABLE IF NOT EXISTS judgments (
    key TEXT PRIMARY KEY, judge TEXT, judge_id TEXT, kind TEXT, prompt TEXT, answer_a TEXT, answer_b TEXT,
    result TEXT, valid INTEGER, created REAL
);
CREATE TABLE IF NOT EXISTS ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT, session TEXT, judge TEXT, kind TEXT, requests INTEGER,
    prompt_tokens INTEGER, completion_tokens INTEGER, seconds REAL, cost REAL, created REAL
);
"""


def text_key(*parts: Any) -> str:
    """A stable key for a tuple of JSON-able values (texts, settings)."""
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class Store:
    """One SQLite file per eval folder. Safe for several processes (WAL, busy timeout); use from one thread."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30.0)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- judgments

    def judgments(self, keys: list[str]) -> dict[str, dict]:
        """The stored results of these keys (missing keys are absent)."""
        out: dict[str, dict] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, result in self.db.execute(
                f"SELECT key, result FROM judgments WHERE key IN ({marks})", chunk
            ):
                out[key] = json.loads(result)
        return out

    def put_judgment(
        self,
        key: str,
        *,
        judge: str,
        judge_id: str,
        kind: str,
        prompt: str,
        answer_a: str,
        answer_b: str | None,
        result: dict,
        usage: dict,
        session: str,
    ) -> None:
        """Store one judgment and its ledger row in one transaction."""
        now = time.time()
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO judgments VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    key,
                    judge,
                    judge_id,
                    kind,
                    prompt,
                    answer_a,
                    answer_b,
                    json.dumps(result, ensure_ascii=False),
                    int(result.get("valid", True)),
                    now,
                ),
            )
            self._ledger_row(session, judge, kind, usage, now)

    def add_ledger(self, *, session: str, judge: str, kind: str, usage: dict) -> None:
        """A ledger row without a judgment (a request that failed for good still cost time and maybe money)."""
        with self.db:
            self._ledger_row(session, judge, kind, usage, time.time())

    def _ledger_row(self, session: str, judge: str, kind: str, usage: dict, now: float) -> None:
        self.db.execute(
            "INSERT INTO ledger (session, judge, kind, requests, prompt_tokens, completion_tokens, seconds, "
            "cost, created) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                session,
                judge,
                kind,
                int(usage.get("requests", 0)),
                int(usage.get("prompt_tokens", 0)),
                int(usage.get("completion_tokens", 0)),
                float(usage.get("seconds", 0.0)),
                float(usage.get("cost", 0.0)),
                now,
            ),
        )

    def ledger(self, session: str | None = None) -> dict[str, dict]:
        """{judge: {requests, prompt_tokens, completion_tokens, seconds, cost, judgments}} for one session or all."""
        where, args = ("WHERE session = ?", (session,)) if session else ("", ())
        rows = self.db.execute(
            "SELECT judge, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(seconds), SUM(cost), "
            f"COUNT(*) FROM ledger {where} GROUP BY judge ORDER BY judge",
            args,
        )
        keys = ("requests", "prompt_tokens", "completion_tokens", "seconds", "cost", "judgments")
        return {judge: dict(zip(keys, values, strict=True)) for judge, *values in rows}

    # --- generations

    def put_generations(self, records: list[dict]) -> None:
        """Mirror generation records (the JSON Lines files stay the primary copy) for the report and rating page."""
        with self.db:
            self.db.executemany(
                "INSERT OR IGNORE INTO generations VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        r["key"],
                        r["model"],
                        r["model_fingerprint"],
                        json.dumps(r["settings"], sort_keys=True),
                        r["prompt_id"],
                        r["sample"],
                        json.dumps(r["prompt"], ensure_ascii=False),
                        r["answer"],
                        r["finish_reason"],
                        r["prompt_tokens"],
                        r["completion_tokens"],
                        r.get("created", time.time()),
                    )
                    for r in records
                ],
            )

    def count(self, table: str) -> int:
        if table not in ("generations", "judgments", "ledger"):
            raise ValueError(table)
        return self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
