"""The suite's results: every number with its 95% interval, from the finished runs' files (experiments/suite.py).

Intervals: a run's metric over the held-out pairs (or judged prompts) gets a percentile bootstrap over those pairs;
a method's metric over seeds gets a two-level bootstrap (seeds drawn with replacement, then pairs within each drawn
seed), so it carries both the test-set noise and the seed-to-seed spread. A difference between two methods is taken
pair by pair on the same test pairs and seeds (paired), which is tighter than comparing two intervals.

write_results() writes results_dir/*.json, the figures, and the tables inside docs/results.md between
<!-- suite:NAME --> and <!-- /suite:NAME --> markers (the prose around them is left as it is).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

N_BOOT = 2000
CONFIDENCE = 0.95


def _read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _quantiles(values: np.ndarray) -> list[float]:
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return [float(low), float(high)]


def bootstrap_draws(per_seed: list[np.ndarray], statistic, seed: int = 0, groups=None) -> np.ndarray:
    """N_BOOT values of statistic(values pooled over the drawn seeds): seeds drawn with replacement, then units.

    per_seed: one array per seed, first axis = units (test pairs, prompts). groups: the prompt of each unit, the
    same units in the same order in every seed (the test pairs every run reads): then each draw takes whole prompts
    with replacement, one draw for every seed, so pairs of one prompt and the seeds' shared test set are not
    counted as independent. Without groups, units are drawn one by one, independently per seed. One seed: only
    the units are drawn."""
    rng = np.random.default_rng(seed)
    if groups is not None:
        groups = np.asarray(groups)
        if any(len(v) != len(groups) for v in per_seed):
            raise ValueError(f"{len(groups)} prompt groups for seeds of {[len(v) for v in per_seed]} units")
        clusters = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    out = np.empty(N_BOOT)
    for b in range(N_BOOT):
        seeds = rng.integers(0, len(per_seed), len(per_seed)) if len(per_seed) > 1 else [0]
        if groups is not None:
            index = np.concatenate([clusters[k] for k in rng.integers(0, len(clusters), len(clusters))])
            drawn = [per_seed[s][index] for s in seeds]
        else:
            drawn = [per_seed[s][rng.integers(0, len(per_seed[s]), len(per_seed[s]))] for s in seeds]
        out[b] = statistic(np.concatenate(drawn))
    return out


def two_level_bootstrap(per_seed: list[np.ndarray], statistic, seed: int = 0, groups=None) -> list[float]:
    """95% interval of statistic(values pooled over seeds), resampling seeds, then units (whole prompts when
    `groups` is given; see bootstrap_draws)."""
    return _quantiles(bootstrap_draws(per_seed, statistic, seed, groups))


def family_interval(
    per_seed: list[np.ndarray], statistic, family: int, seed: int = 0, groups=None
) -> list[float]:
    """The interval at level 1 - 0.05/family (Bonferroni): a cell read among `family` comparisons excludes zero
    at the family's 95% only if this interval does."""
    values = bootstrap_draws(per_seed, statistic, seed, groups)
    alpha = (1 - CONFIDENCE) / (2 * max(1, family))
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return [float(low), float(high)]


def _accuracy(margins: np.ndarray) -> float:
    return float(np.mean(margins > 0))


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values))


# ---------------------------------------------------------------- offline runs: margin reward, pairwise accuracy


def done_record(work: Path, folder: Path) -> dict | None:
    """What the suite recorded when the run in `folder` finished (its command, seconds), or None."""
    path = work / "_suite" / folder.relative_to(work) / "done.json"
    return _read(path) if path.is_file() else None


def run_eval(work: Path, folder: Path) -> dict | None:
    """A finished train run's test-split evaluation (eval.json: per-pair margins against the starting model)."""
    if done_record(work, folder) is None or not (folder / "eval.json").is_file():
        return None
    found = _read(folder / "eval.json")
    found["margins"] = _finite_margins(found["margins"], folder / "eval.json")
    return found


def _finite_margins(values: list, source: Path) -> np.ndarray:
    """Per-pair margins as an array; a missing (None) or non-finite one is an error naming its file."""
    margins = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(margins)):
        raise ValueError(f"{source}: a margin is not finite")
    return margins


def test_groups(suite, dataset: str) -> np.ndarray:
    """The prompt (an index) of each pair of the dataset's test split, in file order: the runs' per-pair margins
    follow it, so the bootstrap can draw whole prompts."""
    from iopo.data.tokenize import prompt_key

    path = Path(suite.files(dataset)["test"])
    keys = [
        prompt_key(json.loads(line)["prompt"])
        for line in path.read_text(encoding="utf-8").splitlines()
        if line
    ]
    index: dict[str, int] = {}
    return np.array([index.setdefault(k, len(index)) for k in keys])


def test_longer_chosen(suite, dataset: str) -> np.ndarray:
    """Per test pair (file order): 1.0 when the labelled chosen answer is the longer (characters), 0.0 when the
    rejected is, NaN for equal lengths."""
    from iopo.data.loading import answer_chars

    out = []
    for line in Path(suite.files(dataset)["test"]).read_text(encoding="utf-8").splitlines():
        if line:
            row = json.loads(line)
            a, b = answer_chars(row["chosen"]), answer_chars(row["rejected"])
            out.append(np.nan if a == b else float(a > b))
    return np.array(out)


def longer_preference(evals: list[dict], longer_chosen: np.ndarray) -> list[np.ndarray]:
    """Per seed and test pair: 1 when the model's implicit reward prefers the longer answer, 0 when the shorter;
    pairs of equal length are left out (NaN, skipped by the means)."""
    return [
        np.where(np.isnan(longer_chosen), np.nan, (e["margins"] > 0) == (longer_chosen == 1.0)) for e in evals
    ]


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values))


def _groups_for(groups, runs: list[dict]):
    """`groups` when every run's margins cover the whole test split in its order, else None (pairs drawn alone)."""
    if groups is None or any(len(r["margins"]) != len(groups) for r in runs):
        return None
    return groups


def table_runs(suite, table: str, condition: str, method: str, seeds) -> tuple[list[Path], list[dict] | None]:
    """The run folders of one method of a table (and condition), one per seed, and their test evaluations: None
    unless every seed has finished (a method is never averaged over fewer seeds)."""
    folders = [suite.work / "/".join(x for x in (table, condition, f"seed-{s}", method) if x) for s in seeds]
    evals = [run_eval(suite.work, f) for f in folders]
    return folders, None if any(e is None for e in evals) else evals


