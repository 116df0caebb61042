"""Two CPU processes (gloo, via torchrun) train IOPO to the same weights as one process with the same global batch."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import make_cfg

from iopo import trainer


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
    args = [f"{o}" for o in common] + [
        f"model={tiny_model_dir}",
        f"data={tmp_path / 'one' / 'pairs.jsonl'}",
        f"output_dir={two_dir}",
        "data.max_length=64",
        "data.max_prompt_length=32",
        "data.test_size=4",
        "optim.batch_size=2",  # x 2 processes = the same 4 pairs per step
        "optim.learning_rate=1e-2",
        "optim.warmup_ratio=0",
        "loss.beta=0.5",
        "progress_bar=false",
        "tensorboard=false",
        "eval_batch_size=3",
    ]
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
    import json

    two_eval = json.loads((two_dir / "eval.json").read_text())
    assert two_eval["n_pairs"] == single["n_pairs"] == 4
    assert two_eval["margin_reward"] == pytest.approx(single["margin_reward"], abs=1e-4)
    assert len((two_dir / "metrics.jsonl").read_text().splitlines()) == 6


def test_accelerate_launch_config_runs_two_processes(tmp_path, tiny_model_dir):
    from pathlib import Path

    from tiny import write_pairs

    data = write_pairs(tmp_path / "pairs.jsonl")
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "cpu_2proc.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "-m",
        "iopo",
        "train",
        f"model={tiny_model_dir}",
        f"data={data}",
        f"output_dir={tmp_path / 'run'}",
        "data.max_length=64",
        "data.max_prompt_length=32",
        "data.test_size=4",
        "optim.batch_size=2",
        "iopo.n_iter=1",
        "progress_bar=false",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "processes=2" in done.stdout and (tmp_path / "run" / "final" / "config.json").is_file()
