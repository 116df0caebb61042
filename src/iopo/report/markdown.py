"""The report of `iopo report`: one Markdown file from run and eval folders - settings, the implicit-reward metrics, Tables 1 and
2 per judge with their intervals, the judge ledger and the figures - read top to bottom. Reads files only."""

from __future__ import annotations

import os
import time
from pathlib import Path

from iopo.core.formatting import interval, number
from iopo.report.plots import collect, make_plots


def _config(folder: Path) -> dict:
    import yaml

    try:
        loaded = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _get(tree: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def _reward_models_section(runs: list[dict]) -> list[str]:
    lines = [
        "## Reward models (`iopo train-rm`)",
        "",
        "Bradley-Terry reward models (paper Eq. 2); held-out pairwise accuracy = share of held-out pairs whose "
        "chosen answer gets the higher reward.",
        "",
        "| run | backbone | steps | pairs trained on (of the split's) | held-out pairs | held-out pairwise accuracy | mean reward margin |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        cfg, ev = _config(run["folder"]), run["eval"]
        backbone = _get(cfg, "model.name_or_path") or "embedded SmolLM2-135M-Instruct"
        lines.append(
            f"| {run['folder'].name} | {backbone} | {ev.get('steps')} | {ev.get('pairs_seen', '?')} (of {ev.get('n_train_pairs')}) | {ev.get('n_pairs')} | "
            f"{number(ev.get('pairwise_accuracy'), 4)} | {number(ev.get('mean_margin'), 3)} |"
        )
    return lines + [""]


def _runs_section(runs: list[dict]) -> list[str]:
    lines = ["## Training runs", ""]
    lines.append(
        "| run | method | model | LoRA | steps | lr | β | batch | margin reward | pairwise accuracy | test pairs |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        cfg = _config(run["folder"])
        steps = max((m.get("step", 0) for m in run["metrics"] if "agent" in m), default=0)
        ev = run["eval"]
        model = _get(cfg, "model.name_or_path") or "embedded SmolLM2-135M-Instruct"
        lines.append(
            f"| {run['label']} | {cfg.get('method', '?')} | {model} | {_get(cfg, 'model.lora')} | {steps} | "
            f"{_get(cfg, 'optim.learning_rate')} | {_get(cfg, 'loss.beta')} | {_get(cfg, 'optim.batch_size')} | "
            f"{number(ev.get('margin_reward'), 4)} | {number(ev.get('pairwise_accuracy'), 4)} | {ev.get('n_pairs', 'n/a')} |"
        )
    lines += [
        "",
        "Margin reward and pairwise accuracy: the implicit reward β·log(π/π_ref) of the exported protagonist "
        "(policy, for a baseline) on the held-out pairs, π_ref the starting model (paper Sec. 6.2).",
        "",
    ]
    for run in runs:
        text = (
            (run["folder"] / "config.yaml").read_text(encoding="utf-8")
            if (run["folder"] / "config.yaml").is_file()
            else ""
        )
        if text:
            lines += [
                f"<details><summary>settings of {run['label']}</summary>",
                "",
                "```yaml",
                text.rstrip(),
                "```",
                "",
                "</details>",
                "",
            ]
    return lines


def _eval_section(ev: dict) -> list[str]:
    data = ev["eval"]
    gen = data.get("generation") or {}
    base = data.get("baseline")
    lines = [f"## Evaluation `{ev['label']}`: {', '.join(data.get('models', {}))} vs {base}", ""]
    lines.append(
        f"Split: the {data.get('split')} split of `{data.get('data')}` - {data.get('n_pairs')} pairs, "
        f"{data.get('n_prompts')} prompts answered. Generation: temperature {gen.get('temperature')}, top_p "
        f"{gen.get('top_p')}, up to {gen.get('max_new_tokens')} new tokens, {gen.get('n')} answer(s) per prompt, "
        f"seed {gen.get('seed')}. Wall time {number(data.get('seconds'), 0)} s."
    )
    lines.append("")
    metrics = data.get("metrics") or {}
    if metrics:
        lines += [f"### Implicit reward vs {base} (β = {data.get('beta')})", ""]
        lines += [
            "| model | margin reward (± std) | pairwise accuracy | reward chosen | reward rejected |",
            "|---|---|---|---|---|",
        ]
        for model, m in metrics.items():
            if "skipped" in m:
                lines.append(f"| {model} | skipped: {m['skipped']} | | | |")
                continue
            lines.append(
                f"| {model} | {number(m.get('margin_reward'), 4)} (± {number(m.get('margin_reward_std'), 4)}) | "
                f"{number(m.get('pairwise_accuracy'), 4)} | {number(m.get('reward_chosen'), 4)} | {number(m.get('reward_rejected'), 4)} |"
            )
        lines.append("")
    t1_rows, t2_rows = [], []
    for judge, entry in (data.get("judges") or {}).items():
        for model, tables in entry.get("models", {}).items():
            if tables.get("table1"):
                t1_rows.append((judge, entry, model, tables["table1"]))
            if tables.get("table2"):
                t2_rows.append((judge, entry, model, tables["table2"]))
    human = data.get("human") or {}
    n_raters = len(human.get("raters") or [])
    for model, h in (human.get("models") or {}).items():
        who = f"humans ({n_raters} rater{'s' if n_raters != 1 else ''}, blind)"
        t1_rows.append((who, {"type": "preference"}, model, {**h["preference"], "human": h}))
        t2_rows.append((who, {"type": "0-3 scores"}, model, {**h["table2"], "mean_score": h["mean_score"]}))
    if t1_rows:
        lines += [
            f"### Table 1: judged win : tie : lose against {base}",
            "",
            "Shares of the judged answers with 95% intervals (percentile bootstrap over prompts). An LLM or local "
            "judge sees every pair in both orders: a win or loss needs both orders to agree, any disagreement "
            "is a tie (MT-Bench's rule). A reward model's verdict is the sign of the reward gap beyond the tie margin.",
            "",
            "| model | judge | win | tie | lose | judged | invalid | orders disagree | notes |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for judge, entry, model, t in t1_rows:
            notes = ""
            check = entry.get("check") or {}
            if check and not check.get("informative", True):
                judge = f"{judge} **(uninformative)**"
            if "mean_reward" in t:
                mr = t["mean_reward"]
                notes = f"mean reward {number(mr.get('model'))} vs {number(mr.get('baseline'))}; tie margin {t.get('tie_margin')}"
            elif "first_position_share" in t:
                notes = f"first answer preferred in {number(t.get('first_position_share'))} of verdicts"
            elif "human" in t:
                notes = f"{t['human']['pairs_rated']} of {t['human']['pairs']} pairs rated; raters' votes per pair"
            lc = t.get("length_controlled") or {}
            if lc.get("n"):
                notes += f"; length-controlled win rate {number(lc.get('win_rate'))}"
            if check.get("pairs"):
                notes += (
                    f"; agrees with the split's labels on {number(check.get('agreement'))} "
                    f"[{number(check['agreement_ci'][0])}, {number(check['agreement_ci'][1])}] of "
                    f"{check['pairs']} labelled pairs"
                )
            lines.append(
                f"| {model} | {judge} ({entry.get('type')}) | {interval(t, 'win')} | {interval(t, 'tie')} | {interval(t, 'lose')} | "
                f"{t.get('n')} | {t.get('invalid')} | {number(t.get('order_disagreement')) if 'order_disagreement' in t else '-'} | {notes} |"
            )
        lines.append("")
    if t2_rows:
        lines += [
            f"### Table 2: 0-3 rubric scores, win : tie : lose : bad cases against {base}",
            "",
            "Each answer scored 0-3 by the judge; the higher score wins, equal scores tie, and a *bad case* is a pair "
            "where both answers score 0 (counted apart from ties, so the four shares sum to 1).",
            "",
            "| model | judge | win | tie | lose | bad cases | mean score (model) | mean score (baseline) | invalid |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for judge, _entry, model, t in t2_rows:
            ms = t.get("mean_score") or {}
            lo, hi = ms.get("model_ci") or (None, None)
            blo, bhi = ms.get("baseline_ci") or (None, None)
            lines.append(
                f"| {model} | {judge} | {interval(t, 'win')} | {interval(t, 'tie')} | {interval(t, 'lose')} | {interval(t, 'bad')} | "
                f"{number(ms.get('model'), 2)} [{number(lo, 2)}, {number(hi, 2)}] | {number(ms.get('baseline'), 2)} [{number(blo, 2)}, {number(bhi, 2)}] | {t.get('invalid')} |"
            )
        lines.append("")
    if human.get("n_ratings"):
        lines += _human_section(human)
    ledger = data.get("ledger") or {}
    if ledger.get("all_runs"):
        lines += [
            "### Judge ledger",
            "",
            "What the judgments cost: requests, tokens, seconds and money at the configured price. *This run* is the "
            "invocation that wrote this eval.json (0 requests when everything was already in the store); *all runs* "
            "sums every invocation on this eval folder.",
            "",
            "| judge | when | requests | prompt tokens | completion tokens | seconds | cost |",
            "|---|---|---|---|---|---|---|",
        ]
        for judge in sorted(ledger["all_runs"]):
            for when in ("this_run", "all_runs"):
                row = ledger.get(when, {}).get(judge, {})
                lines.append(
                    f"| {judge} | {when.replace('_', ' ')} | {row.get('requests') or 0} | {row.get('prompt_tokens') or 0} | "
                    f"{row.get('completion_tokens') or 0} | {number(row.get('seconds') or 0.0, 1)} | {number(row.get('cost') or 0.0, 4)} |"
                )
        lines.append("")
    settings = ev["folder"] / "config.yaml"
    if settings.is_file():  # judge settings name the API key's variable, never the key
        text = settings.read_text(encoding="utf-8").rstrip()
        lines += [
            "<details><summary>settings of this evaluation</summary>",
            "",
            "```yaml",
            text,
            "```",
            "",
            "</details>",
            "",
        ]
    generations = data.get("generations") or {}
    if generations:
        lines += [
            "### Generation",
            "",
            "| model | answers | new | reused | seconds | tokens/s | cut at max_new_tokens |",
            "|---|---|---|---|---|---|---|",
        ]
        for model, g in generations.items():
            rate = g["completion_tokens"] / g["seconds"] if g.get("seconds") else None
            lines.append(
                f"| {model} | {g.get('answers', 0) + g.get('reused', 0)} | {g.get('answers')} | {g.get('reused')} | "
                f"{number(g.get('seconds'), 1)} | {number(rate, 1)} | {number(g.get('finish_length_share'), 2)} |"
            )
        lines.append("")
    return lines


STAGE_ORDER = (
    "prompts",
    "generate",
    "judge",
    "pairs",
    "train",
    "score",
)  # an online round's stages, in order


def _human_section(human: dict) -> list[str]:
    ag = human.get("agreement") or {}
    lines = [
        "### Human ratings: agreement",
        "",
        f"{human.get('n_ratings')} ratings by {', '.join(human.get('raters') or [])} (`iopo rate`: blind, random "
        "left/right, 0-3 rubric and a preference). A pair rated by several raters counts once: mean score, "
        "majority preference (a draw is a tie). "
        f"On the {ag.get('pairs_rated_by_several')} pairs rated by several: Krippendorff's α "
        f"{number(ag.get('alpha_preference'))} on preferences (nominal), {number(ag.get('alpha_scores'))} on 0-3 scores "
        "(interval)."
        + (
            " **Too few pairs to read agreement from** (fewer than 10)."
            if (ag.get("pairs_rated_by_several") or 0) < 10
            else ""
        ),
        "",
    ]
    if human.get("stale_ratings"):
        lines += [
            f"{human['stale_ratings']} older ratings are of answers this eval no longer has and are not counted.",
            "",
        ]
    if ag.get("rater_pairs"):
        lines += [
            "| raters | pairs both rated | same preference | Cohen's κ (preference) |",
            "|---|---|---|---|",
        ]
        for pair in ag["rater_pairs"]:
            lines.append(
                f"| {' & '.join(pair['raters'])} | {pair['n']} | {number(pair['same_preference'])} | "
                f"{number(pair['kappa_preference'])} |"
            )
        lines.append("")
    judges = human.get("judges") or {}
    if judges:
        lines += [
            "**Each judge against the humans on the same pairs** (a pairwise judge or reward model against the "
            "human preference, a 0-3 judge against the human scores):",
            "",
            "| judge | model | compared with | pairs | same verdict | Cohen's κ | judge invalid |",
            "|---|---|---|---|---|---|---|",
        ]
        for judge, entry in judges.items():
            for model, row in entry.get("models", {}).items():
                for table, r in row.items():
                    what = "preference (Table 1)" if table == "table1" else "0-3 scores (Table 2)"
                    lines.append(
                        f"| {judge} ({entry.get('type')}) | {model} | {what} | {r.get('n')} | {number(r.get('same'))} | "
                        f"{number(r.get('kappa'))} | {r.get('judge_invalid')} |"
                    )
        lines.append("")
    return lines


def _online_section(online: list[dict]) -> list[str]:
    """Table 2 of the online scenario plus the cost the paper argues about, then each run round by round."""
    lines = [
        "## Online rounds (`iopo online`)",
        "",
        "The last scored round of each run: implicit-reward metrics on the held-out human pairs against the starting "
        "model, the judged win / tie / lose of the policy's answers against the starting policy's (95% bootstrap "
        "interval over prompts), the annotation the training signal cost (judge requests, tokens, money at the "
        "configured price) and the wall time.",
        "",
        "| method | rounds | optimizer steps | margin reward | pairwise accuracy | judged win | tie | lose | "
        "annotation requests | annotation tokens | annotation cost | scoring requests | wall time (s) | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in online:
        s = run["online"]
        scored = [r for r in s.get("rounds", []) if r.get("scores")]
        last = scored[-1]["scores"] if scored else {}
        judged = last.get("judged") or {}
        t = s.get("totals", {})
        ann = t.get("annotation", {})
        tokens = (ann.get("prompt_tokens") or 0) + (ann.get("completion_tokens") or 0)
        lines.append(
            f"| {run['label']} | {len(scored)}/{s.get('rounds_planned')} | {last.get('step', 'n/a')} | "
            f"{number(last.get('margin_reward'), 4)} | {number(last.get('pairwise_accuracy'), 4)} | {interval(judged, 'win')} | "
            f"{interval(judged, 'tie')} | {interval(judged, 'lose')} | {ann.get('requests', 0)} | {tokens} | "
            f"{number(ann.get('cost'), 4)} | {t.get('scoring', {}).get('requests', 0)} | {number(t.get('seconds'), 0)} | "
            f"{s.get('status')} |"
        )
    lines.append("")
    for run in online:
        s = run["online"]
        found = {name for r in s.get("rounds", []) for name in r.get("stage_seconds", {})}
        stages = [st for st in STAGE_ORDER if st in found] + sorted(found - set(STAGE_ORDER))
        lines += [
            f"### {run['label']} round by round (`{run['folder']}`)",
            "",
            "| round | reference | training pairs (the round's; iopo/dpo: the human pool) | separated / kept / human | "
            "margin reward | pairwise accuracy | "
            "judged win | annotation requests | annotation cost | "
            + " | ".join(f"{st} (s)" for st in stages)
            + " |",
            "|---|---|---|---|---|---|---|---|---|" + "---|" * len(stages),
        ]
        for r in s.get("rounds", []):
            sc = r.get("scores") or {}
            pairs = r.get("pairs") or {}
            split = "/".join(str(pairs.get(k, "-")) for k in ("separated", "kept", "human")) if pairs else "-"
            secs = " | ".join(number(r["stage_seconds"].get(st), 1) for st in stages)
            lines.append(
                f"| {r['round']} | {r.get('reference')} | {r.get('trained_pairs')} | {split} | "
                f"{number(sc.get('margin_reward'), 4)} | {number(sc.get('pairwise_accuracy'), 4)} | "
                f"{number((sc.get('judged') or {}).get('win'))} | {r['annotation'].get('requests', 0)} | "
                f"{number(r['annotation'].get('cost'), 4)} | {secs} |"
            )
        lines.append("")
    return lines


def write_report(inputs: list[str], output: str | Path, title: str = "iopo report") -> Path:
    found = collect(inputs)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figures_dir = output.parent / f"{output.stem}_files"
    made = make_plots(inputs, figures_dir)
    lines = [
        f"# {title}",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M')} from: " + ", ".join(f"`{i}`" for i in inputs),
        "",
    ]
    if found.get("online"):
        lines += _online_section(found["online"])
    online_folders = {o["folder"] for o in found.get("online", [])}
    plain_runs = [r for r in found["runs"] if r["folder"] not in online_folders]
    if plain_runs:
        lines += _runs_section(plain_runs)
    if found["reward_models"]:
        lines += _reward_models_section(found["reward_models"])
    for ev in found["evals"]:
        lines += _eval_section(ev)
    if made:
        lines += ["## Figures", ""]
        captions = {
            "margins_density.png": "Margin-reward distributions on the held-out pairs, with fitted normals (Fig. 3).",
            "margins_count.png": "The same margins as counts per bin (Fig. 4's view).",
            "curves.png": "Margin reward and pairwise accuracy on the test split over training (Fig. 5).",
            "win_tie_lose.png": "Judged win / tie / lose with 95% bootstrap intervals (Table 1).",
            "training.png": "Training loss per step and player; IOPO's mean importance weight.",
            "online_rounds.png": "Online runs: held-out metrics and judged win rate per round (Fig. 5's view, by round).",
            "online_cost.png": "Online runs: the same metrics against the annotation spent to reach them.",
        }
        for name in made:
            rel = os.path.relpath(figures_dir / name, output.parent)
            lines += [f"**{captions.get(name, name)}**", "", f"![{name}]({rel})", ""]
    output.write_text("\n".join(lines), encoding="utf-8")
    return output
