"""Seconds per optimizer step, IOPO vs DPO, at the quickstart settings on the embedded SmolLM2-135M-Instruct.

Run: .venv/bin/python benchmarks/step_time.py [--steps 6] [--modes full lora] [--out benchmarks/results/step_time.json]

Each (method, mode) is a real `iopo train` run of --steps optimizer steps (no evaluation, no export); the time of
each step is the `step_seconds` the trainer logs in metrics.jsonl. The first step is dropped as warm-up. One step
is one optimizer update on batch_size x max_length pairs: DPO runs one policy forward+backward and one reference
forward; IOPO runs one agent forward+backward and one env forward, so they should cost about the same.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(method: str, mode: str, steps: int, workdir: Path) -> dict:
    out = workdir / f"{method}-{mode}"
    overrides = [
        f"method={method}",
        f"output_dir={out}",
        f"model.lora={'true' if mode == 'lora' else 'false'}",
        "eval_at_end=false",
        "export=false",
        "progress_bar=false",
        "tensorboard=false",
        "save_steps=null",
        "save_total_limit=1",
    ]
    overrides += (
        [f"optim.max_steps={steps}"]
        if method != "iopo"
        else ["iopo.n_iter=2", f"iopo.n_mu={steps // 4}", f"iopo.n_nu={steps // 4}"]
    )
    if mode == "lora":
        overrides.append("optim.learning_rate=1e-4")
    cmd = [
        sys.executable,
        "-m",
        "iopo",
        "train",
        "--config",
        str(ROOT / "configs/quickstart.yaml"),
        *overrides,
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_seconds"] for r in records][1:]
    return {
        "method": method,
        "mode": mode,
        "steps_timed": len(times),
        "median_s": round(statistics.median(times), 3),
        "mean_s": round(statistics.mean(times), 3),
        "min_s": round(min(times), 3),
        "max_s": round(max(times), 3),
        "step_s": [round(t, 3) for t in times],
    }


def paired(rows: list[dict]) -> list[dict]:
    """IOPO/DPO time ratio step by step: both runs read the same batches in the same order (same seed)."""
    out = []
    for mode in sorted({r["mode"] for r in rows}):
        by = {r["method"]: r for r in rows if r["mode"] == mode}
        if {"dpo", "iopo"} <= by.keys():
            ratios = [i / d for i, d in zip(by["iopo"]["step_s"], by["dpo"]["step_s"], strict=False)]
            out.append({"mode": mode, "median_iopo_over_dpo": round(statistics.median(ratios), 3)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=8, help="optimizer steps per run (IOPO: 2 rounds of steps/4 + steps/4)"
    )
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/step_time.json"))
    args = parser.parse_args()
    import torch

    rows = []
    result = {
        "settings": "configs/quickstart.yaml: batch_size 4, max_length 256, max_prompt_length 128, fp32",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "steps_per_run": args.steps,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            for method in ("dpo", "iopo"):
                rows.append(run(method, mode, args.steps, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
                result["paired"] = paired(rows)
                Path(args.out).write_text(json.dumps(result, indent=2) + "\n")  # each finished row is kept
    print("| method | mode | median s/step | mean | min | max |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['mode']} | {r['median_s']} | {r['mean_s']} | {r['min_s']} | {r['max_s']} |"
        )
    for p in result["paired"]:
        print(
            f"{p['mode']}: median per-step IOPO/DPO time ratio on the same batches = {p['median_iopo_over_dpo']}"
        )


if __name__ == "__main__":
    main()
