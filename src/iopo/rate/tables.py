"""The human tables of an eval (the paper's Table 2 human columns) from its ratings, agreement between raters and
with each automatic judge, the exports (human/ratings.csv and .jsonl) and the printed summary. No torch.

Per pair, the raters' scores are averaged and their preferences put to a vote (most votes wins; a draw is a tie),
so an overlap pair counts once. Table 2: the higher mean score wins, both 0 is a bad case. The preference gives a
Table-1 style human verdict. Intervals: percentile bootstrap over prompts. Agreement: Krippendorff's α (nominal on
preferences, interval on 0-3 scores) and Cohen's κ per pair of raters, on the pairs rated by several; each
automatic judge of the eval against the human verdict on the same pairs (share agreeing and κ).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path

from iopo.config import JUDGE_TYPES
from iopo.core import stats
from iopo.core.formatting import rate, rate_interval
from iopo.io.jsonio import write_json, write_jsonl
from iopo.io.store import judgment_key, read_judgments
from iopo.rate.book import RatingBook, read_eval


def book_summary(
    book: RatingBook,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    ratings: list[dict] | None = None,
) -> dict:
    """The human tables (`summarize`) of a rating book's current ratings (read here unless given)."""
    return summarize(
        book.ratings() if ratings is None else ratings,
        book.results,
        book.eval_dir / "store.sqlite",
        boot={"n_boot": n_boot, "confidence": confidence, "seed": seed},
        stale=book.stale_ratings(),
        pairs=book.pair_counts(),
    )


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


MIN_AGREEMENT_PAIRS = 10  # below this many pairs rated by several, agreement is printed with a warning


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
        "too_few_to_read": len(shared) < MIN_AGREEMENT_PAIRS,
        "alpha_preference": alpha_pref,
        "alpha_scores": alpha_score,
        "pairable_values": n_pref,
        "rater_pairs": pairs,
    }


def judges_vs_humans(human_verdicts: dict[str, dict[str, dict]], results: dict, store_path: Path) -> dict:
    """Each judge of the eval against the human verdict on the same pairs: the share of pairs where they give
    the same outcome, and Cohen's κ. A pairwise judge or reward model is set against the human preference
    (Table 1), a 0-3 rubric judge against the human scores (Table 2)."""
    out: dict = {}
    if not store_path.is_file() or not human_verdicts:
        return out
    wanted = []  # every judgment the comparison may read, fetched at once
    for entry in (results.get("judges") or {}).values():
        for verdicts in human_verdicts.values():
            for verdict in verdicts.values():
                some = verdict["rows"][0]
                prompt, m, b = some["prompt"], some["model_answer"], some["baseline_answer"]
                for kind, a, other in (
                    ("pairwise", m, b),
                    ("pairwise", b, m),
                    ("score", m, None),
                    ("score", b, None),
                ):
                    wanted.append(judgment_key(entry.get("judge_id"), kind, prompt, a, other))
    stored = read_judgments(store_path, wanted)

    def result(judge_id, kind, prompt, a, b=None):
        return stored.get(judgment_key(judge_id, kind, prompt, a, b))

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
                        if JUDGE_TYPES[jtype].score_verdict == "gap":
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
    return out


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


def csv_cell(value) -> str:
    """A CSV cell; text a spreadsheet would run as a formula (=, +, -, @ first) gets a leading apostrophe."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def write_outputs(book: RatingBook, n_boot: int = 1000, confidence: float = 0.95) -> dict:
    """human/ratings.csv and human/ratings.jsonl (every current rating), and the human tables into eval.json."""
    ratings = book.ratings()
    summary = book_summary(book, n_boot, confidence, ratings=ratings)
    folder = book.eval_dir / "human"
    folder.mkdir(exist_ok=True)
    write_jsonl(folder / "ratings.jsonl", ratings)
    tmp = folder / f".ratings.csv.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(EXPORT_FIELDS)
        for r in ratings:
            writer.writerow(
                [csv_cell(r[k]) if isinstance(r[k], str | list | dict) else r[k] for k in EXPORT_FIELDS]
            )
    os.replace(tmp, folder / "ratings.csv")
    results = read_eval(book.eval_dir)
    results["human"] = summary
    write_json(book.eval_dir / "eval.json", results)
    return summary


def format_human(summary: dict, baseline: str) -> str:
    lines = [
        f"Human ratings: {summary['n_ratings']} ratings by {len(summary['raters'])} rater(s) "
        f"({', '.join(summary['raters']) or 'none yet'})"
    ]
    for model, m in summary["models"].items():
        t2, pref, ms = m["table2"], m["preference"], m["mean_score"]
        lines.append(f"  {model} vs {baseline}: {m['pairs_rated']} of {m['pairs']} pairs rated")
        lines.append(
            f"    scores  win {rate_interval(t2, 'win')}  tie {rate_interval(t2, 'tie')}  lose {rate_interval(t2, 'lose')}  "
            f"bad {rate_interval(t2, 'bad')}"
        )
        lines.append(
            f"    prefer  win {rate_interval(pref, 'win')}  tie {rate_interval(pref, 'tie')}  lose {rate_interval(pref, 'lose')}"
        )
        lines.append(f"    mean score {model} {rate(ms['model'])}, {baseline} {rate(ms['baseline'])}")
    ag = summary["agreement"]
    lines.append(
        f"  agreement on {ag['pairs_rated_by_several']} pairs rated by several: Krippendorff α preference "
        f"{rate(ag['alpha_preference'])}, scores {rate(ag['alpha_scores'])}"
    )
    if ag["pairs_rated_by_several"] < MIN_AGREEMENT_PAIRS:
        lines.append(
            f"  warning: agreement from {ag['pairs_rated_by_several']} pairs (fewer than {MIN_AGREEMENT_PAIRS}) "
            "says little; rate more of the pairs shown to everyone (overlap)"
        )
    for pair in ag["rater_pairs"]:
        lines.append(
            f"    {pair['raters'][0]} & {pair['raters'][1]}: Cohen κ {rate(pair['kappa_preference'])}, "
            f"same preference {rate(pair['same_preference'])} on {pair['n']} pairs"
        )
    for judge, entry in summary["judges"].items():
        for model, row in entry["models"].items():
            for table, r in row.items():
                what = "preference" if table == "table1" else "0-3 scores"
                lines.append(
                    f"  judge {judge} vs humans ({what}, {model}): same verdict {rate(r['same'])}, κ {rate(r['kappa'])} "
                    f"on {r['n']} pairs"
                )
    return "\n".join(lines)
