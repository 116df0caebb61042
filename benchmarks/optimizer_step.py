"""AdamW's update of the embedded SmolLM2-135M-Instruct's parameters on this CPU: torch's per-tensor (foreach) loop
against its fused kernel (what iopo uses for every unsharded optimizer), with the same random gradients; and whether
the two give the same parameters.

Run: .venv/bin/python benchmarks/optimizer_step.py [--steps 8] [--out benchmarks/results/optimizer_step.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine  # noqa: E402


def timed_steps(params, fused: bool, steps: int) -> tuple[list[float], list]:
    import torch

    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=fused or None, foreach=None if fused else True)
    times = []
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) * 1e-3
        tick = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - tick)
    return times[1:], [p.detach().clone() for p in params]


def main() -> None:
    import torch

    from iopo.config import ModelConfig
    from iopo.io.models import load_model

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/optimizer_step.json"))
    args = parser.parse_args()
    model = load_model(ModelConfig())
    start = [p.detach().clone() for p in model.parameters()]
    rows = {}
    finals = {}
    for name, fused in (("foreach", False), ("fused", True)):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        times, finals[name] = timed_steps(params, fused, args.steps)
        rows[name] = {"median_s": round(statistics.median(times), 4), "steps_timed": len(times)}
    gap = max(float((a - b).abs().max()) for a, b in zip(finals["foreach"], finals["fused"], strict=True))
    result = {
        "machine": machine(),
        "parameters": sum(p.numel() for p in start),
        "adamw_step": rows,
        "foreach_over_fused": round(rows["foreach"]["median_s"] / rows["fused"]["median_s"], 2),
        "largest_parameter_difference": gap,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
