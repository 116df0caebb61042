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


def judgment_key(judge_id: str, kind: str, prompt, answer_a: str, answer_b: str | None) -> str:
    """The key of one judgment in the store: the judge's identity, the kind of question and the exact texts."""
    return text_key(judge_id, kind, prompt, answer_a, answer_b)


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


# ---------------------------------------------------------------- the rating tables (`iopo rate`)

RATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS rate_meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS rate_items (
    item TEXT PRIMARY KEY, model TEXT, baseline TEXT, prompt_id TEXT, sample INTEGER, prompt TEXT,
    model_answer TEXT, baseline_answer TEXT, created REAL
);
CREATE TABLE IF NOT EXISTS rate_ratings (
    id INTEGER PRIMARY KEY AUTOINCREMENT, rater TEXT, item TEXT, left_side TEXT, score_model INTEGER,
    score_baseline INTEGER, preference TEXT, skipped INTEGER, seconds REAL, created REAL
);
CREATE TABLE IF NOT EXISTS rate_claims (rater TEXT, item TEXT, claimed REAL, PRIMARY KEY (rater, item));
"""
# Each rater's newest row per pair: (id, rater, item, left_side, score_model, score_baseline, preference, skipped,
# seconds, created).
_LATEST = """
SELECT r.id, r.rater, r.item, r.left_side, r.score_model, r.score_baseline, r.preference, r.skipped, r.seconds,
       r.created
FROM rate_ratings r JOIN (SELECT MAX(id) AS id FROM rate_ratings GROUP BY rater, item) m ON r.id = m.id
"""


class RatingTables:
    """The rating tables of an eval folder's store.sqlite: the pairs offered, every rating as it is submitted (a
    rater's newest row for a pair counts), the holds on pairs shown to a rater, and the page's secret.

    Thread-safe: one connection (WAL) behind a reentrant lock; hold `lock` around several calls that must see one
    state (find the next pair and claim it)."""

    def __init__(self, path: str | Path):
        import secrets
        import threading

        self.lock = threading.RLock()
        self.db = sqlite3.connect(path, timeout=30.0, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        with self.db:
            self.db.executescript(RATE_SCHEMA)
            self.db.execute(
                "INSERT OR IGNORE INTO rate_meta VALUES ('secret', ?)", (secrets.token_urlsafe(32),)
            )
            # Pair ids: keyed by the secret in a new store; a store rated before that keeps its content ids (so
            # its ratings stay with their pairs).
            rated_before = self.db.execute("SELECT COUNT(*) FROM rate_items").fetchone()[0] > 0
            scheme = "content" if rated_before else "secret"
            self.db.execute("INSERT OR IGNORE INTO rate_meta VALUES ('ids', ?)", (scheme,))

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def add_items(self, rows: list[tuple]) -> None:
        """(item, model, baseline, prompt_id, sample, prompt JSON, model answer, baseline answer) of each pair."""
        now = time.time()
        with self.lock, self.db:
            self.db.executemany(
                "INSERT OR IGNORE INTO rate_items VALUES (?,?,?,?,?,?,?,?,?)", [(*row, now) for row in rows]
            )

    def secret(self) -> str:
        """A random token kept in the store, so a restarted server accepts the pages it served before."""
        with self.lock:
            return self.db.execute("SELECT value FROM rate_meta WHERE key = 'secret'").fetchone()[0]

    def id_scheme(self) -> str:
        """How this store's pair ids are made: "secret" (keyed by its secret) or "content" (an older store)."""
        with self.lock:
            return self.db.execute("SELECT value FROM rate_meta WHERE key = 'ids'").fetchone()[0]

    def latest(self, rater: str | None = None) -> list[tuple]:
        """Every rater's (or one rater's) newest row per pair."""
        with self.lock:
            if rater is None:
                return self.db.execute(_LATEST).fetchall()
            return self.db.execute(_LATEST + " WHERE r.rater = ?", (rater,)).fetchall()

    def rated_by_another(self, item: str, rater: str) -> bool:
        """Has a rater other than `rater` rated (not skipped) this pair?"""
        with self.lock:
            row = self.db.execute(
                _LATEST + " WHERE r.item = ? AND r.rater != ? AND r.skipped = 0", (item, rater)
            ).fetchone()
        return row is not None

    def last_row(self, rater: str, item: str) -> tuple | None:
        """(left_side, skipped) of this rater's newest row for the pair, or None."""
        with self.lock:
            return self.db.execute(
                "SELECT left_side, skipped FROM rate_ratings WHERE rater = ? AND item = ? ORDER BY id DESC LIMIT 1",
                (rater, item),
            ).fetchone()

    def live_claims(self, since: float) -> list[tuple[str, str]]:
        """(rater, item) of every hold made after `since`."""
        with self.lock:
            return self.db.execute(
                "SELECT rater, item FROM rate_claims WHERE claimed > ?", (since,)
            ).fetchall()

    def claim(self, rater: str, item: str, now: float) -> None:
        with self.lock, self.db:
            self.db.execute("INSERT OR REPLACE INTO rate_claims VALUES (?,?,?)", (rater, item, now))

    def release(self, rater: str, item: str) -> None:
        with self.lock, self.db:
            self.db.execute("DELETE FROM rate_claims WHERE rater = ? AND item = ?", (rater, item))

    def insert(self, rater, item, left, score_model, score_baseline, preference, skipped, seconds) -> int:
        """One rating (or skip) row, and the rater's hold on the pair released; returns its id."""
        with self.lock, self.db:
            cursor = self.db.execute(
                "INSERT INTO rate_ratings (rater, item, left_side, score_model, score_baseline, preference, "
                "skipped, seconds, created) VALUES (?,?,?,?,?,?,?,?,?)",
                (rater, item, left, score_model, score_baseline, preference, skipped, seconds, time.time()),
            )
            self.db.execute("DELETE FROM rate_claims WHERE rater = ? AND item = ?", (rater, item))
        return cursor.lastrowid


def has_ratings(path: Path) -> bool:
    """Does this store (read only, never created) hold a rating?"""
    if not path.is_file():
        return False
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT name FROM sqlite_master WHERE name = 'rate_ratings'").fetchone()
        return bool(row) and db.execute("SELECT COUNT(*) FROM rate_ratings").fetchone()[0] > 0
    finally:
        db.close()


def read_judgments(path: Path, keys: list[str]) -> dict[str, dict]:
    """The stored results of these judgment keys, read from the store without creating or changing it."""
    out: dict[str, dict] = {}
    if not path.is_file():
        return out
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        if not db.execute("SELECT name FROM sqlite_master WHERE name = 'judgments'").fetchone():
            return out
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, result in db.execute(f"SELECT key, result FROM judgments WHERE key IN ({marks})", chunk):
                out[key] = json.loads(result)
    finally:
        db.close()
    return out