def _seed_t(per_seed: list[np.ndarray], statistic) -> list[float]:
    """The seed-level t interval: statistic of each seed's own values, t over the seeds (nan for one seed)."""
    return _t_interval([statistic(v) for v in per_seed])["ci"]


def _with_intervals(out: dict, name: str, per_seed: list[np.ndarray], statistic, groups, family) -> None:
    out[name] = statistic(np.concatenate(per_seed))
    out[f"{name}_ci"] = two_level_bootstrap(per_seed, statistic, groups=groups)
    out[f"{name}_seed_t"] = _seed_t(per_seed, statistic)
    if family:
        out[f"{name}_family_ci"] = family_interval(per_seed, statistic, family, groups=groups)


def method_summary(evals: list[dict], groups=None) -> dict:
    """Margin reward and pairwise accuracy of one method: per seed with its bootstrap, and over seeds (seeds, then
    whole prompts when `groups` gives each test pair's prompt), with the seed-level t interval beside."""
    margins = [e["margins"] for e in evals]
    per_seed = [
        {
            "margin_reward": _mean(m),
            "margin_reward_ci": two_level_bootstrap([m], _mean, groups=groups),
            "pairwise_accuracy": _accuracy(m),
            "pairwise_accuracy_ci": two_level_bootstrap([m], _accuracy, groups=groups),
        }
        for m in margins
    ]
    out = {"seeds": len(evals), "pairs": int(len(margins[0]))}
    if groups is not None:
        out["prompts"] = len(set(np.asarray(groups).tolist()))
    _with_intervals(out, "margin_reward", margins, _mean, groups, None)
    _with_intervals(out, "pairwise_accuracy", margins, _accuracy, groups, None)
    return out | {"per_seed": per_seed}


def paired_difference(a: list[dict], b: list[dict], groups=None, family: int | None = None) -> dict:
    """a - b on the same test pairs and seeds: margin reward and pairwise accuracy, with the bootstrap interval
    (seeds, then whole prompts when `groups` is given), the seed-level t interval, and (family = the number of
    cells read together) the Bonferroni interval."""
    diff_margin = [x["margins"] - y["margins"] for x, y in zip(a, b, strict=True)]
    diff_acc = [(x["margins"] > 0).astype(float) - (y["margins"] > 0) for x, y in zip(a, b, strict=True)]
    out: dict = {}
    _with_intervals(out, "margin_reward", diff_margin, _mean, groups, family)
    _with_intervals(out, "pairwise_accuracy", diff_acc, _mean, groups, family)
    return out


def change_difference(
    a: list[dict], a0: list[dict], b: list[dict], b0: list[dict], groups=None, family: int | None = None
) -> dict:
    """(a - a0) - (b - b0) on the same test pairs and seeds: how much more method a changed between two conditions
    than method b did (a difference of paired differences), with the intervals of paired_difference."""
    runs = list(zip(a, a0, b, b0, strict=True))
    margin = [(x["margins"] - x0["margins"]) - (y["margins"] - y0["margins"]) for x, x0, y, y0 in runs]
    right = [
        ((x["margins"] > 0).astype(float) - (x0["margins"] > 0))
        - ((y["margins"] > 0).astype(float) - (y0["margins"] > 0))
        for x, x0, y, y0 in runs
    ]
    out: dict = {}
    _with_intervals(out, "margin_reward", margin, _mean, groups, family)
    _with_intervals(out, "pairwise_accuracy", right, _mean, groups, family)
    return out


def bias_change(suite, table: str = "bias", clean_table: str = "offline") -> dict:
    """Per corrupted condition and method: its change from the same method trained on clean labels (the offline
    table's runs, same seeds, same test pairs), and that change minus DPO's (negative: it degraded more than DPO)."""
    t = suite.spec["tables"][table]
    seeds = t.get("seeds", suite.spec["seeds"])
    if suite.spec["tables"].get(clean_table, {}).get("dataset") != t["dataset"]:
        return {}  # no clean runs on the same test pairs to compare with

    groups = test_groups(suite, t["dataset"])
    pairs_by_condition: dict = {}
    for condition in t.get("conditions") or {}:
        for method in t["methods"]:
            _, clean = table_runs(suite, clean_table, "", method, seeds)
            _, corrupted = table_runs(suite, table, condition, method, seeds)
            if clean is not None and corrupted is not None:
                pairs_by_condition.setdefault(condition, {})[method] = (corrupted, clean)
    # family: IOPO's change minus DPO's, per condition, two metrics
    return bias_rows(pairs_by_condition, groups, 2 * len(t.get("conditions") or {}))


def bias_rows(pairs_by_condition: dict, groups, family: int) -> dict:
    """{condition: {method: (corrupted evals, clean evals)}} -> per condition and method its change from clean
    ("minus_clean") and, beside DPO, that change minus DPO's ("minus_dpo_change", with the family's interval)."""
    out: dict = {}
    for condition, pairs in pairs_by_condition.items():
        rows = {
            m: {"minus_clean": paired_difference(c, c0, _groups_for(groups, c + c0))}
            for m, (c, c0) in pairs.items()
        }
        for method, (c, c0) in pairs.items():
            if method != "dpo" and "dpo" in pairs:
                g = _groups_for(groups, c + c0 + pairs["dpo"][0] + pairs["dpo"][1])
                rows[method]["minus_dpo_change"] = change_difference(c, c0, *pairs["dpo"], g, family)
        if rows:
            out[condition] = rows
    return out


def is_weight_stats(folders: list[Path]) -> dict:
    """IOPO's importance weights over training, per phase: the mean weight and the shares of pairs whose weight
    was cut low (rho < 1 - eps) or capped (rho > 1 + eps), averaged over steps and seeds, plus the curve."""
    per_phase: dict[str, dict[str, list]] = {}
    for folder in folders:
        for record in _jsonl(folder / "metrics.jsonl"):
            if "is/weight_mean" not in record:
                continue
            phase = per_phase.setdefault(
                record.get("agent", "?"), {"weight_mean": [], "low_frac": [], "capped_frac": [], "steps": {}}
            )
            phase["weight_mean"].append(record["is/weight_mean"])
            phase["low_frac"].append(record["is/low_frac"])
            phase["capped_frac"].append(record["is/capped_frac"])
            phase["steps"].setdefault(record["step"], []).append(record["is/weight_mean"])
    out = {}
    for agent, phase in per_phase.items():
        out[agent] = {
            "steps_logged": len(phase["weight_mean"]),
            "weight_mean": float(np.mean(phase["weight_mean"])),
            "low_frac": float(np.mean(phase["low_frac"])),
            "capped_frac": float(np.mean(phase["capped_frac"])),
            "curve": {int(s): float(np.mean(v)) for s, v in sorted(phase["steps"].items())},
        }
    return out


