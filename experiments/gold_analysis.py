"""The gold-reward testbed's results (experiments/gold.py): the reward-KL frontier per annotator and method, and the
contrasts that decide the question, from the committed per-prompt scores in results_dir/scores/.

Intervals: 95%, from a bootstrap that draws seeds with replacement and then whole held-out prompts, one prompt draw
shared by every seed and method (the same prompts are read by all of them), so a difference between two methods is
paired by prompt and seed. Beside it, a t interval over the seeds' own means. A contrast at matched KL reads one
method's gold reward where its frontier (start, then its checkpoints in order of KL, linearly interpolated) reaches
the other method's KL; outside its KL range it is not extrapolated. The primary contrast reads both frontiers at the
largest KL both reach.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from analysis import N_BOOT, _quantiles, _t_interval, replace_block

PRIMARY = (
    "gold reward of a method minus DPO's at the largest KL both frontiers reach (each frontier: the best gold reward "
    "reached at or below a KL, interpolated between checkpoints)"
)


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def scored_all(folder: Path, steps: list[int]) -> bool:
    """Every one of a run's checkpoints `steps` (none: False) has its score file in `folder`."""
    return bool(steps) and all((folder / f"step-{s}.json").is_file() for s in steps)


def finished_record(folder: Path) -> dict | None:
    """A run's committed record (gold.py writes folder/run.json once the run is trained and every checkpoint it
    lists is scored), or None while it is not: a run counts in the results, and is not trained again in a fresh
    checkout, only with it."""
    path = folder / "run.json"
    if not path.is_file():
        return None
    record = _read(path)
    return record if scored_all(folder, record.get("checkpoints") or []) else None


def load_scores(results: Path, runs) -> tuple[dict, dict, dict, dict]:
    """(start: {prompt: {gold, kl, chars}}, points: {(annotator, method): {step: [per seed: {prompt: ...}]}}, the
    seeds in those lists, the seeds planned). A seed counts once its run is finished and every checkpoint scored
    (its record); a method with fewer finished seeds than planned is reported on those, and says so ("3 of 10"),
    so seeds can be added a few runs at a time without hiding what is done. Only the checkpoints every counted
    seed has are read."""
    start = (
        _read(results / "scores" / "start.json")["per_prompt"]
        if (results / "scores" / "start.json").is_file()
        else None
    )
    planned: dict[tuple[str, str], set[int]] = {}
    found: dict[
        tuple[str, str], dict[int, tuple[Path, list[int]]]
    ] = {}  # key -> seed -> (scores, checkpoints)
    for run in runs:
        annotator, seed, method = run.key.split("/")
        planned.setdefault((annotator, method), set()).add(int(seed.split("-")[1]))
        folder = results / "scores" / run.key
        record = finished_record(folder)
        if record is not None:
            found.setdefault((annotator, method), {})[int(seed.split("-")[1])] = (
                folder,
                record["checkpoints"],
            )
    points, counted = {}, {}
    for key, by_seed in found.items():
        seeds = sorted(by_seed)
        steps = sorted(set.intersection(*(set(steps) for _, steps in by_seed.values())))
        points[key] = {
            step: [_read(by_seed[k][0] / f"step-{step}.json")["per_prompt"] for k in seeds] for step in steps
        }
        counted[key] = seeds
    return start, points, counted, {key: sorted(seeds) for key, seeds in planned.items()}


def on_seeds(steps: dict[int, list[dict]], have: list[int], keep: list[int]) -> dict[int, list[dict]]:
    """A method's checkpoints restricted to the seeds `keep` (in that order), from lists in the order `have`."""
    return {step: [per_seed[have.index(k)] for k in keep] for step, per_seed in steps.items()}


def _matrix(per_seed: list[dict], prompts: list[str], field: str) -> np.ndarray:
    """(seeds, prompts): the mean of a field over each prompt's samples."""
    return np.array([[np.mean(run[p][field]) for p in prompts] for run in per_seed])


