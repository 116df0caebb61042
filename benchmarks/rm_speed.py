"""Seconds per `iopo train-rm` step, plain rows vs prefix-shared packed batches, at the quickstart's RM settings
(configs/rm.yaml: the embedded SmolLM2-135M-Instruct, 8 hh-rlhf harmless-base pairs per step, 256 tokens, bf16).

Run: .venv/bin/python benchmarks/rm_speed.py [--steps 8] [--out benchmarks/results/rm_speed.json]

Each layout is a real `iopo train-rm` run of --steps optimizer steps on the same pairs in the same order (same
seed); a step's time is the `step_seconds` the trainer logs (forward, backward, optimizer). The first step is dropped
as warm-up; the ratio is taken step by step (the same batch both ways), and the held-out accuracy of both runs on
the same 64 test pairs is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine  # noqa: E402


def run(batching: str, steps: int, workdir: Path) -> dict:
    out = workdir / batching
    cmd = [
        sys.executable,
        "-m",
        "iopo",
        "train-rm",
        "--config",
        str(ROOT / "configs/rm.yaml"),
        f"batching={batching}",
        f"optim.max_steps={steps}",
        "data.max_eval_samples=64",
        f"output_dir={out}",
        "progress_bar=false",
        "tensorboard=false",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_seconds"] for r in records if "step_seconds" in r][1:]
    held = json.loads((out / "eval.json").read_text())
    return {
        "batching": batching,
        "steps_timed": len(times),
        "median_s": round(statistics.median(times), 3),
        "mean_s": round(statistics.mean(times), 3),
        "step_s": [round(t, 3) for t in times],
        "heldout_accuracy": held["pairwise_accuracy"],
        "heldout_pairs": held["n_pairs"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/rm_speed.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batching in ("plain", "shared"):
            rows.append(run(batching, args.steps, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    plain, shared = rows
    ratios = [p / s for p, s in zip(plain["step_s"], shared["step_s"], strict=True)]
    result = {
        "settings": "configs/rm.yaml: 8 pairs/step, max_length 256, max_prompt_length 128, bf16 autocast, lr 2e-5",
        "machine": machine(),
        "rows": rows,
        "median_plain_over_shared": round(statistics.median(ratios), 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"median per-step plain/shared time ratio on the same batches: {result['median_plain_over_shared']}"
    )


if __name__ == "__main__":
    main()
