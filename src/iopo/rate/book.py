"""Human ratings of an eval's answers (the paper's Table 2 human columns): the pairs to rate, who sees which, and
the ratings as they arrive. No HTTP here (iopo.rate.server serves this to a browser), no torch.

A *pair* is one prompt's answer from an evaluated model and the baseline's answer to the same prompt (same sample
index), as `iopo eval` wrote them to generations/. Raters never see which side is which model: each rater gets a
fixed left/right draw per pair. Each rating is one row in the eval folder's store.sqlite (its rating tables,
iopo.io.store.RatingTables), written when submitted: a rater may change a rating later (a new row; the newest
counts), or skip a pair.

Who sees what: the pairs are put in one shuffled order (seeded). A share `overlap` of them is shown to every rater
(to measure agreement); every other pair goes to the first rater who reaches it, and is held for them a while
(`claim_minutes`) so two raters do not rate it at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from iopo.config import ConfigError
from iopo.eval.generate import answers_file, read_records
from iopo.io.store import RatingTables, text_key

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


def load_pairs(
    eval_dir: Path, results: dict, models: list[str] | None = None, secret: str | None = None
) -> list[Pair]:
    """Every (model answer, baseline answer) pair of the eval folder's generations, in file order. A pair's id is
    keyed by the store's `secret` (ids of a store rated before the secret keyed them: its content alone)."""
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
        path = answers_file(eval_dir, label)
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
            parts = (label, baseline, key[0], key[1], record["answer"], other["answer"])
            item = (_keyed(secret, "rate-v2", *parts) if secret else text_key("rate-v1", *parts))[:20]
            cut = (record.get("finish_reason") == "length", other.get("finish_reason") == "length")
            pairs.append(
                Pair(item, label, baseline, *key, record["prompt"], record["answer"], other["answer"], cut)
            )
    return pairs


def _keyed(secret: str, *parts) -> str:
    """HMAC-SHA256 of the parts under the store's secret: nothing a rater sees or sends predicts it."""
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hmac.new(secret.encode("utf-8"), blob, hashlib.sha256).hexdigest()


def _unit(seed: int, *parts) -> float:
    """A uniform number in [0, 1) fixed by the parts (the shuffled order, the overlap draw, left/right)."""
    return int(text_key(seed, *parts)[:13], 16) / 16**13


class RatingBook:
    """The ratings of one eval folder: which pair each rater sees next, on which side, and what they submit.
    Thread-safe (the store's rating tables, behind their lock)."""

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
        self.tables = RatingTables(self.eval_dir / "store.sqlite")
        self.lock = self.tables.lock
        # Blinding: the sides (and the ids of a new store) come from the store's random secret, never from what a
        # rater sees or sends (the seed, names, answers).
        self._secret = self.tables.secret()
        key = self._secret if self.tables.id_scheme() == "secret" else None
        # Every pair of the eval is known (ratings of any model count in the tables); `models` picks those to rate.
        self.pairs = load_pairs(self.eval_dir, self.results, secret=key)
        offered = load_pairs(self.eval_dir, self.results, models, secret=key) if models else self.pairs
        if not offered:
            self.tables.close()
            raise ConfigError(f"{self.eval_dir}: the eval has no answers of its models and baseline to rate")
        self.seed, self.overlap, self.claim_s = seed, overlap, claim_minutes * 60
        ordered = sorted(offered, key=lambda p: _unit(seed, "order", p.item))
        self.order = [p.item for p in ordered][:max_pairs]
        self.order_set = set(self.order)
        self.by_item = {p.item: p for p in self.pairs}
        # Exactly the share asked (rounded up) is shown to every rater, drawn in a seeded order.
        n_shared = math.ceil(overlap * len(self.order) - 1e-9)
        self.shared = set(sorted(self.order, key=lambda i: _unit(seed, "overlap", i))[:n_shared])
        self.tables.add_items(
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
                )
                for p in self.pairs
            ]
        )

    def close(self) -> None:
        self.tables.close()

    @property
    def secret(self) -> str:
        """A random token kept in the store, so a restarted server accepts the pages it served before."""
        return self._secret

    # ------------------------------------------------------------ who sees what

    def left_side(self, rater: str, item: str) -> str:
        return "model" if int(_keyed(self._secret, "left", rater, item)[:13], 16) % 2 else "baseline"

    def _latest(self, rater: str | None = None) -> list[tuple]:
        return self.tables.latest(rater)

    def _live_claims(self, now: float) -> list[tuple[str, str]]:
        """(rater, item) of every hold not yet expired."""
        return self.tables.live_claims(now - self.claim_s)

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
            self.tables.claim(rater, item, now)
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
        """(left_side, skipped) of this rater's newest row for the pair, or None."""
        return self.tables.last_row(rater, item)

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
                self.tables.release(rater, item)
                return None
            left = self._left_for(rater, item)
            return self._insert(rater, item, left, None, None, None, 1, _seconds(seconds))

    def _check_offered(self, rater: str, item: str) -> None:
        """A rating is taken only for a pair this rater may rate: one of the pairs offered, and not another
        rater's (rated or held by them), unless shown to every rater."""
        if item not in self.by_item:
            raise RatingError("unknown pair (the eval's answers changed? reload the page)")
        if item not in self.order_set:
            raise RatingError("this pair is not offered for rating here")
        if item not in self.shared:
            if self.tables.rated_by_another(item, rater):
                raise RatingError("another rater has rated this pair; reload for your next one")
            held = {who for who, i in self._live_claims(time.time()) if i == item}
            if held and rater not in held:
                raise RatingError("this pair is held for another rater; reload for your next one")

    def _insert(self, rater, item, left, score_model, score_baseline, preference, skipped, seconds) -> int:
        return self.tables.insert(
            rater, item, left, score_model, score_baseline, preference, skipped, seconds
        )

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

    def pair_counts(self) -> dict[str, int]:
        """Pairs per model: those offered for rating, and all the eval has for a model not offered."""
        offered = Counter(self.by_item[i].model for i in self.order)
        every = Counter(p.model for p in self.pairs)
        return {m: offered.get(m, n) for m, n in every.items()}


def _seconds(value) -> float | None:
    if value is None:
        return None
    try:  # an integer of hundreds of digits has no float
        number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or number < 0:
        raise RatingError("seconds is a non-negative number of seconds")
    return min(number, 86400.0)


def _turns(prompt) -> list[dict]:
    """The conversation as [{role, content}] for the page (a plain-text prompt is one user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": str(t.get("role", "")), "content": str(t.get("content", ""))} for t in prompt]
