"""Where the quickstart's memory goes: an RSS timeline over load -> train -> checkpoint -> export -> eval, the
arithmetic beside the measured peak, and LoRA IOPO memory against LoRA DPO memory.

    .venv/bin/python benchmarks/memory_timeline.py [--runs quickstart lora-iopo lora-dpo]
                                                   [--out benchmarks/results/memory_timeline.json]

Each run is a real `iopo train` in its own process, started with IOPO_MEMORY_TRACE=<file>: the trainer appends one
line per phase it enters (load, reference log-probs, train step N, eval at step N, checkpoint, export, done) with
its RSS and its high-water mark. This script samples the RSS of that process and of any children (VmRSS in
/proc) every 0.2 s and files every sample under the phase that was running. A phase's peak is the largest sample
in it, or the high-water mark when the mark rose during the phase (the kernel's exact peak, which a 0.2 s sample
can miss).

Runs: `quickstart` is configs/quickstart.yaml as it is (full fine-tuning IOPO, 12 steps, its evals during training,
checkpoint, export); `lora-iopo` and `lora-dpo` are the same data and batches with model.lora=true, 4 steps each
(IOPO: 2 per adapter), evaluated at the end only.

The arithmetic (float32, AdamW), in GB: weights = model copies x parameters x 4 B (full fine-tuning IOPO: the two
players; DPO: the policy and its frozen reference; LoRA: the one shared base, plus the adapters); gradients = one
player's trainable parameters (only the agent has gradients during its step); AdamW's two moments for every
trained player; activations = what autograd keeps for the largest training batch (positions x layers x
(4 x intermediate + 10 x hidden) floats for a Llama block, plus the float copy of the block mask that SDPA keeps
in every layer under prefix sharing; within 1% of what saved_tensors_hooks count on the quickstart's first
batch); logits = one chunk of float32 logits and the log-softmax's temporary of that size. The batches are rebuilt
here as the trainer builds them (same seed, same collate). The runtime (Python, torch, transformers) is the RSS
when training starts, listed apart.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import machine

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ["--config", str(ROOT / "configs" / "quickstart.yaml")]
LORA = ["model.lora=true", "optim.learning_rate=1e-4", "eval_steps=null"]
RUNS = {
    "quickstart": QUICKSTART,
    "lora-iopo": [*QUICKSTART, *LORA, "method=iopo", "iopo.n_iter=1"],
    "lora-dpo": [*QUICKSTART, *LORA, "method=dpo", "optim.max_steps=4"],
}
GB = 1e9


# ---------------------------------------------------------------- sampling a run


def _rss_kib(pid: int) -> int:
    """VmRSS of `pid` plus that of every descendant, in KiB (0 once it has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        own = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))
        children = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(c) for c in (task / "children").read_text().split()]
    except (OSError, AttributeError):  # gone, or a zombie without VmRSS
        return 0
    return own + sum(_rss_kib(child) for child in children)


