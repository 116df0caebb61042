"""benchmarks/gpu_check.py, the script a GPU session runs first, checked here for its plumbing on the CPU: small
shapes, both methods through real optimizer steps, its JSON, and the one-process FSDP2 smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_its_plumbing_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu_check.py"),
        "--device",
        "cpu",
        "--small",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--batch",
        "2",
        "--lengths",
        "8",
        "4",
        "4",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["settings"]["lengths"] == [8, 4, 4]
    assert set(result["models"]) == {"tiny-a", "tiny-b"}
    for model in result["models"].values():
        assert [r["method"] for r in model["rows"]] == ["dpo", "iopo"]
        assert model["parameters"] > 0
        for row in model["rows"]:
            assert row["steps_timed"] == 2 and row["median_s_per_step"] > 0
            assert abs(row["tokens_per_s"] * row["median_s_per_step"] / (2 * 16) - 1) < 0.02
            assert row["achieved_tflops"] > 0 and row["mfu"] is None and row["peak_memory_gib"] is None
        assert model["rows"][1]["players"] == ["protagonist", "adversary"]
        assert {r["batching"] for r in model["rows"]} <= {"shared", "plain"}
    assert result["fsdp_smoke"]["ok"], result["fsdp_smoke"]["tail"]
