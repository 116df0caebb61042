"""Where a training step's time goes, float32 against bf16 autocast: iopo's DPO and IOPO steps on the embedded model,
profiled op by op and filed into buckets.

    .venv/bin/python benchmarks/step_profile.py [--batches 6] [--out benchmarks/results/step_profile.json]

The same steps as benchmarks/speed_vs_trl.py's iopo workers (SmolLM2-135M-Instruct, full fine-tuning, AdamW, 4
hh-rlhf pairs per step at max_length 256, prefix sharing and packing; `common.preference_step`), each configuration in
this process one after the other: a warm-up step, then `--batches - 1` steps under `torch.profiler` (CPU). Every
op's *self* time (its own, not its children's) is filed into one bucket:

- body matmuls: `mm`/`addmm`/`bmm` whose operands do not have the vocabulary's size (the blocks' projections);
- LM head matmuls: the same ops with a vocabulary-sized operand (the float32 head and its recompute, forward and
  backward);
- attention: SDPA's kernels, forward and backward;
- log-softmax: everything inside the float32 chunks' `logsumexp`, `gather` and the target log-softmax's backward;
- casts: `copy_`, `_to_copy`, `to` outside those regions (autocast's bf16 copies of the weights and activations, the
  head's float copy);
- optimizer: AdamW's update (its foreach ops) and `zero_grad`;
- elementwise: norms, SiLU, residual adds, rotary embeddings, masks and the rest.

Seconds per step are timed in separate, unprofiled steps (the profiler adds its own cost); the shares come from the
profiled ones. A step during which other processes used more than 10% of the CPUs is counted in `steps_contended`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, timed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
CASTS = {"aten::copy_", "aten::_to_copy", "aten::to", "aten::_copy_from", "aten::_copy_from_and_resize"}
# Regions, matched on an op's own name or any enclosing one's (lower case, underscores removed): what an op runs
# inside decides its bucket before its own name does (the log-softmax's exp and sums, the optimizer's foreach ops,
# SDPA's inner matmuls).
REGIONS = (
    ("optimizer", ("optimizer", "foreach", "adamw")),
    ("log_softmax", ("targetlogsoftmax", "logsumexp", "logsoftmax", "gather")),
    ("attention", ("scaleddotproduct", "flashattention")),
)


def bucket(event, vocabulary: int) -> str:
    chain, parent = [], event
    while parent is not None:
        chain.append(parent.name.lower().replace("_", ""))
        parent = parent.cpu_parent
    for name, marks in REGIONS:
        if any(mark in link for link in chain for mark in marks):
            return name
    if event.name in MATMUL:
        return "lm_head_matmul" if any(vocabulary in s for s in event.input_shapes if s) else "body_matmul"
    if event.name in CASTS:
        return "casts"
    return "elementwise"


def profile(kind: str, precision: str, batches: int) -> dict:
    import torch
    from speed_vs_trl import iopo_worker
    from torch.profiler import ProfilerActivity

    torch.set_num_threads(os.cpu_count() or 1)
    step = iopo_worker(kind, precision, 2 * batches)
    step(0)  # warm-up
    # Timed steps (unprofiled), then profiled ones on the same batches; the agent alternates in both.
    times, contended = [], 0
    for k in range(1, batches):
        seconds, others = timed(lambda k=k: step(k))
        times.append(seconds)
        contended += others > 0.10
    vocabulary = 49152
    totals: collections.Counter = collections.Counter()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for k in range(1, batches):
            step(k)
    for event in prof.events():
        totals[bucket(event, vocabulary)] += event.self_cpu_time_total
    profiled = sum(totals.values())
    per_step = statistics.median(times)
    return {
        "seconds_per_step": round(per_step, 3),
        "steps_timed": len(times),
        "steps_contended": contended,
        "share": {k: round(v / profiled, 3) for k, v in totals.most_common()},
        "seconds_per_step_by_bucket": {k: round(per_step * v / profiled, 3) for k, v in totals.most_common()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--kinds", nargs="+", default=["dpo", "iopo"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_profile.json"))
    opts = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    results: dict = {"machine": machine(), "runs": {}}
    for precision in ("float32", "bf16"):
        for kind in opts.kinds:
            key = f"{precision} {kind}"
            results["runs"][key] = profile(kind, precision, opts.batches)
            print(key, json.dumps(results["runs"][key], indent=1), flush=True)
    Path(opts.out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"written to {opts.out}")


if __name__ == "__main__":
    main()
