"""Plain vs prefix-shared (packed) batches: iopo's DPO optimizer step on the same real batches, alternating.

    .venv/bin/python benchmarks/batching_speed.py [--batches 14] [--out benchmarks/results/batching_speed.json]

The embedded SmolLM2-135M-Instruct (real 49k vocabulary), hh-rlhf harmless-base multi-turn pairs from the package,
batches of 4 pairs at max_length 256 (the quickstart's data settings), full fine-tuning with AdamW. Each batch is
stepped twice in a row, plain then shared (the order flips every batch), each step = policy forward + backward +
reference forward + update, so both layouts see the same batches and nearly the same weights. float32, then bf16
autocast. Per layout: seconds per step (median), real tokens per second (the non-padding tokens of the plain
layout, prompt counted twice as the plain forward computes it; the same number for both, so it measures the same
work), positions computed, and an approximate useful FLOP rate (6 x parameters x unique tokens for the policy's
forward+backward, 2 x parameters x unique tokens for the reference's forward, unique = prompt once) against a
float32 matmul rate measured here. A step during which other processes used more than 10% of the CPUs is flagged
and left out of the medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
from pathlib import Path

import torch
from common import MAX_LENGTH, matmul_gflops, preference_step, quickstart_batches, timed

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=14)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "batching_speed.json"))
    opts = parser.parse_args()

    from iopo.config import ModelConfig
    from iopo.core.logprobs import SequenceLogProbs
    from iopo.core.losses import dpo_loss
    from iopo.data import collate_pairs, collate_shared
    from iopo.io.models import load_model

    torch.manual_seed(0)
    model_cfg = ModelConfig()
    batches, pad = quickstart_batches(opts.batches)
    layouts = {
        "plain": collate_pairs,
        "shared": lambda pairs, pad_id: collate_shared(pairs, pad_id, pack_tokens=2 * MAX_LENGTH),
    }
    model = load_model(model_cfg)
    n_params = sum(p.numel() for p in model.parameters())
    reference = SequenceLogProbs(copy.deepcopy(model).eval().requires_grad_(False))
    policy = SequenceLogProbs(model.train())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-7)
    cores = os.cpu_count() or 1

    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {cores} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "model": "SmolLM2-135M-Instruct (embedded), full fine-tuning, DPO step (policy fwd+bwd, reference fwd)",
        "data": "hh-rlhf harmless-base (embedded), 4 pairs per batch, max_length 256, max_prompt_length 128",
        "matmul_gflops_float32": round(matmul_gflops(torch.float32), 1),
        "precisions": {},
    }
    for precision in ("float32", "bf16"):
        rows: dict[str, list[dict]] = {name: [] for name in layouts}
        for k, batch_pairs in enumerate(batches):
            order = list(layouts) if k % 2 == 0 else list(reversed(layouts))
            plain_batch = collate_pairs(batch_pairs, pad)
            real = int(plain_batch["attention_mask"].sum())
            unique = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in batch_pairs)
            for name in order:
                batch = layouts[name](batch_pairs, pad)
                seconds, others = timed(
                    lambda batch=batch, bf16=precision == "bf16": preference_step(
                        policy, reference, batch, dpo_loss, optimizer, bf16
                    )
                )
                rows[name].append(
                    {
                        "batch": k,
                        "seconds": seconds,
                        "real_tokens": real,
                        "unique_tokens": unique,
                        "positions": int(batch["input_ids"].numel()),
                        "others_cpu_share": round(others, 3),
                        "contended": others > 0.10,
                    }
                )
                print(f"{precision} batch {k:2d} {name:>6}: {seconds:6.2f}s  others {others:.0%}", flush=True)
        summary = {}
        for name, steps in rows.items():
            clean = [s for s in steps if not s["contended"]][1:] or steps[1:]  # the first batch warms up
            seconds = statistics.median(s["seconds"] for s in clean)
            real = statistics.median(s["real_tokens"] / s["seconds"] for s in clean)
            flops = statistics.median(8 * n_params * s["unique_tokens"] / s["seconds"] for s in clean) / 1e9
            summary[name] = {
                "seconds_per_step": round(seconds, 3),
                "real_tokens_per_second": round(real, 1),
                "positions_per_step": statistics.median(s["positions"] for s in clean),
                "useful_gflops": round(flops, 1),
                "share_of_matmul_rate": round(flops / results["matmul_gflops_float32"], 3),
                "steps_timed": len(clean),
                "steps_contended": sum(s["contended"] for s in steps),
            }
        paired = [
            p["seconds"] / s["seconds"] for p, s in zip(rows["plain"][1:], rows["shared"][1:], strict=True)
        ]
        summary["shared_speedup_paired_median"] = round(statistics.median(paired), 3)
        results["precisions"][precision] = {"summary": summary, "steps": rows}
        print(json.dumps({precision: summary}, indent=1), flush=True)
    Path(opts.out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"written to {opts.out}")


if __name__ == "__main__":
    main()