def frontier(start: dict, points: dict[int, list[dict]], prompts: list[str]) -> dict:
    """One method under one annotator: per checkpoint, gold reward, KL and length (means with both intervals)."""
    out = []
    rows = {"start": [start]} | points
    for step, per_seed in rows.items():
        entry = {"step": 0 if step == "start" else step, "seeds": len(per_seed)}
        for field in ("gold", "kl", "chars"):
            m = _matrix(per_seed, prompts, field)
            entry[field] = float(m.mean())
            entry[f"{field}_ci"] = _prompt_seed_bootstrap([m], lambda ms: ms[0].mean())
            if len(per_seed) > 1:
                entry[f"{field}_t"] = _t_interval(list(m.mean(1)))["ci"]
        out.append(entry)
    return {"points": out}


def _prompt_seed_bootstrap(
    matrices: list[np.ndarray], statistic, seed: int = 0, family: int = 1
) -> list[float]:
    """95% interval of statistic(matrices) where each matrix is (seeds, prompts): each draw takes seeds with
    replacement (the same draw for every matrix of equal seed count) and one draw of prompts shared by all.
    family > 1: the Bonferroni interval, at level 1 - 0.05/family."""
    rng = np.random.default_rng(seed)
    n_prompts = matrices[0].shape[1]
    values = np.empty(N_BOOT)
    for b in range(N_BOOT):
        cols = rng.integers(0, n_prompts, n_prompts)
        drawn = []
        seed_draws: dict[int, np.ndarray] = {}
        for m in matrices:
            n = m.shape[0]
            if n not in seed_draws:
                seed_draws[n] = rng.integers(0, n, n) if n > 1 else np.zeros(1, dtype=int)
            drawn.append(m[seed_draws[n]][:, cols])
        values[b] = statistic(drawn)
    values = values[np.isfinite(values)]
    if len(values) < N_BOOT * 0.9:
        return [float("nan"), float("nan")]
    if family > 1:
        alpha = 0.05 / (2 * family)
        return [float(q) for q in np.quantile(values, [alpha, 1 - alpha])]
    return _quantiles(values)


def _curve(start_m: tuple[np.ndarray, np.ndarray], steps: list[tuple[np.ndarray, np.ndarray]]):
    """(KL, gold) means of the start and each checkpoint, in step order; matrices are (seeds, prompts)."""
    kl = [float(start_m[0].mean())] + [float(k.mean()) for k, _ in steps]
    gold = [float(start_m[1].mean())] + [float(g.mean()) for _, g in steps]
    return np.array(kl), np.array(gold)


def _gold_at(kl: np.ndarray, gold: np.ndarray, at: float) -> float:
    """A frontier's gold reward at KL `at`: the frontier made monotone in KL (the best gold reached at or below each
    KL, as a frontier is read), interpolated; NaN beyond its largest KL."""
    order = np.argsort(kl)
    kl, gold = kl[order], np.maximum.accumulate(gold[order])
    if at > kl[-1] + 1e-9:
        return float("nan")
    return float(np.interp(at, kl, gold))


