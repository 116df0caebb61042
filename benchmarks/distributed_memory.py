"""Peak RSS per process of full-fine-tuning IOPO under distributed.strategy=ddp vs fsdp, two CPU processes (torchrun,
gloo), on a tiny random Llama and on the embedded SmolLM2-135M: 2 optimizer steps (one per player) of 1 pair per
process, then the export and the end-of-training eval. Reads the `[iopo] peak RSS per process` and `[iopo] fsdp:`
lines of each run's log.

    .venv/bin/python benchmarks/distributed_memory.py [--out benchmarks/results/distributed_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(strategy: str, model_args: list[str], out: Path) -> dict:
    args = [
        *model_args,
        f"output_dir={out}",
        "optim.batch_size=1",
        "iopo.n_iter=1",
        "iopo.n_mu=1",
        "iopo.n_nu=1",
        "data.test_size=8",
        "eval_batch_size=4",
        "optim.warmup_ratio=0",
        "progress_bar=false",
        "tensorboard=false",
        f"distributed.strategy={strategy}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    tick = time.perf_counter()
    done = subprocess.run(
        [*cmd, "-m", "iopo", "train", *args], env=env, capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "iopo: error" in line or "Error" in line]
        raise SystemExit(f"{strategy}: failed\n" + "\n".join(errors[:20]))
    rss = re.search(r"peak RSS per process \(GB\): ([\d., ]+)", done.stdout).group(1)
    shares = re.findall(r"(protagonist|adversary) ([\d,]+) \+ ([\d,]+) of ([\d,]+)", done.stdout)
    return {
        "peak_rss_gb": [float(x) for x in rss.split(",")],
        "parameters_per_process": {
            name: [int(a.replace(",", "")), int(b.replace(",", ""))] for name, a, b, _ in shares
        },
        "seconds": round(time.perf_counter() - tick, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed_memory.json"))
    opts = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import save_tiny, write_pairs

    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "processes": 2,
        "what": "IOPO full fine-tuning, 2 steps of 1 pair per process, float32, CPU (gloo)",
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny = save_tiny(tmp / "tiny")
        pairs = write_pairs(tmp / "pairs.jsonl")
        models = {
            "tiny": [f"model={tiny}", f"data={pairs}", "data.max_length=64", "data.max_prompt_length=32"],
            "SmolLM2-135M": ["data.max_length=128", "data.max_prompt_length=64"],
        }
        for label, model_args in models.items():
            for strategy in ("ddp", "fsdp"):
                result = run(strategy, model_args, tmp / f"{label}-{strategy}")
                results["runs"][f"{label} {strategy}"] = result
                print(
                    f"{label:>14} {strategy:>5}: peak RSS per process {result['peak_rss_gb']} GB", flush=True
                )
    Path(opts.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"written to {opts.out}")


if __name__ == "__main__":
    main()
