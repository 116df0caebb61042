"""`iopo plot`: PNGs from run and eval folders, like the paper's figures. Reads files only (no torch).

- margins_density.png: margin-reward distributions per method, histogram with the fitted normal (Fig. 3);
- margins_count.png: the same margins as counts per bin (Fig. 4's view);
- curves.png: margin reward and pairwise accuracy on the test split over optimizer steps, one line per run (Fig. 5);
- win_tie_lose.png: judged win / tie / lose shares with their 95% intervals, per model and judge (Table 1);
- training.png: training loss per step and player, and IOPO's mean importance weight;
- online_rounds.png: per online run (`iopo online`), margin reward, pairwise accuracy and judged win rate per round;
- online_cost.png: the same metrics against the cumulative annotation spent (money, or requests at price 0).

Every figure is listed in plots.json with the series it holds, so a test (or a person) can check what is drawn.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from iopo.config import ConfigError
from iopo.core.stats import normal_fit

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
OUTCOME_COLORS = {"win": "#2ca02c", "tie": "#9e9e9e", "lose": "#d62728", "bad": "#6d4c41"}


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _run_label(folder: Path) -> str:
    import yaml

    try:
        config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    method = config.get("method") if isinstance(config, dict) else None
    return f"{folder.name} ({method})" if method and method not in folder.name else folder.name


def collect(inputs: list[str]) -> dict:
    """What the folders hold: runs (metrics.jsonl, eval.json), evals (eval.json with judges) and reward models
    (`iopo train-rm` folders, whose margins are rewards, not implicit rewards: kept out of the margin figures)."""
    runs, evals, reward_models, online = [], [], [], []
    for item in inputs:
        folder = Path(item)
        if not folder.is_dir():
            raise ConfigError(f"{folder}: not a run or eval folder")
        data = _read_json(folder / "eval.json")
        summary = _read_json(folder / "online.json")
        if summary is not None and summary.get("kind") == "iopo-online":
            online.append(
                {"folder": folder, "label": summary.get("method") or folder.name, "online": summary}
            )
            runs.append(
                {
                    "folder": folder,
                    "label": _run_label(folder),
                    "metrics": _read_jsonl(folder / "metrics.jsonl"),
                    "eval": {},
                }
            )
        elif data is not None and "judges" in data:
            evals.append({"folder": folder, "label": folder.name, "eval": data})
        elif data is not None and data.get("kind") == "reward_model":
            reward_models.append({"folder": folder, "label": folder.name, "eval": data})
        elif (folder / "metrics.jsonl").is_file() or data is not None:
            runs.append(
                {
                    "folder": folder,
                    "label": _run_label(folder),
                    "metrics": _read_jsonl(folder / "metrics.jsonl"),
                    "eval": data or {},
                }
            )
        else:
            raise ConfigError(
                f"{folder}: neither a run folder (metrics.jsonl) nor an eval folder (eval.json)"
            )
    labels = [o["label"] for o in online]
    for o in online:  # two runs of one method: name them by folder
        if labels.count(o["label"]) > 1:
            o["label"] = f"{o['label']} ({o['folder'].name})"
    return {"runs": runs, "evals": evals, "reward_models": reward_models, "online": online}


def margin_sets(found: dict) -> dict[str, list[float]]:
    """label -> per-pair margin rewards, from runs' eval.json and evals' per-model metrics."""
    sets: dict[str, list[float]] = {}
    for run in found["runs"]:
        margins = run["eval"].get("margins")
        if margins:
            sets[run["label"]] = [m for m in margins if m is not None]
    seen = {tuple(round(m, 5) for m in values) for values in sets.values()}
    for ev in found["evals"]:
        for model, metrics in (ev["eval"].get("metrics") or {}).items():
            if isinstance(metrics, dict) and metrics.get("margins"):
                values = [m for m in metrics["margins"] if m is not None]
                key = tuple(round(m, 5) for m in values)
                if key in seen:  # the same model on the same pairs as a run given too: drawn once
                    continue
                seen.add(key)
                sets[model if model not in sets else f"{model} [{ev['label']}]"] = values
    return sets


def _figure(width=8.0, height=4.8):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    return plt, fig, ax


def _finish(plt, fig, ax, path: Path, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_margins(sets: dict[str, list[float]], out_dir: Path) -> dict:
    import numpy as np

    made = {}
    if not sets:
        return made
    everything = np.concatenate([np.asarray(v, dtype=float) for v in sets.values() if v])
    low, high = float(everything.min()), float(everything.max())
    if low == high:
        low, high = low - 0.5, high + 0.5
    bins = np.linspace(low, high, 31)
    xs = np.linspace(low, high, 400)

    plt, fig, ax = _figure()
    for i, (label, values) in enumerate(sets.items()):
        color = COLORS[i % len(COLORS)]
        mean, std = normal_fit(values)
        ax.hist(values, bins=bins, density=True, alpha=0.3, color=color, label=f"{label} (n={len(values)})")
        if std > 0:
            pdf = np.exp(-0.5 * ((xs - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
            ax.plot(xs, pdf, color=color, lw=2, label=f"{label}: normal fit μ={mean:.3f}, σ={std:.3f}")
        ax.axvline(mean, color=color, ls="--", lw=1)
    ax.axvline(0, color="black", lw=0.8)
    _finish(
        plt,
        fig,
        ax,
        out_dir / "margins_density.png",
        "Margin reward on held-out pairs: r(x, y_w) − r(x, y_l), per method",
        "margin reward  β·[log π/π_ref (y_w) − log π/π_ref (y_l)]",
        "density",
    )
    made["margins_density.png"] = {"series": list(sets)}

    plt, fig, ax = _figure()
    ax.hist(
        list(sets.values()),
        bins=bins,
        histtype="step",
        lw=2,
        color=[COLORS[i % len(COLORS)] for i in range(len(sets))],
        label=list(sets),
    )
    ax.axvline(0, color="black", lw=0.8)
    title = "Margin reward on held-out pairs: counts per bin"
    _finish(plt, fig, ax, out_dir / "margins_count.png", title, "margin reward", "pairs")
    made["margins_count.png"] = {"series": list(sets)}
    return made


def _eval_points(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    by_step = {}
    for r in records:
        value = r.get(key)
        if isinstance(value, int | float) and math.isfinite(value) and isinstance(r.get("step"), int):
            by_step[r["step"]] = value  # a resumed run may log a step twice: the last one counts
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_curves(found: dict, out_dir: Path) -> dict:
    runs = [r for r in found["runs"] if _eval_points(r["metrics"], "eval/pairwise_accuracy")[0]]
    if not runs:
        return {}
    plt, fig, _ = _figure(11, 4.5)
    fig.clf()
    axes = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        for ax, key in zip(axes, ("eval/margin_reward", "eval/pairwise_accuracy"), strict=True):
            steps, values = _eval_points(run["metrics"], key)
            ax.plot(steps, values, marker="o", color=color, label=run["label"])
    axes[0].set_title("Margin reward on the test split")
    axes[1].set_title("Pairwise accuracy on the test split")
    axes[0].set_ylabel("margin reward")
    axes[1].set_ylabel("pairwise accuracy")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Over training (vs the starting model)")
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png")
    plt.close(fig)
    return {"curves.png": {"series": [r["label"] for r in runs]}}


def judged_rows(found: dict) -> list[dict]:
    """One row per (eval, judge, model, table) with shares and intervals."""
    rows = []
    for ev in found["evals"]:
        data = ev["eval"]
        for judge, entry in (data.get("judges") or {}).items():
            for model, tables in entry.get("models", {}).items():
                for table_name in ("table1", "table2"):
                    table = tables.get(table_name)
                    if table:
                        rows.append(
                            {
                                "eval": ev["label"],
                                "judge": judge,
                                "type": entry.get("type"),
                                "model": model,
                                "baseline": data.get("baseline"),
                                "table": table_name,
                                **table,
                            }
                        )
    return rows


def plot_win_tie_lose(found: dict, out_dir: Path) -> dict:
    import numpy as np

    rows = judged_rows(found)
    if not rows:
        return {}
    outcomes = ["win", "tie", "lose"] + (["bad"] if any(r["table"] == "table2" for r in rows) else [])
    plt, fig, ax = _figure(9, 1.6 + 0.9 * len(rows))
    height = 0.8 / len(outcomes)
    labels = []
    for i, row in enumerate(rows):
        what = "0-3 rubric" if row["table"] == "table2" else row["type"]
        labels.append(f"{row['model']} vs {row['baseline']}\njudge {row['judge']} ({what}), n={row['n']}")
        for k, outcome in enumerate(outcomes):
            value = row.get(outcome)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            if outcome == "bad" and row["table"] != "table2":
                continue  # bad cases exist only for 0-3 scores
            ci = (row.get("ci") or {}).get(outcome) or [value, value]
            lo, hi = (value if c is None else c for c in ci)
            y = i + (k - (len(outcomes) - 1) / 2) * height
            ax.barh(
                y,
                value,
                height=height * 0.9,
                color=OUTCOME_COLORS[outcome],
                label=outcome if i == 0 else None,
            )
            ax.errorbar(
                value, y, xerr=[[value - lo], [hi - value]], fmt="none", ecolor="black", capsize=3, lw=1
            )
            if value > 0 or hi > 0:
                ax.text(min(hi, 1.0) + 0.01, y, f"{value:.2f}", va="center", fontsize=8)
    ax.set_yticks(np.arange(len(rows)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("share of judged answers (bars: 95% bootstrap interval over prompts)")
    ax.set_title("Judged win / tie / lose against the baseline", pad=28)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(outcomes), fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "win_tie_lose.png")
    plt.close(fig)
    return {"win_tie_lose.png": {"series": [f"{r['model']}|{r['judge']}|{r['table']}" for r in rows]}}


def plot_training(found: dict, out_dir: Path) -> dict:
    runs = [r for r in found["runs"] if any("loss" in m and "agent" in m for m in r["metrics"])]
    if not runs:
        return {}
    has_weight = any("is/weight_mean" in m for r in runs for m in r["metrics"])
    plt, fig, _ = _figure(11 if has_weight else 7, 4.5)
    fig.clf()
    axes = fig.subplots(1, 2 if has_weight else 1)
    axes = list(axes) if has_weight else [axes]
    series = []
    for i, run in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        train = [m for m in run["metrics"] if "agent" in m and "loss" in m]
        for agent, marker in (("protagonist", "o"), ("adversary", "x"), ("policy", "o")):
            points = [(m["step"], m["loss"]) for m in train if m["agent"] == agent]
            if points:
                xs, ys = zip(*points, strict=True)
                axes[0].plot(
                    xs,
                    ys,
                    marker=marker,
                    ls="-" if agent != "adversary" else ":",
                    color=color,
                    label=f"{run['label']} {agent}",
                )
                series.append(f"{run['label']} {agent}")
        if has_weight:
            points = [(m["step"], m["is/weight_mean"]) for m in train if "is/weight_mean" in m]
            if points:
                xs, ys = zip(*points, strict=True)
                axes[1].plot(xs, ys, marker="o", color=color, label=run["label"])
    axes[0].set_title("Training loss per optimizer step")
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    if has_weight:
        axes[1].set_title("IOPO: mean importance weight w of the step's pairs")
        axes[1].set_xlabel("optimizer step")
        axes[1].set_ylabel("mean w (1 = unweighted)")
        axes[1].legend(fontsize=8)
        axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "training.png")
    plt.close(fig)
    return {"training.png": {"series": series}}


ONLINE_METRICS = (
    ("margin_reward", "margin reward"),
    ("pairwise_accuracy", "pairwise accuracy"),
    ("win", "judged win rate vs start"),
)


def online_points(summary: dict, key: str) -> list[tuple[int, float, float]]:
    """(round, cumulative annotation spent, value) of one online run; the spend is money when any was paid, else
    requests. Rounds not scored yet are left out."""
    paid = any((r.get("annotation") or {}).get("cost") for r in summary.get("rounds", []))
    spent, out = 0.0, []
    for r in summary.get("rounds", []):
        spent += (r.get("annotation") or {}).get("cost" if paid else "requests") or 0
        scores = r.get("scores") or {}
        value = (scores.get("judged") or {}).get("win") if key == "win" else scores.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            out.append((r["round"], spent, value))
    return out


def plot_online(found: dict, out_dir: Path) -> dict:
    runs = [
        o for o in found.get("online", []) if any(online_points(o["online"], k) for k, _ in ONLINE_METRICS)
    ]
    if not runs:
        return {}
    made = {}
    paid = any((r.get("annotation") or {}).get("cost") for o in runs for r in o["online"].get("rounds", []))
    for name, x_index, xlabel in (
        ("online_rounds.png", 0, "round"),
        ("online_cost.png", 1, "annotation cost" if paid else "annotation requests (cumulative)"),
    ):
        plt, fig, _ = _figure(13, 4.2)
        fig.clf()
        axes = fig.subplots(1, len(ONLINE_METRICS))
        for i, run in enumerate(runs):
            color = COLORS[i % len(COLORS)]
            for ax, (key, title) in zip(axes, ONLINE_METRICS, strict=True):
                points = online_points(run["online"], key)
                if points:
                    ax.plot(
                        [p[x_index] for p in points],
                        [p[2] for p in points],
                        marker="o",
                        color=color,
                        label=run["label"],
                    )
                ax.set_title(title)
        for ax in axes:
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("Online rounds (held-out split; vs the starting model)")
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        made[name] = {"series": [r["label"] for r in runs]}
    return made


def make_plots(inputs: list[str], output_dir: str | Path) -> dict:
    """Draw every figure the inputs allow into output_dir; returns {file: {"series": [...]}} (also plots.json)."""
    found = collect(inputs)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    made: dict = {}
    made |= plot_margins(margin_sets(found), out)
    made |= plot_curves(found, out)
    made |= plot_win_tie_lose(found, out)
    made |= plot_training(found, out)
    made |= plot_online(found, out)
    (out / "plots.json").write_text(json.dumps(made, indent=2), encoding="utf-8")
    return made
