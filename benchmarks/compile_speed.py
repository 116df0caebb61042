"""Does `torch.compile` make iopo's training step faster here? Eager against compiled, on the same real batches.

    .venv/bin/python benchmarks/compile_speed.py [--batches 10] [--out benchmarks/results/compile_speed.json]

The embedded SmolLM2-135M-Instruct (real 49k vocabulary), full fine-tuning with AdamW, iopo's DPO step with its
default batches (prefix-shared and packed) of 4 hh-rlhf harmless-base pairs at max_length 256: the quickstart's
settings. Two copies of the policy start from the same weights, each with its own AdamW; the second's transformer
body (`LlamaModel`, where nearly all FLOPs are; the chunked LM head and the log-softmax stay eager) is compiled with
`torch.compile(dynamic=True)`, since packed batches change shape from one step to the next. Both step batch k in
turn (the order flips every batch) against one shared frozen reference (eager). float32, then bf16 autocast.

Per precision: the steps in which the compiled copy compiled (a first shape, or a recompilation when a batch breaks
a guard) apart, with their time over eager's as the compile cost; the medians over the other batches for both, the
paired speedup (eager seconds over compiled seconds, batch by batch), the steps needed to pay the compile cost back,
and whether the two copies still agree (their log-probs on the last batch). A step during which other processes used more
than 10% of the CPUs is flagged and left out.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch._dynamo
from common import MAX_LENGTH, machine, preference_step, quickstart_batches, timed

ROOT = Path(__file__).resolve().parents[1]


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compile_speed.json"))
    opts = parser.parse_args()

    from iopo.config import ModelConfig
    from iopo.core.logprobs import SequenceLogProbs, sequence_logps
    from iopo.core.losses import dpo_loss
    from iopo.data import collate_shared
    from iopo.io.models import load_model

    torch.manual_seed(0)
    pairs, pad = quickstart_batches(opts.batches)
    batches = [collate_shared(b, pad, pack_tokens=2 * MAX_LENGTH) for b in pairs]
    model = load_model(ModelConfig())
    reference = SequenceLogProbs(copy.deepcopy(model).eval().requires_grad_(False))
    results: dict = {
        "machine": machine(),
        "model": "SmolLM2-135M-Instruct (embedded), full fine-tuning, DPO step (policy fwd+bwd, reference fwd)",
        "data": "hh-rlhf harmless-base (embedded), 4 pairs per batch, max_length 256, prefix-shared and packed",
        "compiled": "the policy's LlamaModel, torch.compile(dynamic=True), default mode (inductor)",
        "precisions": {},
    }
    for precision in ("float32", "bf16"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        eager = SequenceLogProbs(copy.deepcopy(model).train())
        compiled = SequenceLogProbs(copy.deepcopy(model).train())
        compiled.model.model.compile(dynamic=True)
        players = {"eager": eager, "compiled": compiled}
        optimizers = {n: torch.optim.AdamW(p.parameters(), lr=1e-7) for n, p in players.items()}
        rows: dict[str, list[dict]] = {name: [] for name in players}
        bf16 = precision == "bf16"
        for k, batch in enumerate(batches):
            for name in players if k % 2 == 0 else reversed(players):
                graphs = _graphs()
                seconds, others = timed(
                    lambda p=players[name], o=optimizers[name], b=batch, f=bf16: preference_step(
                        p, reference, b, dpo_loss, o, f
                    )
                )
                compiled_now = (
                    _graphs() - graphs
                )  # > 0: this step compiled (a first shape or a recompilation)
                rows[name].append(
                    {
                        "batch": k,
                        "seconds": seconds,
                        "others_cpu_share": round(others, 3),
                        "graphs_compiled": compiled_now,
                        "positions": int(batch["input_ids"].numel()),
                    }
                )
                print(
                    f"{precision} batch {k:2d} {name:>8}: {seconds:7.2f}s  others {others:.0%}"
                    + (f"  compiled {compiled_now} graph(s)" if compiled_now else ""),
                    flush=True,
                )
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            a = sequence_logps(eager.eval(), batches[-1])["chosen_logps"]
            b = sequence_logps(compiled.eval(), batches[-1])["chosen_logps"]
        gap = float((a - b).abs().max() / a.abs().max())

        # A batch counts for the steady state when the compiled copy did not compile in it (both copies' steps of
        # that batch are kept or dropped together) and neither step was contended.
        steady = [
            k
            for k in range(len(batches))
            if k > 0
            and not rows["compiled"][k]["graphs_compiled"]
            and all(rows[n][k]["others_cpu_share"] <= 0.10 for n in rows)
        ]

        summary = {
            name: {
                "seconds_per_step": round(
                    statistics.median(s["seconds"] for s in [steps[k] for k in steady]), 3
                ),
                "steps_timed": len(steady),
                "steps_contended": sum(s["others_cpu_share"] > 0.10 for s in steps),
            }
            for name, steps in rows.items()
        }
        compiling = [k for k in range(len(batches)) if rows["compiled"][k]["graphs_compiled"]]
        summary["compiled"]["compiling_steps_seconds"] = [
            round(rows["compiled"][k]["seconds"], 1) for k in compiling
        ]
        paired = [rows["eager"][k]["seconds"] / rows["compiled"][k]["seconds"] for k in steady]
        summary["speedup_paired_median"] = round(statistics.median(paired), 3) if paired else None
        # Steps the compiled copy must run before its compile time is paid back (None: never, it is not faster).
        extra = sum(rows["compiled"][k]["seconds"] - rows["eager"][k]["seconds"] for k in compiling)
        saved = summary["eager"]["seconds_per_step"] - summary["compiled"]["seconds_per_step"]
        summary["compile_seconds"] = round(extra, 1)
        summary["break_even_steps"] = round(extra / saved) if saved > 0 else None
        summary["graphs_compiled"] = _graphs()
        summary["graph_breaks"] = int(sum(torch._dynamo.utils.counters["graph_break"].values()))
        summary["logps_relative_gap_last_batch"] = gap
        results["precisions"][precision] = {"summary": summary, "steps": rows}
        print(json.dumps({precision: summary}, indent=1), flush=True)
        del eager, compiled, players, optimizers
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    Path(opts.out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"written to {opts.out}")


if __name__ == "__main__":
    main()
