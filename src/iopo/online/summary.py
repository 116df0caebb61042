"""online.json and the printed round table: per round the scores, the annotation and scoring ledgers and the
stage seconds, with totals. Read by `iopo report` and `iopo plot` too (through the file)."""

from __future__ import annotations

import json
from pathlib import Path

from iopo.config import OnlineConfig
from iopo.core.formatting import number
from iopo.core.methods import PAIR_STAGES


def summarize(run: Path, cfg: OnlineConfig | None, status: str) -> dict:
    """online.json: per round the scores, annotation and scoring ledgers, stage seconds; totals."""
    rounds = []
    for folder in sorted(run.glob("round_*"), key=lambda p: int(p.name.split("_")[1])):
        manifest_file = folder / "manifest.json"
        if not manifest_file.is_file():
            continue
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        stages = manifest["stages"]
        scores = (
            json.loads((folder / "scores.json").read_text()) if (folder / "scores.json").is_file() else None
        )
        annotate = stages.get("judge", {}).get("ledger", {})
        scoring = (scores or {}).get("ledger", {})
        rounds.append(
            {
                "round": manifest["round"],
                "reference": manifest["reference"],
                "scores": {k: v for k, v in (scores or {}).items() if k not in ("ledger", "margins")} or None,
                "annotation": _ledger_total(annotate),
                "scoring": _ledger_total(scoring),
                "stage_seconds": {name: s.get("seconds") for name, s in stages.items() if s.get("done")},
                "pairs": {  # what the round's pair stage (Iter-DPO's, or a relative's) made
                    k: v
                    for stage in PAIR_STAGES
                    for k, v in stages.get(stage, {}).items()
                    if k in ("separated", "kept", "human")
                },
                "trained_pairs": stages.get("train", {}).get("pairs"),
                "steps": stages.get("train", {}).get("steps"),
            }
        )
    totals = {
        "annotation": _sum_ledgers([r["annotation"] for r in rounds]),
        "scoring": _sum_ledgers([r["scoring"] for r in rounds]),
        "stage_seconds": {},
    }
    for r in rounds:
        for name, seconds in r["stage_seconds"].items():
            totals["stage_seconds"][name] = totals["stage_seconds"].get(name, 0.0) + (seconds or 0.0)
    start = run / "start" / "manifest.json"
    if start.is_file():  # the starting model's test log-probs and answers, once per run
        stages = json.loads(start.read_text(encoding="utf-8"))["stages"]
        totals["stage_seconds"]["start"] = sum(s.get("seconds") or 0.0 for s in stages.values())
    totals["seconds"] = sum(totals["stage_seconds"].values())
    method = cfg.method if cfg is not None else None
    return {
        "kind": "iopo-online",
        "method": method,
        "status": status,
        "rounds_planned": cfg.rounds if cfg is not None else None,
        "rounds": rounds,
        "totals": totals,
        "settings": cfg.model_dump(mode="json") if cfg is not None else None,
    }


_LEDGER_KEYS = ("requests", "prompt_tokens", "completion_tokens", "seconds", "cost")


def _ledger_total(ledger: dict) -> dict:
    return {key: sum((row.get(key) or 0) for row in ledger.values()) for key in _LEDGER_KEYS}


def _sum_ledgers(rows: list[dict]) -> dict:
    return {key: sum(row.get(key) or 0 for row in rows) for key in _LEDGER_KEYS}


def format_online(summary: dict) -> str:
    """The per-round table of one online run."""
    lines = [f"Online {summary['method']}: {summary['status']}"]
    lines.append(
        f"{'round':>5} {'margin':>8} {'pair.acc':>8} {'win':>6} {'tie':>6} {'lose':>6} {'pairs':>6} "
        f"{'annot.req':>9} {'cost':>8} {'seconds':>8}"
    )
    for r in summary["rounds"]:
        s = r["scores"] or {}
        judged = s.get("judged") or {}
        lines.append(
            f"{r['round']:>5} {number(s.get('margin_reward'), 4, missing='-'):>8} {number(s.get('pairwise_accuracy'), 3, missing='-'):>8} "
            f"{number(judged.get('win'), 3, missing='-'):>6} {number(judged.get('tie'), 3, missing='-'):>6} {number(judged.get('lose'), 3, missing='-'):>6} "
            f"{r['trained_pairs'] if r['trained_pairs'] is not None else '-':>6} "
            f"{r['annotation']['requests']:>9} {r['annotation']['cost']:>8.4f} "
            f"{sum(v or 0 for v in r['stage_seconds'].values()):>8.0f}"
        )
    t = summary["totals"]
    lines.append(
        f"total: annotation {t['annotation']['requests']} requests, {t['annotation']['prompt_tokens']} prompt + "
        f"{t['annotation']['completion_tokens']} completion tokens, cost {t['annotation']['cost']:.4f}; scoring "
        f"{t['scoring']['requests']} requests; "
        + ", ".join(f"{k} {v:.0f}s" for k, v in t["stage_seconds"].items())
    )
    return "\n".join(lines)