def sample_run(args: list[str], workdir: Path, period: float = 0.2) -> dict:
    """Run `iopo train args` with the phase trace on; (its log, its RSS samples, the trace's marks, seconds)."""
    trace = workdir / "trace.jsonl"
    env = {**os.environ, "IOPO_MEMORY_TRACE": str(trace)}
    log_file = workdir / "train.log"
    tick = time.time()
    with log_file.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "iopo", "train", *args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        samples: list[tuple[float, float]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                kib = _rss_kib(process.pid)
                if kib:
                    samples.append((time.time(), kib * 1024 / GB))
                stop.wait(period)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # wait4 also gives the run's CPU time and page faults: what a change of allocator settings costs shows
        # there, while the wall time depends on whatever else the machine runs.
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = code = os.waitstatus_to_exitcode(status)
        stop.set()
        sampler.join()
    text = log_file.read_text(errors="replace")
    if code != 0:
        raise SystemExit(f"iopo train {' '.join(args)} failed ({code}):\n{text[-3000:]}")
    marks = [json.loads(line) for line in trace.read_text().splitlines()]
    cpu = {
        "user_s": round(usage.ru_utime, 1),
        "system_s": round(usage.ru_stime, 1),
        "minor_faults": usage.ru_minflt,
    }
    return {"log": text, "samples": samples, "marks": marks, "seconds": time.time() - tick, "cpu": cpu}


def phases(samples: list[tuple[float, float]], marks: list[dict]) -> list[dict]:
    """Every phase of the run in order: its start (s), RSS at its start, and its peak (see the module docstring)."""
    t0 = marks[0]["t"]
    out = []
    for i, mark in enumerate(marks[:-1]):
        end = marks[i + 1]
        inside = [rss for t, rss in samples if mark["t"] <= t < end["t"]]
        peak = max(inside, default=mark["rss_gb"])
        if end["hwm_gb"] > mark["hwm_gb"] + 1e-3:  # the run's high-water mark was set in this phase
            peak = max(peak, end["hwm_gb"])
        out.append(
            {
                "phase": mark["phase"],
                "start_s": round(mark["t"] - t0, 1),
                "seconds": round(end["t"] - mark["t"], 1),
                "rss_start_gb": round(mark["rss_gb"], 3),
                "peak_gb": round(peak, 3),
            }
        )
    return out


def phase_peaks(rows: list[dict]) -> dict[str, float]:
    """Peak per kind of phase: load, reference log-probs, train, eval, checkpoint, export."""
    peaks: dict[str, float] = {}
    for row in rows:
        kind = re.sub(r" (step|at step) \d+.*$", "", row["phase"])
        peaks[kind] = max(peaks.get(kind, 0.0), row["peak_gb"])
    return peaks


# ---------------------------------------------------------------- the arithmetic


def training_batches(args: list[str], shared: bool) -> list[dict]:
    """Rows, positions and completion tokens of every training micro-batch of the run, rebuilt as the trainer
    builds them (the same seeded stream of pairs, the same collate)."""
    from iopo.config import load_config
    from iopo.data import collate_pairs, load_training_data
    from iopo.engine.batching import shared_collate
    from iopo.engine.session import build_schedule, micro_batch_indices
    from iopo.io.models import load_tokenizer

    cfg = load_config(args[1], args[2:]) if args[:1] == ["--config"] else load_config(None, args)
    tokenizer = load_tokenizer(cfg.model)
    pairs, _, _ = load_training_data(cfg.data, tokenizer, None)
    collate = shared_collate(cfg) if shared else collate_pairs
    n_micro = (
        len(build_schedule(cfg, len(pairs), cfg.optim.batch_size)) * cfg.optim.gradient_accumulation_steps
    )
    out = []
    for position in range(n_micro):
        indices = micro_batch_indices(position, cfg.optim.batch_size, len(pairs), cfg.seed)
        batch = collate([pairs[i] for i in indices], tokenizer.pad_token_id)
        rows, length = batch["input_ids"].shape
        targets = (
            batch["target_ids"].numel() if "target_ids" in batch else int(batch["completion_mask"].sum())
        )
        out.append({"rows": rows, "positions": rows * length, "targets": int(targets), "mask_4d": shared})
    return out


def model_shape(args: list[str]) -> dict:
    """Parameters (from the safetensors headers, no weights read) and the sizes the activations scale with."""
    from safetensors import safe_open

    from iopo.config import load_config
    from iopo.io.models import resolve_model_path

    cfg = load_config(args[1], args[2:]) if args[:1] == ["--config"] else load_config(None, args)
    folder = Path(resolve_model_path(cfg.model))
    config = json.loads((folder / "config.json").read_text())
    n = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                n += math.prod(shape)
    return {
        "parameters": n,
        "layers": config["num_hidden_layers"],
        "hidden": config["hidden_size"],
        "intermediate": config["intermediate_size"],
        "vocabulary": config["vocab_size"],
        "chunk_tokens": cfg.logps_chunk_tokens,
    }


def arithmetic(shape: dict, batches: list[dict], run: dict, runtime_gb: float) -> dict:
    """The memory the run needs, in GB, float32: the weights of `run["copies"]` models (plus every player's LoRA
    adapters); gradients of one player's trainable parameters (only the agent has gradients during its step);
    AdamW's two moments for every trained player; the activations and the logits of the largest batch."""
    f32 = 4
    trainable, players = run["trainable_per_player"], run["trained_players"]
    adapters = players * trainable if run["lora"] else 0
    per_token_layer = 4 * shape["intermediate"] + 10 * shape["hidden"]

    def activations(b: dict) -> float:
        kept = b["positions"] * shape["layers"] * per_token_layer
        if b["mask_4d"]:  # SDPA keeps a float copy of the (rows, 1, T, T) block mask in every layer
            kept += b["rows"] * (b["positions"] // b["rows"]) ** 2 * shape["layers"]
        return kept * f32 / GB

    def logits(b: dict) -> float:  # one chunk of float32 logits and the log-softmax's temporary of that size
        return 2 * min(shape["chunk_tokens"], b["targets"]) * shape["vocabulary"] * f32 / GB

    largest = max(batches, key=lambda b: activations(b) + logits(b))
    parts = {
        "weights": (run["copies"] * shape["parameters"] + adapters) * f32 / GB,
        "gradients": trainable * f32 / GB,
        "adamw_moments": 2 * players * trainable * f32 / GB,
        "activations": activations(largest),
        "logits": logits(largest),
    }
    return {
        "gb": {k: round(v, 3) for k, v in parts.items()},
        "total_gb": round(sum(parts.values()), 3),
        "runtime_gb": round(runtime_gb, 3),
        "largest_batch": largest,
    }


# ---------------------------------------------------------------- main


def measure(name: str, workdir: Path) -> dict:
    args = [*RUNS[name], f"output_dir={workdir / 'run'}", "overwrite=true", "progress_bar=false"]
    print(f"{name}: iopo train {' '.join(args)}", flush=True)
    run = sample_run(args, workdir)
    rows = phases(run["samples"], run["marks"])
    printed = re.search(r"peak RSS per process \(GB\): ([\d.]+)", run["log"])
    metrics = re.search(r"margin reward\s+(\S+)\s+pairwise accuracy\s+(\S+)", run["log"])
    trainable = int(re.search(r"trainable/player=([\d,]+)", run["log"]).group(1).replace(",", ""))
    shared = "batching: prefix sharing" in run["log"]
    method = "dpo" if "method=dpo" in args else "iopo"
    lora = "model.lora=true" in args
    result = {
        # As written to the file: paths relative to the checkout, the temporary run folder as <tmp>.
        "args": [arg.replace(str(workdir), "<tmp>").replace(f"{ROOT}/", "") for arg in args],
        "seconds": round(run["seconds"], 1),
        "cpu": run["cpu"],
        "peak_rss_gb": round(max([s for _, s in run["samples"]] + [run["marks"][-1]["hwm_gb"]]), 3),
        "peak_rss_gb_printed": float(printed.group(1)) if printed else None,
        "margin_reward": metrics.group(1) if metrics else None,
        "pairwise_accuracy": metrics.group(2) if metrics else None,
        "method": method,
        "lora": lora,
        # IOPO: two trained players, each the other's reference; DPO: the policy and a frozen reference (under
        # LoRA the reference is the shared base with the adapters off, so one copy of the weights in every case).
        "trained_players": 2 if method == "iopo" else 1,
        "copies": 1 if lora else 2,
        "trainable_per_player": trainable,
        "batching": "shared" if shared else "plain",
        "phase_peaks_gb": phase_peaks(rows),
        "phases": rows,
        # One sample per second (the largest of it) keeps the file small.
        "timeline": _per_second(run["samples"], run["marks"][0]["t"]),
    }
    shape = model_shape(args)
    result["model"] = shape
    result["arithmetic"] = arithmetic(
        shape, training_batches(args, shared), result, run["marks"][0]["rss_gb"]
    )
    return result


def _per_second(samples: list[tuple[float, float]], t0: float) -> list[list[float]]:
    seconds: dict[int, float] = {}
    for t, rss in samples:
        key = max(0, int(t - t0))
        seconds[key] = max(seconds.get(key, 0.0), rss)
    return [[k, round(v, 3)] for k, v in sorted(seconds.items())]


def report(name: str, result: dict) -> None:
    print(
        f"\n{name}: {result['seconds']:.0f}s ({result['cpu']['user_s']:.0f}s user, {result['cpu']['system_s']:.0f}s "
        f"system CPU), peak RSS {result['peak_rss_gb']:.2f} GB "
        f"(printed by iopo: {result['peak_rss_gb_printed']}), margin reward {result['margin_reward']}, "
        f"pairwise accuracy {result['pairwise_accuracy']}"
    )
    print(f"  {'phase':<28} {'start s':>8} {'RSS at start':>13} {'peak':>7}")
    for row in result["phases"]:
        print(
            f"  {row['phase']:<28} {row['start_s']:>8.0f} {row['rss_start_gb']:>10.2f} GB {row['peak_gb']:>5.2f} GB"
        )
    if "arithmetic" in result:
        a = result["arithmetic"]
        print("  arithmetic (float32):")
        for key, value in a["gb"].items():
            print(f"    {key:<26} {value:6.3f} GB")
        print(f"    {'total':<26} {a['total_gb']:6.3f} GB; runtime (RSS at start) {a['runtime_gb']:.3f} GB")
        print(
            f"    peak / arithmetic {result['peak_rss_gb'] / a['total_gb']:.3f}; "
            f"peak / (arithmetic + runtime) {result['peak_rss_gb'] / (a['total_gb'] + a['runtime_gb']):.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_timeline.json"))
    opts = parser.parse_args()
    results: dict = {
        "machine": machine(),
        "what": "iopo train, each run in its own process; RSS sampled every 0.2 s, phases from IOPO_MEMORY_TRACE",
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in opts.runs:
            workdir = Path(tmp) / name
            workdir.mkdir()
            results["runs"][name] = measure(name, workdir)
            report(name, results["runs"][name])
    runs = results["runs"]
    if {"lora-iopo", "lora-dpo"} <= runs.keys():
        ratio = {
            kind: round(
                runs["lora-iopo"]["phase_peaks_gb"][kind] / runs["lora-dpo"]["phase_peaks_gb"][kind], 3
            )
            for kind in ("train", "eval")
        }
        ratio["run"] = round(runs["lora-iopo"]["peak_rss_gb"] / runs["lora-dpo"]["peak_rss_gb"], 3)
        results["lora_iopo_over_dpo"] = ratio
        print(f"\nLoRA IOPO / LoRA DPO peak RSS: {ratio}")
    Path(opts.out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(f"written to {opts.out}")


if __name__ == "__main__":
    main()