def matched_contrast(
    start: dict, a: dict[int, list[dict]], b: dict[int, list[dict]], prompts: list[str], family: int = 1
) -> dict:
    """Method a minus method b: the two frontiers' gold at the largest KL both reach (the primary contrast), and the
    gold rewards and KLs of the two last checkpoints (KL not matched), paired by prompt and seed."""
    sm = (_matrix([start], prompts, "kl"), _matrix([start], prompts, "gold"))
    am = [(_matrix(v, prompts, "kl"), _matrix(v, prompts, "gold")) for v in a.values()]
    bm = [(_matrix(v, prompts, "kl"), _matrix(v, prompts, "gold")) for v in b.values()]
    n_a, n_b = len(am), len(bm)
    flat = [sm[0], sm[1], *[m for pair in am for m in pair], *[m for pair in bm for m in pair]]

    def unpack(ms):
        s = (ms[0], ms[1])
        a_ = [(ms[2 + 2 * i], ms[3 + 2 * i]) for i in range(n_a)]
        b_ = [(ms[2 + 2 * n_a + 2 * i], ms[3 + 2 * n_a + 2 * i]) for i in range(n_b)]
        return s, a_, b_

    def gap(s, a_, b_) -> float:  # a's frontier minus b's at the largest KL both reach
        kl_a, gold_a = _curve(s, a_)
        kl_b, gold_b = _curve(s, b_)
        target = min(kl_a.max(), kl_b.max())
        return _gold_at(kl_a, gold_a, target) - _gold_at(kl_b, gold_b, target)

    def matched(ms):
        return gap(*unpack(ms))

    def target_kl(ms):
        s, a_, b_ = unpack(ms)
        return float(min(_curve(s, a_)[0].max(), _curve(s, b_)[0].max()))

    def last(ms):
        _, a_, b_ = unpack(ms)
        return float(a_[-1][1].mean() - b_[-1][1].mean())

    def kl_last(ms):
        _, a_, b_ = unpack(ms)
        return float(a_[-1][0].mean() - b_[-1][0].mean())

    def per_seed(ms) -> list[float]:
        """Each seed's own primary contrast: that seed's frontier of a against its frontier of b (seeds are paired),
        read at the largest KL both of them reach."""
        s, a_, b_ = unpack(ms)

        def row(pairs, i):
            return [(k[i : i + 1], g[i : i + 1]) for k, g in pairs]

        return [gap(s, row(a_, i), row(b_, i)) for i in range(a_[0][0].shape[0])]

    point, seeds_apart = matched(flat), per_seed(flat)
    return {
        # the check beside the bootstrap (few seeds make a seed bootstrap narrow): each seed's own contrast, a t
        # interval over them; its mean is not `matched` (each seed is read at its own matched KL)
        "matched_per_seed": seeds_apart,
        "matched_seed_t": _t_interval(seeds_apart)["ci"] if len(seeds_apart) > 1 else None,
        "matched": point,
        "matched_ci": _prompt_seed_bootstrap(flat, matched),
        "matched_family_ci": _prompt_seed_bootstrap(flat, matched, family=family),
        "family": family,
        "matched_kl": target_kl(flat),
        "last_gold": last(flat),
        "last_gold_ci": _prompt_seed_bootstrap(flat, last),
        "last_kl": kl_last(flat),
        "last_kl_ci": _prompt_seed_bootstrap(flat, kl_last),
        "seeds": [len(next(iter(a.values()))), len(next(iter(b.values())))],
    }


def gold_results(spec: dict, results: Path, runs) -> dict | None:
    start, points, seeds, planned = load_scores(results, runs)
    if start is None or not points:
        return None
    prompts = sorted(start)
    out: dict = {"primary": PRIMARY, "prompts": len(prompts), "frontiers": {}, "contrasts": {}}
    order = {name: i for i, name in enumerate(spec.get("annotators", {}))}  # gold.yaml's order: clean first
    points = dict(sorted(points.items(), key=lambda kv: (order.get(kv[0][0], len(order)), kv[0])))
    # a method marked `diagnostic` is drawn (dashed) and tabled, but is no contrast (and so not one of the family)
    diagnostic = {name for name, own in spec.get("methods", {}).items() if own.get("diagnostic")}
    for (annotator, method), steps in points.items():
        f = frontier(start, steps, prompts)
        f["seeds_planned"] = len(planned[(annotator, method)])
        f["diagnostic"] = method in diagnostic
        out["frontiers"].setdefault(annotator, {})[method] = f
    pairs = []  # each method against DPO under the same annotator, paired on the seeds both ran
    for (annotator, method), steps in points.items():
        base = (annotator, "dpo")
        common = sorted(set(seeds[(annotator, method)]) & set(seeds.get(base, ())))
        if method != "dpo" and method not in diagnostic and base in points and common:
            pairs.append(
                (
                    annotator,
                    method,
                    on_seeds(steps, seeds[(annotator, method)], common),
                    on_seeds(points[base], seeds[base], common),
                )
            )
    for annotator, method, steps, base in pairs:  # every primary contrast read is one of the family
        c = matched_contrast(start, steps, base, prompts, family=len(pairs))
        c["seeds_planned"] = len(set(planned[(annotator, method)]) & set(planned[(annotator, "dpo")]))
        out["contrasts"].setdefault(annotator, {})[f"{method} - dpo"] = c
    return out