def curves(folders: list[Path]) -> dict:
    """Test-split margin reward and pairwise accuracy at each evaluated optimizer step, averaged over seeds."""
    points: dict[int, dict[str, list]] = {}
    for folder in folders:
        for record in _jsonl(folder / "metrics.jsonl"):
            if "eval/margin_reward" in record:
                p = points.setdefault(int(record["step"]), {"margin_reward": [], "pairwise_accuracy": []})
                p["margin_reward"].append(record["eval/margin_reward"])
                p["pairwise_accuracy"].append(record["eval/pairwise_accuracy"])
    return {s: {k: float(np.mean(v)) for k, v in p.items()} for s, p in sorted(points.items())}


# ---------------------------------------------------------------- judged answers: win / tie / lose


def judged(eval_folders: list[Path]) -> dict:
    """{judge: {model: win/tie/lose over seeds}} from the eval folders of one baseline (one folder per seed)."""
    outcomes: dict[tuple[str, str], list[list[list[str]]]] = {}
    positions: dict[tuple[str, str], list[float]] = {}
    checks: dict[str, list[dict]] = {}
    for folder in eval_folders:
        found = _read(folder / "eval.json")
        for judge, entry in found["judges"].items():
            if entry.get("check"):
                checks.setdefault(judge, []).append(entry["check"])
            for model, tables in entry["models"].items():
                table = tables.get("table1")
                if table and "outcomes" in table:
                    outcomes.setdefault((judge, model), []).append(table["outcomes"])
                if table and table.get("first_position_share") is not None:
                    positions.setdefault((judge, model), []).append(table["first_position_share"])
    out: dict = {}
    for (judge, model), seeds in outcomes.items():
        # per seed: prompts x answers -> one array of per-prompt shares (equal weight per prompt)
        arrays = [_prompt_shares(groups) for groups in seeds]
        row = {"seeds": len(seeds), "prompts": int(sum(len(a) for a in arrays))}
        # every seed judges the same first prompts of the test split: one prompt draw for all seeds
        same = np.arange(len(arrays[0])) if len({len(a) for a in arrays}) == 1 else None
        for i, key in enumerate(("win", "tie", "lose")):
            pooled = np.concatenate(arrays)[:, i]
            row[key] = float(pooled.mean())
            row[f"{key}_ci"] = two_level_bootstrap([a[:, i] for a in arrays], _mean, seed=i, groups=same)
        wl = [a[:, 0] - a[:, 2] for a in arrays]
        row["win_minus_lose"] = _mean(np.concatenate(wl))
        row["win_minus_lose_ci"] = two_level_bootstrap(wl, _mean, seed=7, groups=same)
        row["win_minus_lose_seed_t"] = _seed_t(wl, _mean)
        if (
            judge,
            model,
        ) in positions:  # how often the judge picked the first answer shown (both orders asked)
            row["first_position_share"] = float(np.mean(positions[(judge, model)]))
        if checks.get(judge):  # iopo eval's check of the judge on labelled pairs, per seed's eval
            row["judge_check"] = {
                "agreement": [c["agreement"] for c in checks[judge]],
                "informative": all(c["informative"] for c in checks[judge]),
            }
        out.setdefault(judge, {})[model] = row
    return out


def _prompt_shares(groups: list[list[str]]) -> np.ndarray:
    rows = []
    for group in groups:
        valid = [o for o in group if o in ("win", "tie", "lose", "bad")]
        if valid:
            rows.append([sum(o == k for o in valid) / len(valid) for k in ("win", "tie", "lose")])
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


# ---------------------------------------------------------------- online rounds


def online_summary(folders_by_method: dict[str, list[Path]]) -> dict:
    """Per method and round: margin reward, pairwise accuracy and the judged win rate against the starting policy,
    mean over seeds with a t interval over the seeds' values (each round's bootstrap interval over prompts is in
    the run's round_k/scores.json); and the judge requests spent on annotation."""
    out = {}
    for method, folders in folders_by_method.items():
        rounds: dict[int, dict[str, list]] = {}
        annotations = []
        for folder in folders:
            summary = _read(folder / "online.json")
            for r in summary.get("rounds", []):
                scores = r.get("scores") or {}
                values = {
                    "trained_pairs": r.get("trained_pairs"),
                    "kept_pairs": (r.get("pairs") or {}).get("kept"),
                    "margin_sd": _round_margin_sd(folder, int(r["round"])),
                    "margin_reward": scores.get("margin_reward"),
                    "pairwise_accuracy": scores.get("pairwise_accuracy"),
                    "win_rate": (scores.get("judged") or {}).get("win"),
                    "lose_rate": (scores.get("judged") or {}).get("lose"),
                }
                entry = rounds.setdefault(int(r["round"]), {})
                for key, value in values.items():
                    if value is not None:
                        entry.setdefault(key, []).append(float(value))
            annotations.append(summary["totals"]["annotation"]["requests"])
        out[method] = {
            "seeds": len(folders),
            "annotation_requests_per_run": float(np.mean(annotations)) if annotations else 0.0,
            "rounds": {k: {m: _t_interval(v) for m, v in vals.items()} for k, vals in sorted(rounds.items())},
        }
    return out


def _round_margin_sd(folder: Path, round_: int) -> float | None:
    """The standard deviation of a round's per-pair test margins (Fig. 4's spread), when the round kept them."""
    path = folder / f"round_{round_}" / "scores.json"
    margins = _read(path).get("margins") if path.is_file() else None
    return float(np.std(_finite_margins(margins, path))) if margins else None


def _last_round_scores(folder: Path) -> dict:
    rounds = [int(p.name.split("_")[1]) for p in folder.glob("round_*") if (p / "scores.json").is_file()]
    if not rounds:
        raise ValueError(f"{folder}: no round was scored")
    path = folder / f"round_{max(rounds)}" / "scores.json"
    scores = _read(path) | {"round": max(rounds)}
    margins = scores.pop("margins", None)
    if margins:  # runs scored before iopo kept them have none
        scores["margins"] = _finite_margins(margins, path)
    return scores


