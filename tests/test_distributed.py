"""Two CPU processes (gloo, via torchrun) train IOPO to the same weights as one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from iopo import trainer

from test_trainer import make_cfg
from tiny import run_overrides, write_pairs


@pytest.mark.parametrize("lora", [False, True])
def test_two_processes_equal_one(tmp_path, tiny_model_dir, lora):
    common = [
        "iopo.n_iter=2",
        "iopo.n_mu=2",
        "iopo.n_nu=1",
        f"model.lora={str(lora).lower()}",
        "model.lora_r=4",
    ]
    one = make_cfg(tmp_path / "one", tiny_model_dir, *common)  # batch_size=4 on one process
    single = trainer.train(one)

    two_dir = tmp_path / "two"
    data = tmp_path / "one" / "pairs.jsonl"
    # batch 2 x 2 processes = the same 4 pairs per step as the one-process run
    args = run_overrides(tiny_model_dir, data, two_dir, *common, "optim.batch_size=2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "iopo",
        "train",
        *args,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "processes=2" in done.stdout

    a, b = (
        load_file(one.run_dir / "final" / "model.safetensors"),
        load_file(two_dir / "final" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
    # The sharded evaluation gathers every test pair back in order.
    two_eval = json.loads((two_dir / "eval.json").read_text())
    assert two_eval["n_pairs"] == single["n_pairs"] == 4
    assert two_eval["margin_reward"] == pytest.approx(single["margin_reward"], abs=1e-4)
    records = [json.loads(line) for line in (two_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "agent" in r]) == 6  # one per optimizer step
    assert [r["step"] for r in records if "eval/pairwise_accuracy" in r] == [6]  # the end-of-run eval


def test_accelerate_launch_config_runs_two_processes(tmp_path, tiny_model_dir):
    data = write_pairs(tmp_path / "pairs.jsonl")
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "cpu_2proc.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    args = run_overrides(tiny_model_dir, data, tmp_path / "run", "optim.batch_size=2", "iopo.n_iter=1")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "-m",
        "iopo",
        "train",
        *args,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "processes=2" in done.stdout and (tmp_path / "run" / "final" / "config.json").is_file()