def _of(n: int, planned: int | None) -> str:
    """A seed count, with the planned one where fewer are finished: "3 of 10"."""
    return f"{n}" if planned is None or n >= planned else f"{n} of {planned}"


def _ci(value: float, ci, digits: int = 3) -> str:
    if ci is None or not np.all(np.isfinite(ci)):
        return f"{value:+.{digits}f}" if np.isfinite(value) else "beyond its KL range"
    return f"{value:+.{digits}f} [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def frontier_markdown(res: dict) -> str:
    lines = [
        "| annotator | method | step | seeds | KL to the start | gold reward | length (chars) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for annotator, methods in res["frontiers"].items():
        for method, f in methods.items():
            for p in f["points"]:
                if p["step"] == 0 and method != next(iter(methods)):
                    continue
                seeds = p["seeds"] if p["step"] == 0 else _of(p["seeds"], f.get("seeds_planned"))
                lines.append(
                    f"| {annotator} | {'start' if p['step'] == 0 else method} | {p['step']} | {seeds} | "
                    f"{_ci(p['kl'], p['kl_ci'], 2)} | {_ci(p['gold'], p['gold_ci'])} | {p['chars']:.0f} |"
                )
    return "\n".join(lines)


def contrast_markdown(res: dict) -> str:
    lines = [
        "| annotator | contrast | seeds | gold at matched KL (**primary**) | Bonferroni over the contrasts | "
        "seed by seed (t) | at KL | "
        "gold, last checkpoints | KL, last checkpoints |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for annotator, contrasts in res["contrasts"].items():
        for name, c in contrasts.items():
            alone = c.get("matched_per_seed") or [float("nan")]
            lines.append(
                f"| {annotator} | {name} | {_of(c['seeds'][0], c.get('seeds_planned'))} | "
                f"{_ci(c['matched'], c['matched_ci'])} | "
                f"{_ci(c['matched'], c['matched_family_ci'])} ({c['family']}) | "
                f"{_ci(float(np.mean(alone)), c.get('matched_seed_t'))} | {c['matched_kl']:.2f} | "
                f"{_ci(c['last_gold'], c['last_gold_ci'])} | {_ci(c['last_kl'], c['last_kl_ci'], 2)} |"
            )
    return "\n".join(lines)


def make_figure(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    annotators = list(res["frontiers"])
    cols = min(3, len(annotators))  # rows of three panels: five annotators in one row were too narrow to read
    rows = -(-len(annotators) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(7.0, 5.2 * cols), 4.6 * rows), squeeze=False, sharey=True
    )
    for ax in axes.flat[len(annotators) :]:
        ax.set_visible(False)
    colors = {
        "dpo": "#1f77b4",
        "iopo": "#d62728",
        "ipo": "#2ca02c",
        "hinge": "#9467bd",
        "iopo_equal_steps": "#ff9896",
        "iter_dpo_gold": "#17becf",
        "sppo": "#8c564b",
        "inpo": "#e377c2",
        "spin_online": "#7f7f7f",
        "xpo_online": "#bcbd22",
        "sppo_online": "#ff7f0e",
        "inpo_online": "#393b79",
        "dpo_beta05": "#6baed6",
        "sppo_online_n2": "#ffbb78",
    }
    spare = iter(["#637939", "#843c39", "#7b4173", "#e7ba52", "#31a354"])  # for a method not named above
    for method in dict.fromkeys(m for by in res["frontiers"].values() for m in by):  # in the results' order
        if method not in colors:
            colors[method] = next(spare, None)
    for ax, annotator in zip(axes.flat, annotators, strict=False):
        for method, f in res["frontiers"][annotator].items():
            pts = f["points"]
            kl = np.array([p["kl"] for p in pts])
            gold = np.array([p["gold"] for p in pts])
            xerr = np.abs(np.array([p["kl_ci"] for p in pts]).T - kl)
            yerr = np.abs(np.array([p["gold_ci"] for p in pts]).T - gold)
            ax.errorbar(
                kl,
                gold,
                xerr=xerr,
                yerr=yerr,
                marker="o",
                ms=4,
                capsize=2,
                lw=1.2,
                ls="--" if f.get("diagnostic") else "-",
                color=colors.get(method),
                label=f"{method} ({_of(pts[-1]['seeds'], f.get('seeds_planned'))} seeds"
                + ("; diagnostic)" if f.get("diagnostic") else ")"),
            )
            for p in pts[1:]:
                ax.annotate(
                    str(p["step"]),
                    (p["kl"], p["gold"]),
                    fontsize=7,
                    xytext=(3, -8),
                    textcoords="offset points",
                    color=colors.get(method),
                )
        ax.set(title=f"annotator: {annotator}", xlabel="sampled KL to the starting model (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    for row in axes:
        row[0].set_ylabel("gold reward (VADER compound), held-out prompts")
    fig.suptitle(
        "Reward-KL frontier, gold-reward testbed\n(points: checkpoints, labelled by optimizer step; bars: 95% "
        "intervals over seeds and prompts)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compute(results: Path) -> dict:
    """What the scored runs cost, from the committed records beside their scores (gold.py's run.json: wall and CPU
    seconds of the training command) and every score file's seconds. Runs trained before the records were kept
    count in `before_records` (compute-before-records.json: their total, not per run)."""
    records = [_read(p) for p in (results / "scores").rglob("run.json")]
    timed = [r for r in records if r.get("seconds") is not None]
    scored = [_read(p) for p in (results / "scores").rglob("step-*.json")]
    out = {
        "training_runs": len(timed),
        "training_seconds": sum(r["seconds"] for r in timed),
        "training_cpu_seconds": sum(r.get("cpu_seconds") or 0.0 for r in timed),
        "scoring_seconds": sum(s["seconds"] for s in scored),
        "checkpoints_scored": len(scored),
    }
    before = results / "compute-before-records.json"
    if before.is_file():
        out["before_records"] = _read(before)
    return out


def write_gold_results(spec: dict, work: Path, results: Path, runs, docs: Path | None) -> dict | None:
    res = gold_results(spec, results, runs)
    if res is None:
        print("[gold] nothing scored yet: no results written")
        return None
    pairs, earlier = work / "pairs" / "report.json", results / "frontier.json"
    if pairs.is_file():
        res["annotators"] = {k: {f: v for f, v in r.items() if f != "file"} for k, r in _read(pairs).items()}
    elif earlier.is_file() and "annotators" in _read(earlier):
        # A fresh checkout whose pairs are not sampled yet: the annotators' report the results already hold.
        res["annotators"] = _read(earlier)["annotators"]
    res["compute"] = compute(results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "frontier.json").write_text(json.dumps(res, indent=1, allow_nan=False), encoding="utf-8")
    make_figure(res, results / "frontier.png")
    if docs is not None and docs.is_file():
        for name, body in (("frontier", frontier_markdown(res)), ("contrasts", contrast_markdown(res))):
            replace_block(docs, name, body, prefix="gold")
    print(f"[gold] results in {results}")
    return res
