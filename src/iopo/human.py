"""Human ratings of an eval's answers (the paper's Table 2 human columns): the pairs to rate, who sees which, the
ratings as they arrive, and the tables made from them. No HTTP here: `iopo.rate` serves this to a browser.

A *pair* is one prompt's answer from an evaluated model and the baseline's answer to the same prompt (same sample
index), as `iopo eval` wrote them to generations/. Raters never see which side is which model: each rater gets a
fixed left/right draw per pair. Each rating is one row in the eval folder's store.sqlite, written when submitted:
a rater may change a rating later (a new row; the newest counts), or skip a pair.

Who sees what: the pairs are put in one shuffled order (seeded). A share `overlap` of them is shown to every rater
(to measure agreement); every other pair goes to the first rater who reaches it, and is held for them a while
(`claim_minutes`) so two raters do not rate it at once.

Tables: per pair, the raters' scores are averaged and their preferences put to a vote (most votes wins; a draw is
a tie), so an overlap pair counts once. Table 2: the higher mean score wins, both 0 is a bad case. The preference
gives a Table-1 style human verdict. Intervals: percentile bootstrap over prompts. Agreement: Krippendorff's α
(nominal on preferences, interval on 0-3 scores) and Cohen's κ per pair of raters, on the pairs rated by several;
each automatic judge of the eval against the human verdict on the same pairs (share agreeing and κ).
"""

from __future__ import annotations

import csv
import json
import math
import os
import secrets
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from iopo import stats
from iopo.config import ConfigError
from iopo.generate import read_records
from iopo.jsonio import write_json, write_jsonl
from iopo.store import text_key

SCHEMA = """
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
LATEST = """
SELECT r.id, r.rater, r.item, r.left_side, r.score_model, r.score_baseline, r.preference, r.skipped, r.seconds,
       r.created
FROM rate_ratings r JOIN (SELECT MAX(id) AS id FROM rate_ratings GROUP BY rater, item) m ON r.id = m.id
"""
MAX_NAME = 40
SCORES = (0, 1, 2, 3)


class RatingError(ValueError):
    """A request the page should not have sent (bad name, unknown pair, score out of range): said to the client."""


def check_name(name) -> str:
    """A rater's name: 1-40 letters, digits, spaces, dots, dashes or underscores, starting with a letter/digit."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise RatingError("a rater name is 1-40 characters, without spaces at either end")
    if len(name) > MAX_NAME or not name[0].isalnum() or any(not (c.isalnum() or c in " ._-") for c in name):
        raise RatingError(
            "a rater name is 1-40 letters, digits, spaces, dots, dashes or underscores, starting with a letter "
            "or digit"
        )
    return name


@dataclass(frozen=True)
class Pair:
    item: str
    model: str
    baseline: str
    prompt_id: str
    sample: int
    prompt: object  # the conversation as generated: a string or a list of {role, content}
    model_answer: str
    baseline_answer: str
    cut: tuple[bool, bool] = (False, False)  # (model, baseline) answer stopped at the token limit


def _safe_name(label: str) -> str:
    from iopo.evaluate import _safe_name

    return _safe_name(label)