def online_compare(
    folders_by_method: dict[str, list[Path]], baselines=("iter_dpo", "dpo"), groups=None
) -> dict:
    """Each method minus each baseline after the last round, paired on the same seeds: margin reward and pairwise
    accuracy on the same test pairs (two-level bootstrap over seeds and pairs, from each run's per-pair margins),
    and the reward model's win rate against the starting policy (t interval over the seeds' differences)."""
    last = {m: [_last_round_scores(f) for f in fs] for m, fs in folders_by_method.items()}
    out: dict = {}
    for baseline in baselines:
        if baseline not in last:
            continue
        for method, scores in last.items():
            if method == baseline:
                continue
            base = last[baseline]
            row: dict = {"round": scores[0]["round"], "seeds": len(scores)}
            if all("margins" in s for s in scores + base):
                row |= paired_difference(scores, base, _groups_for(groups, scores + base), 4)
            wins = [[(s.get("judged") or {}).get("win") for s in side] for side in (scores, base)]
            if all(w is not None for side in wins for w in side):
                row["win_rate"] = _t_interval([a - b for a, b in zip(*wins, strict=True)])
            out.setdefault(f"minus {baseline}", {})[method] = row
    return out


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
T975 |= {11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 24: 2.064, 29: 2.045}


def _t_interval(values: list[float]) -> dict:
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "ci": [math.nan, math.nan], "n": len(x)}
    dof = len(x) - 1
    half = T975[max(k for k in T975 if k <= dof)] * float(x.std(ddof=1)) / math.sqrt(len(x))
    return {"mean": mean, "ci": [mean - half, mean + half], "n": len(x)}


# ---------------------------------------------------------------- the results of the whole suite


def _seconds(work: Path, planned: set[str] | None = None) -> dict:
    """Wall seconds of every finished run, per table (the compute the suite spent), and the CPU seconds of the runs
    that recorded them: {table: seconds, ..., "cpu": {table: seconds}, "outside_plan": {...}}. Runs that the plan
    no longer lists (a learning rate dropped from the sweep's grid) are counted apart, in "outside_plan"."""
    out: dict = {"cpu": {}, "outside_plan": {"runs": 0, "seconds": 0.0, "cpu_seconds": 0.0}}
    for done in (work / "_suite").rglob("done.json"):
        key = done.parent.relative_to(work / "_suite").as_posix()
        record = _read(done)
        if planned is not None and key not in planned:
            extra = out["outside_plan"]
            extra["runs"] += 1
            extra["seconds"] += record["seconds"]
            extra["cpu_seconds"] += record.get("cpu_seconds", 0.0)
            continue
        table = key.split("/")[0]
        out[table] = out.get(table, 0.0) + record["seconds"]
        if "cpu_seconds" in record:
            out["cpu"][table] = out["cpu"].get(table, 0.0) + record["cpu_seconds"]
    return out


def planned_keys(suite) -> set[str]:
    """The keys of every run the suite's plan lists (tables whose learning rates are not chosen yet are left out)."""
    stages = suite.known_runs(list(suite.spec["tables"]))
    return {run.key for _, runs in stages if isinstance(runs, list) for run in runs}


def _wall(compute: dict) -> dict[str, float]:
    return {table: seconds for table, seconds in compute.items() if table not in ("cpu", "outside_plan")}


READING_BASE = "iopo_equal_compute"  # the ablations of our reading are compared with IOPO at the same compute


def _is_reading(suite, method: str) -> bool:
    """An IOPO run at equal total compute: the default reading's ablations (adversary, clip, log-prob form)."""
    settings = suite.spec["methods"][method]
    return settings["method"] == "iopo" and settings.get("budget") == "total_steps"


def offline_table(suite, table: str) -> dict | None:
    t = suite.spec["tables"][table]
    seeds = t.get("seeds", suite.spec["seeds"])
    conditions = t.get("conditions") or {"": {}}
    out: dict = {"dataset": t["dataset"], "seeds": seeds, "conditions": {}}
    groups = test_groups(suite, t["dataset"])
    out["prompts"] = int(len(set(groups.tolist())))
    for condition in conditions:
        methods, evals_of = {}, {}
        for method in t["methods"]:
            folders, evals = table_runs(suite, table, condition, method, seeds)
            if evals is None:
                continue  # not every seed has finished: left out, not averaged over fewer seeds
            evals_of[method] = evals
            methods[method] = method_summary(evals, _groups_for(groups, evals))
            methods[method]["curve"] = curves(folders)
            if suite.spec["methods"][method]["method"] == "iopo":
                methods[method]["is_weights"] = is_weight_stats(folders)
            seconds = [done_record(suite.work, f)["seconds"] for f in folders]
            methods[method]["seconds_per_run"] = float(np.mean(seconds))
        add_contrasts(suite, methods, evals_of, groups)
        if not methods:
            continue  # nothing finished on every seed yet: no empty table
        out["conditions"][condition or "clean"] = {
            "methods": methods,
            "margins": {m: np.concatenate([e["margins"] for e in ev]).tolist() for m, ev in evals_of.items()},
        }
    if t.get("judged"):
        out["judged"] = {}
        for baseline in t["judged"]["baselines"]:
            for judge in ("rm", "llm"):
                folders = [suite.work / f"{table}-eval/seed-{s}/{judge}-vs-{baseline}" for s in seeds]
                if all(done_record(suite.work, f) for f in folders):
                    out["judged"].setdefault(f"vs {baseline}", {}).update(judged(folders))
    return out if out["conditions"] else None


def add_contrasts(suite, rows: dict, evals_of: dict, groups) -> None:
    """Into each method's row: "minus_dpo" (every method against DPO, two metrics: a family of 2 x (methods - 1)
    cells) and, for the ablations of our reading, "minus_reading_base" (IOPO at the same compute)."""
    family = 2 * (len(evals_of) - 1)
    if "dpo" in evals_of:
        for method, evals in evals_of.items():
            if method != "dpo":
                g = _groups_for(groups, evals + evals_of["dpo"])
                rows[method]["minus_dpo"] = paired_difference(evals, evals_of["dpo"], g, family)
    base = READING_BASE if READING_BASE in evals_of else None
    readings = [m for m in evals_of if base and m != base and _is_reading(suite, m)]
    for method in readings:
        g = _groups_for(groups, evals_of[method] + evals_of[base])
        rows[method]["minus_reading_base"] = paired_difference(
            evals_of[method], evals_of[base], g, 2 * len(readings)
        )


