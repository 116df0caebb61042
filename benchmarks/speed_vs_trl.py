"""iopo's DPO and IOPO steps against TRL's DPOTrainer, side by side on the same real batches, in one run.

    .venv/bin/pip install -e ".[bench]"      # TRL, pinned
    .venv/bin/python benchmarks/speed_vs_trl.py [--batches 8] [--precisions float32 bf16] [--out FILE]

The embedded SmolLM2-135M-Instruct (its real 49k vocabulary), full fine-tuning, AdamW; hh-rlhf harmless-base
multi-turn pairs from the package, 4 pairs per step at max_length 256 (iopo: max_prompt_length 128). Each
configuration runs in its own worker process (so its peak RSS is its own) and keeps its model between steps; the
parent has two workers step batch k in turn (the order flips every batch): iopo's DPO step with TRL's, then iopo's
IOPO step (agent forward+backward, env forward; the agent alternates) with TRL's; float32, then bf16 autocast.
iopo uses its defaults (prefix sharing and packing); TRL 1.16's DPOTrainer its own (padding, both rows). Both
sides update with fused AdamW (the trainer's and TRL's default).

Per configuration: seconds per step (median, the first step dropped), real (non-padding) tokens per second as each
side tokenizes them, peak RSS, the useful FLOP rate (common.useful_flops: the least the same math needs, prompt
once, no padding, LM head on completions; the same count for both sides on the same pairs) and its share of this
machine's matmul rate in that precision (measured first, the better of a square and a model-shaped product), and
the iopo/TRL ratio from the paired steps. A step during which other processes used more than 10% of the CPUs is
flagged and left out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (
    MAX_LENGTH,
    MAX_PROMPT,
    machine,
    matmul_gflops,
    model_shape,
    preference_step,
    quickstart_batches,
    timed,
    useful_flops,
)

ROOT = Path(__file__).resolve().parents[1]


def raw_pairs(n: int):
    from iopo.config import DataConfig
    from iopo.data import load_split

    train, _, _, _ = load_split(DataConfig(max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT))
    return train[:n]


# ---------------------------------------------------------------- workers


def iopo_worker(kind: str, precision: str, batches: int):
    import copy

    import torch

    from iopo.config import ModelConfig
    from iopo.core.logprobs import SequenceLogProbs
    from iopo.core.losses import dpo_loss, iopo_loss
    from iopo.data import collate_shared
    from iopo.io.models import load_model

    torch.manual_seed(0)
    pair_batches, pad = quickstart_batches(batches)
    model = load_model(ModelConfig())
    shape = model_shape(model)
    other = copy.deepcopy(model)
    if kind == "dpo":
        players = {"policy": SequenceLogProbs(model.train())}
        frozen = SequenceLogProbs(other.eval().requires_grad_(False))
    else:
        players = {
            "protagonist": SequenceLogProbs(model.train()),
            "adversary": SequenceLogProbs(other.train()),
        }
    # Fused AdamW, as the trainer builds it (iopo.engine.session.make_optimizer) and as TRL 1.16 defaults to
    # (optim="adamw_torch_fused"); torch's default on CPU is the per-tensor loop, several times slower.
    optimizers = {n: torch.optim.AdamW(m.parameters(), lr=1e-7, fused=True) for n, m in players.items()}

    def step(k: int) -> dict:
        batch_pairs = pair_batches[k]
        batch = collate_shared(batch_pairs, pad, pack_tokens=2 * MAX_LENGTH)
        real = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in batch_pairs)
        names = list(players)
        agent_name = names[k % len(names)]
        agent = players[agent_name]
        env = frozen if kind == "dpo" else players[names[(k + 1) % len(names)]]
        loss_fn = dpo_loss if kind == "dpo" else iopo_loss
        preference_step(agent, env, batch, loss_fn, optimizers[agent_name], precision == "bf16")
        counts = [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in batch_pairs]
        return {
            "real_tokens": real,
            "positions": int(batch["input_ids"].numel()),
            "useful_flops": useful_flops(shape, counts),
        }

    return step


def trl_worker(precision: str, batches: int):
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from iopo.config import ModelConfig
    from iopo.io.models import load_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(ModelConfig())
    pairs = raw_pairs(
        4 * batches + 16
    )  # TRL drops a few rows when it tokenizes: its first 4 x batches are used
    dataset = Dataset.from_list(
        [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    )
    args = DPOConfig(
        output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / f"trl-bench-{os.getpid()}"),
        per_device_train_batch_size=4,
        max_length=MAX_LENGTH,
        learning_rate=1e-7,
        beta=0.1,
        bf16=precision == "bf16",
        use_cpu=True,
        report_to=[],
        logging_steps=1000,
        save_strategy="no",
        remove_unused_columns=False,
    )
    trainer = DPOTrainer(
        model=load_model(ModelConfig()), args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=batches)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which is not used here
    model = trainer.model
    model.train()
    shape = model_shape(model)
    rows = trainer.train_dataset

    def step(k: int) -> dict:
        features = [rows[i] for i in range(4 * k, 4 * k + 4)]
        inputs = trainer.data_collator(features)
        mask = inputs.get("attention_mask")
        real = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        # The same pairs as TRL truncated them: rows 0-3 are prompt + chosen, rows 4-7 prompt + rejected.
        completion = inputs["completion_mask"].sum(-1).tolist()
        prompt = (inputs["attention_mask"].sum(-1) - inputs["completion_mask"].sum(-1)).tolist()
        counts = [(prompt[i], completion[i], completion[i + 4]) for i in range(4)]
        trainer.training_step(model, inputs)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return {
            "real_tokens": real,
            "positions": int(inputs["input_ids"].numel()),
            "useful_flops": useful_flops(shape, counts),
        }

    return step


def worker_main(name: str, precision: str, batches: int) -> None:
    import resource

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    step = (
        trl_worker(precision, batches)
        if name == "trl-dpo"
        else iopo_worker(name.split("-")[1], precision, batches)
    )
    print("ready", flush=True)
    for line in sys.stdin:
        k = int(line)
        info: dict = {}
        seconds, others = timed(lambda k=k, info=info: info.update(step(k)))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
        print(
            json.dumps(
                {"seconds": seconds, "others": round(others, 3), "peak_rss_gib": round(peak, 2), **info}
            )
        )
        sys.stdout.flush()


# ---------------------------------------------------------------- parent


class Worker:
    def __init__(self, name: str, precision: str, batches: int):
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", name, "--precision", precision, "--batches", str(batches)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"worker {name} failed to start")

    def step(self, k: int) -> dict:
        self.proc.stdin.write(f"{k}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.name} died at batch {k}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


def summarize(steps: list[dict], matmul: float) -> dict:
    clean = [s for s in steps[1:] if s["others"] <= 0.10] or steps[1:]
    gflops = statistics.median(s["useful_flops"] / s["seconds"] for s in clean) / 1e9
    return {
        "seconds_per_step": round(statistics.median(s["seconds"] for s in clean), 3),
        "real_tokens_per_second": round(statistics.median(s["real_tokens"] / s["seconds"] for s in clean), 1),
        "real_tokens_per_step": statistics.median(s["real_tokens"] for s in clean),
        "positions_per_step": statistics.median(s["positions"] for s in clean),
        "useful_gflops_per_second": round(gflops, 2),
        "share_of_matmul_rate": round(gflops / matmul, 3),
        "peak_rss_gib": steps[-1]["peak_rss_gib"],
        "steps_timed": len(clean),
        "steps_contended": sum(s["others"] > 0.10 for s in steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed_vs_trl.json"))
    parser.add_argument("--worker")
    parser.add_argument("--precision", default="float32")
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["float32", "bf16"],
        help="the precisions to measure; the other ones' results already in --out are kept (with their date)",
    )
    opts = parser.parse_args()
    if opts.worker:
        return worker_main(opts.worker, opts.precision, opts.batches)
    import torch
    import transformers
    import trl

    torch.set_num_threads(os.cpu_count() or 1)  # as the workers
    # The machine's matmul rate per precision: the better of a square product and one of the model's own shapes
    # (1024 tokens through a 576 -> 1536 MLP projection), measured before any worker starts.
    matmul = {
        name: {
            "square_1024": round(matmul_gflops(dtype), 1),
            "1024x576x1536": round(matmul_gflops(dtype, (1024, 576, 1536)), 1),
        }
        for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16))
    }
    out = Path(opts.out)
    kept = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "matmul_gflops": matmul,
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "model": "SmolLM2-135M-Instruct (embedded), full fine-tuning, AdamW",
        "data": f"hh-rlhf harmless-base (embedded), 4 pairs per step, max_length {MAX_LENGTH}",
        "runs": {},
    }
    for key, run in kept.get("runs", {}).items():  # an earlier measurement of a precision not measured now
        if key.split()[0] not in opts.precisions:
            results["runs"][key] = run
    for precision in opts.precisions:
        for ours in ("iopo-dpo", "iopo-iopo"):
            workers = [Worker(ours, precision, opts.batches), Worker("trl-dpo", precision, opts.batches)]
            steps: dict[str, list[dict]] = {w.name: [] for w in workers}
            for k in range(opts.batches):
                for w in workers if k % 2 == 0 else reversed(workers):
                    steps[w.name].append(w.step(k))
                    print(
                        f"{precision} {ours} batch {k} {w.name}: {steps[w.name][-1]['seconds']:.2f}s",
                        flush=True,
                    )
            for w in workers:
                w.close()
            pair = [  # iopo's real tokens per second over TRL's, batch by batch
                (o["real_tokens"] / o["seconds"]) / (t["real_tokens"] / t["seconds"])
                for o, t in zip(steps[ours][1:], steps["trl-dpo"][1:], strict=True)
                if o["others"] <= 0.10 and t["others"] <= 0.10
            ]
            key = f"{precision} {ours} vs trl"
            results["runs"][key] = {
                "date": results["date"],
                "optimizer": "fused AdamW on both sides",
                ours: summarize(steps[ours], max(matmul[precision].values())),
                "trl-dpo": summarize(steps["trl-dpo"], max(matmul[precision].values())),
                "throughput_ratio_paired_median": round(statistics.median(pair), 3) if pair else None,
                "steps": steps,
            }
            print(
                json.dumps({key: {k: v for k, v in results["runs"][key].items() if k != "steps"}}, indent=1)
            )
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"written to {opts.out}")


if __name__ == "__main__":
    main()