def read_eval(eval_dir: Path) -> dict:
    path = eval_dir / "eval.json"
    if not path.is_file():
        raise ConfigError(f"{eval_dir}: not an eval folder (no eval.json); run `iopo eval` first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "baseline" not in data or not isinstance(data.get("models"), dict):
        raise ConfigError(f"{path}: not an eval.json of `iopo eval` (no baseline and models)")
    return data


def load_pairs(eval_dir: Path, results: dict, models: list[str] | None = None) -> list[Pair]:
    """Every (model answer, baseline answer) pair of the eval folder's generations, in file order."""
    baseline = results["baseline"]
    labels = list(results["models"])
    if models:
        unknown = [m for m in models if m not in labels]
        if unknown:
            raise ConfigError(
                f"models: {', '.join(unknown)} not in this eval (its models: {', '.join(labels)})"
            )
        labels = list(models)

    def answers(label: str) -> dict[tuple[str, int], dict]:
        path = eval_dir / "generations" / f"{_safe_name(label)}.jsonl"
        if not path.is_file():
            raise ConfigError(f"{path}: missing: the eval's answers of {label!r} are needed to rate them")
        out = {}
        for number, record in enumerate(read_records(path).values(), 1):  # as `iopo eval` reads its own files
            if not {"prompt_id", "sample", "prompt", "answer"} <= set(record):
                raise ConfigError(f"{path}: record {number}: not a generation record of `iopo eval`")
            out[str(record["prompt_id"]), int(record["sample"])] = record
        return out

    base = answers(baseline)
    pairs = []
    for label in labels:
        for key, record in answers(label).items():
            other = base.get(key)
            if other is None:
                continue  # the baseline has no answer to this prompt/sample (an eval with fewer prompts)
            item = text_key("rate-v1", label, baseline, key[0], key[1], record["answer"], other["answer"])[
                :20
            ]
            cut = (record.get("finish_reason") == "length", other.get("finish_reason") == "length")
            pairs.append(
                Pair(item, label, baseline, *key, record["prompt"], record["answer"], other["answer"], cut)
            )
    return pairs


def _unit(seed: int, *parts) -> float:
    """A uniform number in [0, 1) fixed by the parts (the shuffled order, the overlap draw, left/right)."""
    return int(text_key(seed, *parts)[:13], 16) / 16**13


class RatingBook:
    """The ratings of one eval folder, thread-safe (one SQLite connection behind a lock, WAL)."""

    def __init__(
        self,
        eval_dir: str | Path,
        *,
        models: list[str] | None = None,
        overlap: float = 0.2,
        seed: int = 0,
        max_pairs: int | None = None,
        claim_minutes: float = 30.0,
        results: dict | None = None,
    ):
        self.eval_dir = Path(eval_dir)
        if not self.eval_dir.is_dir():
            raise ConfigError(f"{self.eval_dir}: no such eval folder")
        self.results = results if results is not None else read_eval(self.eval_dir)
        # Every pair of the eval is known (ratings of any model count in the tables); `models` picks those to rate.
        self.pairs = load_pairs(self.eval_dir, self.results)
        offered = load_pairs(self.eval_dir, self.results, models) if models else self.pairs
        if not offered:
            raise ConfigError(f"{self.eval_dir}: the eval has no answers of its models and baseline to rate")
        self.seed, self.overlap, self.claim_s = seed, overlap, claim_minutes * 60
        ordered = sorted(offered, key=lambda p: _unit(seed, "order", p.item))
        self.order = [p.item for p in ordered][:max_pairs]
        self.order_set = set(self.order)
        self.by_item = {p.item: p for p in self.pairs}
        self.shared = {i for i in self.order if _unit(seed, "overlap", i) < overlap}
        self.lock = threading.Lock()
        self.db = sqlite3.connect(self.eval_dir / "store.sqlite", timeout=30.0, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        with self.db:
            self.db.executescript(SCHEMA)
            self.db.executemany(
                "INSERT OR IGNORE INTO rate_items VALUES (?,?,?,?,?,?,?,?,?)",
                [
                    (
                        p.item,
                        p.model,
                        p.baseline,
                        p.prompt_id,
                        p.sample,
                        json.dumps(p.prompt, ensure_ascii=False),
                        p.model_answer,
                        p.baseline_answer,
                        time.time(),
                    )
                    for p in self.pairs
                ],
            )
            self.db.execute(
                "INSERT OR IGNORE INTO rate_meta VALUES ('secret', ?)", (secrets.token_urlsafe(32),)
            )

    def close(self) -> None:
        with self.lock:
            self.db.close()

    @property
    def secret(self) -> str:
        """A random token kept in the store, so a restarted server accepts the pages it served before."""
        with self.lock:
            return self.db.execute("SELECT value FROM rate_meta WHERE key = 'secret'").fetchone()[0]

    # ------------------------------------------------------------ who sees what

    def left_side(self, rater: str, item: str) -> str:
        return "model" if _unit(self.seed, "left", rater, item) < 0.5 else "baseline"

    def _latest(self, rater: str | None = None) -> list[tuple]:
        if rater is None:
            return self.db.execute(LATEST).fetchall()
        return self.db.execute(LATEST + " WHERE r.rater = ?", (rater,)).fetchall()

    def _live_claims(self, now: float) -> list[tuple[str, str]]:
        """(rater, item) of every hold not yet expired."""
        return self.db.execute(
            "SELECT rater, item FROM rate_claims WHERE claimed > ?", (now - self.claim_s,)
        ).fetchall()

    def _open_items(self, rater: str, now: float) -> list[str]:
        """The items this rater may still get, in order."""
        mine = {row[2] for row in self._latest(rater)}
        taken = {row[2] for row in self._latest() if row[1] != rater and not row[7]}
        taken |= {item for who, item in self._live_claims(now) if who != rater}
        return [i for i in self.order if i not in mine and (i in self.shared or i not in taken)]

    def next_pair(self, rater: str) -> dict | None:
        """The pair to show this rater now (the one they hold, else the next open one, claimed), or None."""
        check_name(rater)
        now = time.time()
        with self.lock:
            open_items = self._open_items(rater, now)
            held = {item for who, item in self._live_claims(now) if who == rater}
            item = next((i for i in open_items if i in held), None) or (open_items[0] if open_items else None)
            if item is None:
                return None
            with self.db:
                self.db.execute("INSERT OR REPLACE INTO rate_claims VALUES (?,?,?)", (rater, item, now))
        return self._view(rater, item, self.left_side(rater, item), None)

    def _view(self, rater: str, item: str, left: str, rating: tuple | None) -> dict:
        """What the page shows: the prompt and two answers as A (left) and B (right), never the model names."""
        pair = self.by_item[item]
        sides = {"model": pair.model_answer, "baseline": pair.baseline_answer}
        cut = {"model": pair.cut[0], "baseline": pair.cut[1]}
        right = "baseline" if left == "model" else "model"
        view = {
            "item": item,
            "prompt": _turns(pair.prompt),
            "a": sides[left],
            "b": sides[right],
            "cut_a": cut[left],
            "cut_b": cut[right],
        }
        if rating is not None:  # going back: the rater's stored answer, in the layout they saw
            _, _, _, _, score_model, score_baseline, preference, skipped, _, _ = rating
            scores = {"model": score_model, "baseline": score_baseline}
            view["rating_id"] = rating[0]
            view["score_a"], view["score_b"] = scores[left], scores[right]
            view["preference"] = (
                None
                if skipped
                else {"tie": "tie", left: "a", right: "b"}.get(preference)  # model/baseline -> a/b
            )
            view["skipped"] = bool(skipped)
        return view

    def previous(self, rater: str, before: int | None) -> dict | None:
        """The rater's latest rating (or skip) older than rating id `before` (None: their newest), to revise."""
        check_name(rater)
        with self.lock:
            rows = [r for r in self._latest(rater) if r[2] in self.by_item]
        rows = [r for r in rows if before is None or r[0] < before]
        if not rows:
            return None
        row = max(rows, key=lambda r: r[0])
        return self._view(rater, row[2], row[3], row)

    # ------------------------------------------------------------ writing

    def _last_row(self, rater: str, item: str) -> tuple | None:
        """(left_side, skipped) of this rater's newest row for the pair, or None (call under the lock)."""
        return self.db.execute(
            "SELECT left_side, skipped FROM rate_ratings WHERE rater = ? AND item = ? ORDER BY id DESC LIMIT 1",
            (rater, item),
        ).fetchone()

    def _left_for(self, rater: str, item: str) -> str:
        """The layout this rater saw: their stored one when they rated it before, else their draw."""
        row = self._last_row(rater, item)
        return row[0] if row else self.left_side(rater, item)

    def rate(
        self, rater: str, item: str, score_a, score_b, preference: str, seconds: float | None = None
    ) -> int:
        """Store one rating as the rater saw it (A = left); returns its id."""
        check_name(rater)
        self._check_offered(rater, item)
        for score in (score_a, score_b):
            if isinstance(score, bool) or score not in SCORES:
                raise RatingError("each score is one of 0, 1, 2, 3")
        if preference not in ("a", "b", "tie"):
            raise RatingError("the preference is a, b or tie")
        seconds = _seconds(seconds)
        with self.lock:
            left = self._left_for(rater, item)
            right = "baseline" if left == "model" else "model"
            scores = {left: score_a, right: score_b}
            prefer = {"a": left, "b": right, "tie": "tie"}[preference]
            return self._insert(rater, item, left, scores["model"], scores["baseline"], prefer, 0, seconds)

    def skip(self, rater: str, item: str, seconds: float | None = None) -> int | None:
        """Pass a pair on. A pair the rater has already rated (shown again by back) keeps its rating: skipping it
        only moves on (returns None)."""
        check_name(rater)
        self._check_offered(rater, item)
        with self.lock:
            row = self._last_row(rater, item)
            if row is not None and not row[1]:
                with self.db:
                    self.db.execute("DELETE FROM rate_claims WHERE rater = ? AND item = ?", (rater, item))
                return None
            left = self._left_for(rater, item)
            return self._insert(rater, item, left, None, None, None, 1, _seconds(seconds))

    def _check_offered(self, rater: str, item: str) -> None:
        """A rating is taken only for a pair this rater may rate: one of the pairs offered, and not another
        rater's (unless shown to every rater)."""
        if item not in self.by_item:
            raise RatingError("unknown pair (the eval's answers changed? reload the page)")
        if item not in self.order_set:
            raise RatingError("this pair is not offered for rating here")
        if item not in self.shared:
            with self.lock:
                other = self.db.execute(
                    LATEST + " WHERE r.item = ? AND r.rater != ? AND r.skipped = 0", (item, rater)
                ).fetchone()
            if other is not None:
                raise RatingError("another rater has rated this pair; reload for your next one")

    def _insert(self, rater, item, left, score_model, score_baseline, preference, skipped, seconds) -> int:
        with self.db:
            cursor = self.db.execute(
                "INSERT INTO rate_ratings (rater, item, left_side, score_model, score_baseline, preference, "
                "skipped, seconds, created) VALUES (?,?,?,?,?,?,?,?,?)",
                (rater, item, left, score_model, score_baseline, preference, skipped, seconds, time.time()),
            )
            self.db.execute("DELETE FROM rate_claims WHERE rater = ? AND item = ?", (rater, item))
        return cursor.lastrowid

    # ------------------------------------------------------------ reading

    def progress(self, rater: str) -> dict:
        check_name(rater)
        with self.lock:
            mine = [r for r in self._latest(rater) if r[2] in self.by_item]
            open_items = self._open_items(rater, time.time())
            everyone = {r[2] for r in self._latest() if not r[7] and r[2] in self.by_item}
        return {
            "rated": sum(not r[7] for r in mine),
            "skipped": sum(bool(r[7]) for r in mine),
            "left": len(open_items),
            "pairs": len(self.order),
            "pairs_rated": len(everyone & set(self.order)),
        }

    def ratings(self) -> list[dict]:
        """Every rater's current rating of every pair of this eval (skips left out), oldest first."""
        with self.lock:
            rows = sorted(self._latest(), key=lambda r: r[0])
        out = []
        for rid, rater, item, left, s_model, s_base, preference, skipped, seconds, created in rows:
            pair = self.by_item.get(item)
            if pair is None or skipped:
                continue
            out.append(
                {
                    "id": rid,
                    "rater": rater,
                    "item": item,
                    "model": pair.model,
                    "baseline": pair.baseline,
                    "prompt_id": pair.prompt_id,
                    "sample": pair.sample,
                    "shown_to_all": item in self.shared,
                    "left": left,
                    "score_model": s_model,
                    "score_baseline": s_base,
                    "preference": preference,
                    "seconds": seconds,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
                    "prompt": pair.prompt,
                    "model_answer": pair.model_answer,
                    "baseline_answer": pair.baseline_answer,
                }
            )
        return out

    def stale_ratings(self) -> int:
        """Ratings of pairs that are no longer in this eval (its answers were generated again)."""
        with self.lock:
            return sum(1 for r in self._latest() if r[2] not in self.by_item and not r[7])

    # ------------------------------------------------------------ results

    def summary(
        self, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0, ratings: list[dict] | None = None
    ) -> dict:
        """The human tables (`summarize`) of the current ratings (read here unless given)."""
        return summarize(
            self.ratings() if ratings is None else ratings,
            self.results,
            self.eval_dir / "store.sqlite",
            boot={"n_boot": n_boot, "confidence": confidence, "seed": seed},
            stale=self.stale_ratings(),
            pairs=self._pair_counts(),
        )

    def _pair_counts(self) -> dict[str, int]:
        """Pairs per model: those offered for rating, and all the eval has for a model not offered."""
        offered = Counter(self.by_item[i].model for i in self.order)
        every = Counter(p.model for p in self.pairs)
        return {m: offered.get(m, n) for m, n in every.items()}


def _seconds(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise RatingError("seconds is a non-negative number")
    return float(min(value, 86400.0))


def _turns(prompt) -> list[dict]:
    """The conversation as [{role, content}] for the page (a plain-text prompt is one user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": str(t.get("role", "")), "content": str(t.get("content", ""))} for t in prompt]


def _vote(preferences: list[str]) -> str:
    """The pair's human preference: the most chosen of model/baseline/tie; a draw between the top two is a tie."""
    counts = Counter(preferences).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return "tie"
    return counts[0][0]


PREFERENCE_OUTCOME = {"model": "win", "baseline": "lose", "tie": "tie"}


def summarize(
    ratings: list[dict], results: dict, store_path: Path, *, boot: dict, stale: int = 0, pairs: dict
) -> dict:
    """The human tables of an eval (per model: Table 2 from scores, a preference table, mean scores), agreement
    between raters, and each automatic judge's agreement with the humans on the same pairs."""
    by_model: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in ratings:
        by_model[r["model"]][r["item"]].append(r)
    out: dict = {
        "raters": sorted({r["rater"] for r in ratings}),
        "n_ratings": len(ratings),
        "stale_ratings": stale,
        "models": {},
        "agreement": agreement(ratings),
        "judges": {},
    }
    human_verdicts: dict[str, dict[str, dict]] = {}
    for model, items in by_model.items():
        per_prompt_t2: dict[str, list[str]] = defaultdict(list)
        per_prompt_pref: dict[str, list[str]] = defaultdict(list)
        scores_m: dict[str, list[float]] = defaultdict(list)
        scores_b: dict[str, list[float]] = defaultdict(list)
        verdicts = {}
        for item, rows in items.items():
            mean_m = sum(r["score_model"] for r in rows) / len(rows)
            mean_b = sum(r["score_baseline"] for r in rows) / len(rows)
            t2 = stats.rubric_outcome(mean_m, mean_b)
            pref = PREFERENCE_OUTCOME[_vote([r["preference"] for r in rows])]
            prompt_id = rows[0]["prompt_id"]
            per_prompt_t2[prompt_id].append(t2)
            per_prompt_pref[prompt_id].append(pref)
            scores_m[prompt_id].append(mean_m)
            scores_b[prompt_id].append(mean_b)
            verdicts[item] = {"table1": pref, "table2": t2, "rows": rows}
        human_verdicts[model] = verdicts
        out["models"][model] = {
            "pairs": pairs.get(model, 0),
            "pairs_rated": len(items),
            "ratings": sum(len(rows) for rows in items.values()),
            "table2": _table(list(per_prompt_t2.values()), boot),
            "preference": _table(list(per_prompt_pref.values()), boot),
            "mean_score": {
                "model": _mean(scores_m),
                "baseline": _mean(scores_b),
                "model_ci": stats.bootstrap_mean(list(scores_m.values()), **boot),
                "baseline_ci": stats.bootstrap_mean(list(scores_b.values()), **boot),
            },
        }
    out["judges"] = judges_vs_humans(human_verdicts, results, store_path)
    return stats.json_safe(out)


def _table(outcomes_by_prompt: list[list[str]], boot: dict) -> dict:
    flat = [o for g in outcomes_by_prompt for o in g]
    table = stats.outcome_rates(flat)
    table["ci"] = stats.bootstrap_rates(outcomes_by_prompt, **boot)
    table["n"] = len(flat)
    table["invalid"] = 0
    return table


def _mean(groups: dict[str, list[float]]) -> float:
    values = [v for g in groups.values() for v in g]
    return sum(values) / len(values) if values else math.nan


def agreement(ratings: list[dict]) -> dict:
    """Inter-rater agreement on the pairs rated by two raters or more."""
    by_item: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in ratings:
        by_item[r["item"]][r["rater"]] = r
    shared = {item: rows for item, rows in by_item.items() if len(rows) >= 2}
    raters = sorted({r["rater"] for r in ratings})
    alpha_pref, n_pref = stats.krippendorff_alpha(
        [[r["preference"] for r in rows.values()] for rows in shared.values()], "nominal"
    )
    score_units = [[r["score_model"] for r in rows.values()] for rows in shared.values()] + [
        [r["score_baseline"] for r in rows.values()] for rows in shared.values()
    ]
    alpha_score, _ = stats.krippendorff_alpha(score_units, "interval")
    pairs = []
    for i, a in enumerate(raters):
        for b in raters[i + 1 :]:
            common = [item for item, rows in shared.items() if a in rows and b in rows]
            if not common:
                continue
            pa = [shared[item][a]["preference"] for item in common]
            pb = [shared[item][b]["preference"] for item in common]
            kappa, n = stats.cohen_kappa(pa, pb)
            same, _ = stats.agreement_rate(pa, pb)
            pairs.append({"raters": [a, b], "n": n, "kappa_preference": kappa, "same_preference": same})
    return {
        "pairs_rated_by_several": len(shared),
        "alpha_preference": alpha_pref,
        "alpha_scores": alpha_score,
        "pairable_values": n_pref,
        "rater_pairs": pairs,
    }


def judges_vs_humans(human_verdicts: dict[str, dict[str, dict]], results: dict, store_path: Path) -> dict:
    """Each judge of the eval against the human verdict on the same pairs: the share of pairs where they give
    the same outcome, and Cohen's κ. A pairwise judge or reward model is set against the human preference
    (Table 1), a 0-3 rubric judge against the human scores (Table 2)."""
    from iopo.judges import judgment_key

    out: dict = {}
    if not store_path.is_file() or not human_verdicts:
        return out
    db = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    try:

        def result(judge_id, kind, prompt, a, b=None):
            key = judgment_key(judge_id, kind, prompt, a, b)
            row = db.execute("SELECT result FROM judgments WHERE key = ?", (key,)).fetchone()
            return json.loads(row[0]) if row else None

        for name, entry in (results.get("judges") or {}).items():
            judge_id, jtype, modes = entry.get("judge_id"), entry.get("type"), entry.get("modes") or []
            rows = {}
            for model, verdicts in human_verdicts.items():
                tables = (entry.get("models") or {}).get(model) or {}
                pairs_t1, pairs_t2 = [], []
                for verdict in verdicts.values():
                    some = verdict["rows"][0]
                    prompt, m, b = some["prompt"], some["model_answer"], some["baseline_answer"]
                    if "pairwise" in modes:
                        ab, ba = (
                            result(judge_id, "pairwise", prompt, m, b),
                            result(judge_id, "pairwise", prompt, b, m),
                        )
                        if ab and ba:
                            outcome, _ = stats.pairwise_outcome(ab.get("winner"), ba.get("winner"))
                            pairs_t1.append((outcome, verdict["table1"]))
                    if "score" in modes:
                        sm, sb = result(judge_id, "score", prompt, m), result(judge_id, "score", prompt, b)
                        if sm and sb:
                            vm = sm.get("score") if sm.get("valid", True) else None
                            vb = sb.get("score") if sb.get("valid", True) else None
                            if jtype == "reward_model":
                                margin = (tables.get("table1") or {}).get("tie_margin", 0.0) or 0.0
                                pairs_t1.append((stats.score_gap_outcome(vm, vb, margin), verdict["table1"]))
                            else:
                                pairs_t2.append((stats.rubric_outcome(vm, vb), verdict["table2"]))
                row = {}
                for table, found in (("table1", pairs_t1), ("table2", pairs_t2)):
                    kept = [(j, h) for j, h in found if j != "invalid"]
                    if not found:
                        continue
                    same, n = stats.agreement_rate([j for j, _ in kept], [h for _, h in kept])
                    kappa, _ = stats.cohen_kappa([j for j, _ in kept], [h for _, h in kept])
                    row[table] = {
                        "n": n,
                        "same": same,
                        "kappa": kappa,
                        "judge_invalid": len(found) - len(kept),
                    }
                if row:
                    rows[model] = row
            if rows:
                out[name] = {"type": jtype, "models": rows}
    finally:
        db.close()
    return out


# ---------------------------------------------------------------- files

EXPORT_FIELDS = (
    "id",
    "rater",
    "model",
    "baseline",
    "prompt_id",
    "sample",
    "item",
    "shown_to_all",
    "left",
    "score_model",
    "score_baseline",
    "preference",
    "seconds",
    "created",
    "prompt",
    "model_answer",
    "baseline_answer",
)


def _cell(value) -> str:
    """A CSV cell; text a spreadsheet would run as a formula (=, +, -, @ first) gets a leading apostrophe."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def write_outputs(book: RatingBook, n_boot: int = 1000, confidence: float = 0.95) -> dict:
    """human/ratings.csv and human/ratings.jsonl (every current rating), and the human tables into eval.json."""
    ratings = book.ratings()
    summary = book.summary(n_boot, confidence, ratings=ratings)
    folder = book.eval_dir / "human"
    folder.mkdir(exist_ok=True)
    write_jsonl(folder / "ratings.jsonl", ratings)
    tmp = folder / f".ratings.csv.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(EXPORT_FIELDS)
        for r in ratings:
            writer.writerow(
                [_cell(r[k]) if isinstance(r[k], str | list | dict) else r[k] for k in EXPORT_FIELDS]
            )
    os.replace(tmp, folder / "ratings.csv")
    results = read_eval(book.eval_dir)
    results["human"] = summary
    write_json(book.eval_dir / "eval.json", results)
    return summary


def has_ratings(eval_dir: Path) -> bool:
    path = eval_dir / "store.sqlite"
    if not path.is_file():
        return False
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT name FROM sqlite_master WHERE name = 'rate_ratings'").fetchone()
        return bool(row) and db.execute("SELECT COUNT(*) FROM rate_ratings").fetchone()[0] > 0
    finally:
        db.close()


# ---------------------------------------------------------------- printed


def format_human(summary: dict, baseline: str) -> str:
    from iopo.evaluate import _pct, _with_ci

    lines = [
        f"Human ratings: {summary['n_ratings']} ratings by {len(summary['raters'])} rater(s) "
        f"({', '.join(summary['raters']) or 'none yet'})"
    ]
    for model, m in summary["models"].items():
        t2, pref, ms = m["table2"], m["preference"], m["mean_score"]
        lines.append(f"  {model} vs {baseline}: {m['pairs_rated']} of {m['pairs']} pairs rated")
        lines.append(
            f"    scores  win {_with_ci(t2, 'win')}  tie {_with_ci(t2, 'tie')}  lose {_with_ci(t2, 'lose')}  "
            f"bad {_with_ci(t2, 'bad')}"
        )
        lines.append(
            f"    prefer  win {_with_ci(pref, 'win')}  tie {_with_ci(pref, 'tie')}  lose {_with_ci(pref, 'lose')}"
        )
        lines.append(f"    mean score {model} {_pct(ms['model'])}, {baseline} {_pct(ms['baseline'])}")
    ag = summary["agreement"]
    lines.append(
        f"  agreement on {ag['pairs_rated_by_several']} pairs rated by several: Krippendorff α preference "
        f"{_pct(ag['alpha_preference'])}, scores {_pct(ag['alpha_scores'])}"
    )
    for pair in ag["rater_pairs"]:
        lines.append(
            f"    {pair['raters'][0]} & {pair['raters'][1]}: Cohen κ {_pct(pair['kappa_preference'])}, "
            f"same preference {_pct(pair['same_preference'])} on {pair['n']} pairs"
        )
    for judge, entry in summary["judges"].items():
        for model, row in entry["models"].items():
            for table, r in row.items():
                what = "preference" if table == "table1" else "0-3 scores"
                lines.append(
                    f"  judge {judge} vs humans ({what}, {model}): same verdict {_pct(r['same'])}, κ {_pct(r['kappa'])} "
                    f"on {r['n']} pairs"
                )
    return "\n".join(lines)