def write_results(suite, tables: list[str], results_dir: Path, docs: Path | None) -> dict:
    """Aggregate every finished run of `tables` into results_dir (JSON, PNG) and docs/results.md's tables."""
    from suite import choose_learning_rates

    results_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"compute_seconds": _seconds(suite.work, planned_keys(suite))}
    if (suite.work / "sweep" / "choice.json").is_file():
        results["sweep"] = choose_learning_rates(suite)
    for table in tables:
        if table == "sweep":
            continue
        if table == "online":
            t = suite.spec["tables"]["online"]
            folders = {
                m: [suite.work / f"online/seed-{s}/{m}" for s in t.get("seeds", suite.spec["seeds"])]
                for m in t["methods"]
            }
            finished = {m: fs for m, fs in folders.items() if all(done_record(suite.work, f) for f in fs)}
            results["online"] = online_summary(finished)
            results["online_compare"] = (
                online_compare(finished, groups=test_groups(suite, t["dataset"])) or None
            )
        else:
            results[table] = offline_table(suite, table)
            if table == "bias" and results[table] is not None:
                results[table]["change_from_clean"] = bias_change(suite)
        for data in suite.data.values():
            name = Path(data["splits"]["train"]["file"]).parent.name
            results.setdefault("data", {})[name] = {k: v for k, v in data.items() if k != "spec"} | {
                "test_prompt_of_pair": test_groups(suite, name).tolist()
            }
    for rm_eval in sorted((suite.work / "rm").glob("*/eval.json")):  # the judge's own held-out accuracy
        found = _read(rm_eval)
        results.setdefault("reward_model", {})[rm_eval.parent.name] = {
            k: found.get(k) for k in ("pairwise_accuracy", "n_pairs", "pairwise_accuracy_ci") if k in found
        }
    for name, value in results.items():
        if name == "compute_seconds" or value is None:
            continue
        (results_dir / f"{name}.json").write_text(
            json.dumps(_strip(value), indent=1, allow_nan=False), encoding="utf-8"
        )
    (results_dir / "compute.json").write_text(
        json.dumps(results["compute_seconds"], indent=1), encoding="utf-8"
    )
    figures = make_figures(results, results_dir)
    if docs is not None:
        write_docs(docs, results, figures, results_dir)
    total = sum(_wall(results["compute_seconds"]).values())
    print(
        f"[suite] results in {results_dir} ({len(figures)} figures); runs' wall time {total / 3600:.2f} h in all"
    )
    return results


def _strip(value):
    """JSON-ready: numpy scalars to floats, file paths made relative to nothing machine-specific."""
    if isinstance(value, dict):
        return {str(k): _strip(v) for k, v in value.items() if k != "file"}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


# ---------------------------------------------------------------- figures


def _save(plt, fig, path: Path, made: list[str]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path.name)


def make_figures(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    offline = (results.get("offline") or {}).get("conditions", {}).get("clean")
    if offline and offline["methods"]:
        # one box per method (quartiles, whiskers at the 5th and 95th percentiles, the mean as a diamond): ten
        # overlaid histograms could not be told apart
        names = list(offline["margins"])
        data = [np.asarray(offline["margins"][m]) for m in names]
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.6))
        ax.boxplot(
            data,
            vert=False,
            whis=(5, 95),
            showfliers=False,
            showmeans=True,
            meanprops={"marker": "D", "markerfacecolor": "#c33", "markeredgecolor": "#c33", "markersize": 4},
        )
        ax.set_yticks(
            range(1, len(names) + 1),
            [f"{m} (mean {x.mean():+.3f})" for m, x in zip(names, data, strict=True)],
        )
        ax.invert_yaxis()
        ax.axvline(0, color="#888", lw=0.8)
        ax.set(
            xlabel="margin reward on a held-out pair (seeds pooled)",
            title="Margin-reward distributions (Fig. 3)\nbox: quartiles, whiskers: 5th-95th percentile, diamond: mean",
        )
        _save(plt, fig, out / "margins.png", made)

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for method, row in offline["methods"].items():
            curve = row.get("curve") or {}
            if curve:
                steps = list(curve)
                axes[0].plot(steps, [curve[s]["margin_reward"] for s in steps], marker="o", label=method)
                axes[1].plot(steps, [curve[s]["pairwise_accuracy"] for s in steps], marker="o", label=method)
        axes[0].set(
            xlabel="optimizer steps (IOPO: both players')",
            ylabel="margin reward",
            title="Margin reward (Fig. 5)",
        )
        axes[1].set(
            xlabel="optimizer steps (IOPO: both players')",
            ylabel="pairwise accuracy",
            title="Pairwise accuracy",
        )
        axes[1].legend(fontsize=7)
        _save(plt, fig, out / "curves.png", made)

        weights = {m: r["is_weights"] for m, r in offline["methods"].items() if r.get("is_weights")}
        if weights:
            fig, ax = plt.subplots(figsize=(8, 4.2))
            for method, phases in weights.items():
                for agent, stats in phases.items():
                    steps = list(stats["curve"])
                    ax.plot(steps, [stats["curve"][s] for s in steps], marker=".", label=f"{method}: {agent}")
            ax.set(
                xlabel="optimizer step",
                ylabel="mean IS weight of the batch",
                title="IOPO's importance weights",
            )
            ax.legend(fontsize=7)
            _save(plt, fig, out / "is_weights.png", made)

    bias = results.get("bias")
    if bias and bias["conditions"]:
        clean = (results.get("offline") or {}).get("conditions", {}).get("clean", {}).get("methods", {})
        fig, ax = plt.subplots(figsize=(8, 4.5))
        labels = ["clean"] + list(bias["conditions"])
        shown = dict.fromkeys(m for c in bias["conditions"].values() for m in c["methods"])
        for i, method in enumerate(shown):
            rows = [clean.get(method)] + [c["methods"].get(method) for c in bias["conditions"].values()]
            xs = [j + (i - 1) * 0.12 for j, r in enumerate(rows) if r]
            ys = [r["pairwise_accuracy"] for r in rows if r]
            err = np.array(
                [
                    [
                        r["pairwise_accuracy"] - r["pairwise_accuracy_ci"][0],
                        r["pairwise_accuracy_ci"][1] - r["pairwise_accuracy"],
                    ]
                    for r in rows
                    if r
                ]
            ).T
            ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, label=method)
        ax.set_xticks(range(len(labels)), labels)
        ax.set(
            ylabel="pairwise accuracy on clean held-out pairs",
            title="Annotator bias: corrupted training labels",
        )
        ax.legend()
        _save(plt, fig, out / "bias.png", made)

    online = results.get("online")
    if online:
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        for i, (method, row) in enumerate(online.items()):
            rounds = list(row["rounds"])
            shift = (i - (len(online) - 1) / 2) * 0.06  # side by side: the error bars would hide each other
            for ax, key in zip(axes, ("margin_reward", "pairwise_accuracy", "win_rate"), strict=True):
                pts = [(k, row["rounds"][k][key]) for k in rounds if key in row["rounds"][k]]
                if pts:
                    ax.errorbar(
                        [int(p[0]) + shift for p in pts],
                        [p[1]["mean"] for p in pts],
                        yerr=np.array(
                            [[p[1]["mean"] - p[1]["ci"][0], p[1]["ci"][1] - p[1]["mean"]] for p in pts]
                        ).T,
                        fmt="o-",
                        capsize=3,
                        label=method,
                    )
                ax.set(
                    xlabel="round",
                    ylabel={"win_rate": "RM win rate vs the start"}.get(key, key.replace("_", " ")),
                )
                ax.set_xticks([int(k) for k in rounds])
        axes[0].set_title("Online rounds (mean of seeds, 95% t interval)")
        axes[2].legend()
        _save(plt, fig, out / "online.png", made)
    return made


# ---------------------------------------------------------------- docs/results.md


def _ci(value: float, ci, digits: int = 3) -> str:
    if ci is None or any(v is None or not math.isfinite(v) for v in ci):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def offline_markdown(table: dict) -> str:
    lines = []
    for condition, found in table["conditions"].items():
        if len(table["conditions"]) > 1:
            lines.append(f"\n**{condition}**\n")
        lines += [
            "| method | margin reward | pairwise accuracy | − DPO: margin | − DPO: accuracy | s/run |",
            "|---|---|---|---|---|---|",
        ]
        for method, row in found["methods"].items():
            diff = row.get("minus_dpo")
            lines.append(
                f"| {method} | {_ci(row['margin_reward'], row['margin_reward_ci'], 4)} | "
                f"{_ci(row['pairwise_accuracy'], row['pairwise_accuracy_ci'])} | "
                + (
                    f"{_ci(diff['margin_reward'], diff['margin_reward_ci'], 4)} | {_ci(diff['pairwise_accuracy'], diff['pairwise_accuracy_ci'])}"
                    if diff
                    else "— | —"
                )
                + f" | {row['seconds_per_run']:.0f} |"
            )
    return "\n".join(lines)


def readings_markdown(table: dict) -> str:
    """Each ablation of our reading minus IOPO as ALGORITHM.md reads it, at the same compute (paired)."""
    lines = [
        f"| reading | margin reward | pairwise accuracy | − {READING_BASE}: margin | − {READING_BASE}: accuracy |",
        "|---|---|---|---|---|",
    ]
    methods = table["conditions"]["clean"]["methods"]
    for method, row in methods.items():
        diff = row.get("minus_reading_base")
        if method == READING_BASE or diff:
            lines.append(
                f"| {method} | {_ci(row['margin_reward'], row['margin_reward_ci'], 4)} | "
                f"{_ci(row['pairwise_accuracy'], row['pairwise_accuracy_ci'])} | "
                + (
                    f"{_ci(diff['margin_reward'], diff['margin_reward_ci'], 4)} | "
                    f"{_ci(diff['pairwise_accuracy'], diff['pairwise_accuracy_ci'])} |"
                    if diff
                    else "— | — |"
                )
            )
    return "\n".join(lines)


def _difference_cells(d: dict | None) -> list[str]:
    """The margin and accuracy cells of a paired difference with its intervals (dashes when there is none)."""
    if not d:
        return ["—", "—"]
    return [
        _ci(d["margin_reward"], d["margin_reward_ci"], 4),
        _ci(d["pairwise_accuracy"], d["pairwise_accuracy_ci"]),
    ]


def bias_change_markdown(change: dict) -> str:
    head = "| condition | method | − clean: margin | − clean: accuracy | − DPO's change: margin | − DPO's change: accuracy |"
    lines = [head, "|---" * 6 + "|"]
    for condition, rows in change.items():
        for method, row in rows.items():
            cells = _difference_cells(row.get("minus_clean")) + _difference_cells(row.get("minus_dpo_change"))
            lines.append(f"| {condition} | {method} | {' | '.join(cells)} |")
    return "\n".join(lines)


def judged_markdown(table: dict) -> str:
    lines = ["| baseline | judge | method | win | tie | lose | win − lose |", "|---|---|---|---|---|---|---|"]
    for baseline, judges in table.get("judged", {}).items():
        for judge, models in judges.items():
            for model, row in models.items():
                lines.append(
                    f"| {baseline} | {judge} | {model} | {_ci(row['win'], row['win_ci'], 2)} | "
                    f"{_ci(row['tie'], row['tie_ci'], 2)} | {_ci(row['lose'], row['lose_ci'], 2)} | "
                    f"{_ci(row['win_minus_lose'], row['win_minus_lose_ci'], 2)} |"
                )
    return "\n".join(lines)


def weights_markdown(table: dict) -> str:
    lines = [
        "| run | phase | mean weight | share cut low (ρ < 1−ε) | share capped (ρ > 1+ε) |",
        "|---|---|---|---|---|",
    ]
    for method, row in table["conditions"]["clean"]["methods"].items():
        for agent, stats in (row.get("is_weights") or {}).items():
            lines.append(
                f"| {method} | {agent} | {stats['weight_mean']:.3f} | {stats['low_frac']:.3f} | {stats['capped_frac']:.3f} |"
            )
    return "\n".join(lines)


def online_markdown(online: dict) -> str:
    lines = [
        "| method | round | margin reward | pairwise accuracy | RM win rate vs start | annotation requests/run |",
        "|---|---|---|---|---|---|",
    ]
    for method, row in online.items():
        for k, vals in row["rounds"].items():
            cells = [
                _ci(vals[key]["mean"], vals[key]["ci"], 4 if key == "margin_reward" else 3)
                if key in vals
                else "—"
                for key in ("margin_reward", "pairwise_accuracy", "win_rate")
            ]
            lines.append(
                f"| {method} | {k} | {' | '.join(cells)} | {row['annotation_requests_per_run']:.0f} |"
            )
    return "\n".join(lines)


def online_compare_markdown(compare: dict) -> str:
    head = "| comparison | method | round | − baseline: margin | − baseline: accuracy | − baseline: RM win rate vs start |"
    lines = [head, "|---" * 6 + "|"]
    for name, rows in compare.items():
        for method, row in rows.items():
            cells = _difference_cells(row if "margin_reward" in row else None)
            win = row.get("win_rate")
            cells.append(_ci(win["mean"], win["ci"]) if win else "—")
            lines.append(f"| {name} | {method} | {row['round']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def sweep_markdown(sweep: dict) -> str:
    rates = sorted({lr for row in sweep["validation"].values() for lr in row}, key=float)
    lines = [
        "| method | " + " | ".join(f"lr {r}" for r in rates) + " | chosen |",
        "|---" * (len(rates) + 2) + "|",
    ]
    for method, row in sweep["validation"].items():
        cells = [
            f"{row[r]['validation_accuracy']:.3f} ({row[r]['validation_margin']:+.4f})" if r in row else "—"
            for r in rates
        ]
        lines.append(f"| {method} | {' | '.join(cells)} | {sweep['choice'][method]:g} |")
    return "\n".join(lines)


def write_docs(docs: Path, results: dict, figures: list[str], results_dir: Path) -> None:
    blocks = {}
    if results.get("sweep"):
        blocks["sweep"] = sweep_markdown(results["sweep"])
    for name in ("offline", "offline_hh", "bias"):
        if results.get(name):
            blocks[name] = offline_markdown(results[name])
    clean = (results.get("offline") or {}).get("conditions", {}).get("clean", {}).get("methods", {})
    if any(row.get("minus_reading_base") for row in clean.values()):
        blocks["readings"] = readings_markdown(results["offline"])
    if clean:
        blocks["weights"] = weights_markdown(results["offline"])
    if (results.get("offline") or {}).get("judged"):
        blocks["judged"] = judged_markdown(results["offline"])
    if (results.get("bias") or {}).get("change_from_clean"):
        blocks["bias_change"] = bias_change_markdown(results["bias"]["change_from_clean"])
    if results.get("online"):
        blocks["online"] = online_markdown(results["online"])
    if results.get("online_compare"):
        blocks["online_compare"] = online_compare_markdown(results["online_compare"])
    wall, cpu = _wall(results["compute_seconds"]), results["compute_seconds"]["cpu"]
    per_table = ", ".join(f"{k} {v / 60:.0f} min" for k, v in sorted(wall.items()))
    blocks["compute"] = f"Runs' wall time: {sum(wall.values()) / 3600:.2f} h in all ({per_table})."
    if cpu:
        blocks["compute"] += (
            f" CPU time of the runs that recorded it ({', '.join(sorted(cpu))}): {sum(cpu.values()) / 3600:.2f} h"
            " (user + system, all threads; wall time grows when other work shares the CPU, this does not)."
        )
    extra = results["compute_seconds"].get("outside_plan") or {}
    if extra.get("runs"):
        blocks["compute"] += (
            f" Not counted above: {extra['runs']} finished runs the plan no longer lists (an earlier sweep grid),"
            f" {extra['seconds'] / 60:.0f} min of wall time."
        )
    for name, body in blocks.items():
        replace_block(docs, name, body)


def replace_block(docs: Path, name: str, body: str, prefix: str = "suite") -> None:
    """docs' text between <!-- PREFIX:NAME --> and <!-- /PREFIX:NAME --> becomes body (appended when absent); the
    prose around it is left as it is."""
    text = docs.read_text(encoding="utf-8") if docs.is_file() else ""
    pattern = re.compile(rf"<!-- {prefix}:{name} -->.*?<!-- /{prefix}:{name} -->", re.S)
    block = f"<!-- {prefix}:{name} -->\n{body}\n<!-- /{prefix}:{name} -->"
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text + f"\n{block}\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------- re-grading the committed tables


def _committed_evals(margins: list, seeds: int) -> list[dict]:
    """A method's pooled per-pair margins (seed after seed, as results/*.json keep them) -> one eval per seed."""
    values = np.asarray(margins, dtype=np.float64)
    if len(values) % seeds:
        raise ValueError(f"{len(values)} margins do not split into {seeds} seeds")
    return [{"margins": part} for part in np.split(values, seeds)]


def length_preference(
    suite, clean: dict, corrupted: dict, dataset: str, groups, methods: tuple[str, str]
) -> dict:
    """How often each model's implicit reward prefers the longer answer of a clean test pair, trained on clean labels
    and under each corrupted annotator; each shift from clean, and the second method's shift minus the first's
    (and their ratio). clean: {method: evals}; corrupted: {condition: {method: evals}}."""
    longer = test_longer_chosen(suite, dataset)

    def shares_of(evals):
        return [p.astype(float) for p in longer_preference(evals, longer)]

    def summary(values) -> dict:
        return {
            "share": _nanmean(np.concatenate(values)),
            "ci": two_level_bootstrap(values, _nanmean, groups=groups),
            "seed_t": _seed_t(values, _nanmean),
        }

    first, second = methods
    by_condition: dict = {"clean": {m: summary(shares_of(clean[m])) for m in methods if m in clean}}
    for condition, runs in corrupted.items():
        rows, shifts = {}, {}
        for m in methods:
            if m not in runs or m not in clean:
                continue
            prefs = shares_of(runs[m])
            shifts[m] = [a - b for a, b in zip(prefs, shares_of(clean[m]), strict=True)]
            rows[m] = summary(prefs) | {
                "shift_from_clean": _nanmean(np.concatenate(shifts[m])),
                "shift_ci": two_level_bootstrap(shifts[m], _nanmean, groups=groups),
            }
        if len(shifts) == 2:
            diff = [a - b for a, b in zip(shifts[second], shifts[first], strict=True)]
            rows["iopo_shift_over_dpo_shift"] = (
                rows[second]["shift_from_clean"] / rows[first]["shift_from_clean"]
            )
            rows["iopo_shift_minus_dpo_shift"] = {
                "value": _nanmean(np.concatenate(diff)),
                "ci": two_level_bootstrap(diff, _nanmean, groups=groups),
            }
        by_condition[condition] = rows
    return {
        "what": "share of clean test pairs (of unequal lengths) where the model's implicit reward prefers the "
        "longer answer; shift = the same method's share minus its share trained on clean labels",
        "pairs_of_unequal_length": int(np.sum(~np.isnan(longer))),
        "test_pairs_longer_chosen": _nanmean(longer),
        "by_condition": by_condition,
    }


def regrade(suite, results_dir: Path) -> dict:
    """Every offline and bias contrast again, from the committed per-pair margins, with whole prompts resampled (the
    same draw for all seeds), the seed-level t interval, and the Bonferroni interval of each family of cells read
    together. The test splits are rebuilt from the committed data and checked against data.json's checksums, which
    gives each pair's prompt."""
    data = _read(results_dir / "data.json")
    groups = {}
    for name, found in data.items():
        suite.files(name)  # rebuilds the split files when missing
        made = suite.data[name]
        if made["splits"]["test"]["sha256"] != found["splits"]["test"]["sha256"]:
            raise ValueError(f"the rebuilt {name} test split differs from the committed one (data.json)")
        groups[name] = test_groups(suite, name)
    out: dict = {"prompts": {k: int(len(set(g.tolist()))) for k, g in groups.items()}, "tables": {}}
    evals: dict = {}
    datasets: dict = {}
    for table in ("offline", "offline_hh", "bias"):
        path = results_dir / f"{table}.json"
        if not path.is_file():
            continue
        found = _read(path)
        g, seeds = groups[found["dataset"]], len(found["seeds"])
        datasets[table] = found["dataset"]
        for condition, entry in found["conditions"].items():
            runs = {m: _committed_evals(v, seeds) for m, v in entry["margins"].items()}
            evals[(table, condition)] = runs
            rows = {m: method_summary(ev, g) for m, ev in runs.items()}
            add_contrasts(suite, rows, runs, g)
            for m, row in rows.items():
                old = entry["methods"][m]
                row["pair_bootstrap"] = {  # the committed intervals: pairs drawn as if independent
                    k: old[k] for k in ("margin_reward_ci", "pairwise_accuracy_ci")
                } | ({"minus_dpo": old["minus_dpo"]} if "minus_dpo" in old else {})
            out["tables"].setdefault(table, {})[condition] = rows
    clean = evals.get(("offline", "clean"))
    corrupted = {c: runs for (t, c), runs in evals.items() if t == "bias"}
    if clean and corrupted:
        g = groups[datasets["bias"]]
        out["length_preference"] = length_preference(
            suite, clean, corrupted, datasets["bias"], g, ("dpo", "iopo_equal_compute")
        )
        pairs_by_condition = {
            condition: {m: (ev, clean[m]) for m, ev in runs.items() if m in clean}
            for condition, runs in corrupted.items()
        }
        out["bias_change"] = bias_rows(pairs_by_condition, g, 2 * len(corrupted))
    (results_dir / "regraded.json").write_text(
        json.dumps(_strip(out), indent=1, allow_nan=False), encoding="utf-8"
    )
    return out


def length_preference_markdown(out: dict) -> str:
    """The bias table's length metric: how often each model prefers the longer answer, per annotator."""
    lp = out["length_preference"]
    lines = [
        "| training labels | DPO: prefers the longer | shift from clean | IOPO (equal compute) | shift from clean | "
        "IOPO's shift − DPO's | IOPO's shift / DPO's |",
        "|---|---|---|---|---|---|---|",
    ]

    def ci(c):
        return f"[{c[0]:.3f}, {c[1]:.3f}]"

    for condition, rows in lp["by_condition"].items():
        dpo, iopo = rows.get("dpo"), rows.get("iopo_equal_compute")
        if not dpo or not iopo:
            continue
        cells = [f"{dpo['share']:.3f} {ci(dpo['ci'])}"]
        cells.append(f"{dpo['shift_from_clean']:+.3f} {ci(dpo['shift_ci'])}" if "shift_ci" in dpo else "—")
        cells.append(f"{iopo['share']:.3f} {ci(iopo['ci'])}")
        cells.append(f"{iopo['shift_from_clean']:+.3f} {ci(iopo['shift_ci'])}" if "shift_ci" in iopo else "—")
        d = rows.get("iopo_shift_minus_dpo_shift")
        cells.append(f"{d['value']:+.3f} {ci(d['ci'])}" if d else "—")
        ratio = rows.get("iopo_shift_over_dpo_shift")
        cells.append(f"{ratio:.2f}" if ratio is not None else "—")
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def regraded_markdown(out: dict) -> str:
    """Each contrast against DPO (and IOPO's bias changes): the committed pair-level interval beside the prompt-level
    one, the seed-level t interval and the family's Bonferroni interval."""

    def cell(row: dict, key: str, digits: int) -> list[str]:
        def ci(c):
            return f"[{c[0]:+.{digits}f}, {c[1]:+.{digits}f}]"

        return [
            f"{row[key]:+.{digits}f}",
            ci(row[f"{key}_ci"]),
            ci(row[f"{key}_seed_t"]),
            ci(row[f"{key}_family_ci"]),
        ]

    lines = [
        "| table | contrast | metric | estimate | pairs drawn alone (committed) | whole prompts | seed t | "
        "Bonferroni (family) |",
        "|---|---|---|---:|---|---|---|---|",
    ]
    for table, conditions in out["tables"].items():
        for condition, rows in conditions.items():
            for method, row in rows.items():
                if "minus_dpo" not in row:
                    continue
                for key, digits in (("margin_reward", 3), ("pairwise_accuracy", 3)):
                    old = row["pair_bootstrap"].get("minus_dpo", {}).get(f"{key}_ci")
                    est, prompt, seed_t, family = cell(row["minus_dpo"], key, digits)
                    old_text = f"[{old[0]:+.{digits}f}, {old[1]:+.{digits}f}]" if old else "-"
                    name = table if condition == "clean" else f"{table} ({condition})"
                    lines.append(
                        f"| {name} | {method} − dpo | {key.replace('_', ' ')} | {est} | {old_text} | {prompt} | "
                        f"{seed_t} | {family} |"
                    )
    for condition, rows in out.get("bias_change", {}).items():
        for method, row in rows.items():
            if "minus_dpo_change" not in row:
                continue
            for key in ("margin_reward", "pairwise_accuracy"):
                est, prompt, seed_t, family = cell(row["minus_dpo_change"], key, 3)
                lines.append(
                    f"| bias ({condition}) | {method}'s change − dpo's | {key.replace('_', ' ')} | {est} | - | "
                    f"{prompt} | {seed_t} | {family} |"
                )
    return "\n".join(lines)
