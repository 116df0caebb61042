"""Two CPU processes (gloo, via torchrun) train IOPO to the same weights as one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from iopo.commands.train import train
from iopo.config import TrainConfig, load_config
from iopo.io.models import load_model

from tiny import make_cfg, run_overrides, write_pairs


@pytest.mark.parametrize(
    ("method", "lora"), [("iopo", False), ("iopo", True), ("sppo", False), ("inpo", True)]
)
def test_two_processes_equal_one(tmp_path, tiny_model_dir, method, lora):
    schedule = ["iopo.n_iter=2", "iopo.n_mu=2", "iopo.n_nu=1"] if method == "iopo" else ["optim.max_steps=6"]
    common = [*schedule, f"method={method}", f"model.lora={str(lora).lower()}", "model.lora_r=4"]
    one = make_cfg(tmp_path / "one", tiny_model_dir, *common)  # batch_size=4 on one process
    single = train(one)

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


# ---------------------------------------------------------------- FSDP2 (distributed.strategy=fsdp)

GAME = ["iopo.n_iter=2", "iopo.n_mu=2", "iopo.n_nu=1"]  # steps: protagonist, protagonist, adversary, x2


def _torchrun(args: list[str], nproc: int = 2, **popen) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += ["-m", "iopo", "train", *args]
    if popen:
        return subprocess.Popen(cmd, env=env, **popen)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _weights(run_dir: Path) -> dict:
    return load_file(run_dir / "final" / "model.safetensors")


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, tiny_model_dir):
    """IOPO, full fine-tuning, 6 steps of 4 pairs: one process (plain), and two FSDP2 processes (2 pairs each) with a
    checkpoint every 2 steps, uninterrupted."""
    root = tmp_path_factory.mktemp("fsdp")
    data = write_pairs(root / "pairs.jsonl", n=24)
    one = load_config(None, run_overrides(tiny_model_dir, data, root / "one", *GAME))
    train(one)
    args = run_overrides(
        tiny_model_dir,
        data,
        root / "two",
        *GAME,
        "optim.batch_size=2",
        "distributed.strategy=fsdp",
        "save_steps=2",
    )
    done = _torchrun([*args, "save_total_limit=3"])
    return {
        "root": root,
        "data": data,
        "one": root / "one",
        "two": root / "two",
        "args": args,
        "out": done.stdout,
    }


def test_fsdp_shards_each_player_in_half_and_equals_one_process(fsdp_runs, tiny_model_dir):
    out = fsdp_runs["out"]
    assert "processes=2" in out
    # Each process holds about half of each player's parameters, and the two halves make the whole.
    import re

    shares = re.findall(
        r"(protagonist|adversary) ([\d,]+) \+ ([\d,]+) of ([\d,]+) parameters per process", out
    )
    assert [s[0] for s in shares] == ["protagonist", "adversary"]
    full = sum(p.numel() for p in load_model(TrainConfig(model=str(tiny_model_dir)).model).parameters())
    for _, a, b, total in shares:
        a, b, total = (int(x.replace(",", "")) for x in (a, b, total))
        assert total == full and a + b == full and abs(a - b) <= 0.1 * full
    assert re.search(r"peak RSS per process \(GB\): [\d.]+, [\d.]+", out)
    # The exported protagonist equals the one-process run's (float rounding of Adam over 6 steps).
    _assert_close(_weights(fsdp_runs["two"]), _weights(fsdp_runs["one"]), atol=1e-5)
    # Checkpoints are DCP folders: both processes' shards, no whole-model copies; the export loads as usual.
    ckpt = fsdp_runs["two"] / "checkpoints" / "step-0000006"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["format"] == "dcp" and state["processes"] == 2
    assert sorted(state["with_optimizer"]) == ["adversary", "protagonist"]
    assert (ckpt / "dcp" / ".metadata").is_file() and len(list((ckpt / "dcp").glob("*.distcp"))) == 2
    assert not (ckpt / "protagonist").exists() and not list(ckpt.glob("*.optimizer.pt"))
    from iopo.config import ConfigError
    from iopo.io.models import resolve_model

    with pytest.raises(
        ConfigError, match="sharded"
    ):  # `iopo eval` of such a checkpoint: one line, not a crash
        resolve_model(str(ckpt))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fsdp_runs["two"] / "final")
    torch.testing.assert_close(
        model.state_dict()["lm_head.weight"], _weights(fsdp_runs["two"])["lm_head.weight"]
    )
    one_eval = json.loads((fsdp_runs["one"] / "eval.json").read_text())
    two_eval = json.loads((fsdp_runs["two"] / "eval.json").read_text())
    assert two_eval["margin_reward"] == pytest.approx(one_eval["margin_reward"], abs=1e-4)


def _kill_when(args: list[str], ready) -> None:
    """Start two FSDP2 processes and SIGKILL torchrun and every worker as soon as `ready()`."""
    import signal
    import time

    import psutil

    proc = _torchrun(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not ready():
        time.sleep(0.002)
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def test_fsdp_killed_run_resumes_exactly_and_reshards_onto_one_process(fsdp_runs, tmp_path):
    import shutil

    killed = tmp_path / "killed"
    args = [a for a in fsdp_runs["args"] if not a.startswith("output_dir=")] + [f"output_dir={killed}"]
    # Killed once step 2 is saved: the adversary has not stepped yet, so it is saved without optimizer state.
    _kill_when(args, lambda: (killed / "checkpoints" / "step-0000002").is_dir())
    assert not (killed / "final").exists()
    newest = max((killed / "checkpoints").glob("step-*"))
    assert newest.name in ("step-0000002", "step-0000004")  # killed before the end
    copy = tmp_path / "copy"
    shutil.copytree(killed, copy)

    _torchrun([*args, "resume=true"])  # two processes again: the same weights, bit for bit
    _assert_close(_weights(killed), _weights(fsdp_runs["two"]), atol=0.0)

    # The same checkpoint on one process (4 pairs per step there): DCP reshards it.
    one = load_config(
        None,
        [a for a in args if not a.startswith(("output_dir=", "optim.batch_size="))]
        + [f"output_dir={copy}", "optim.batch_size=4", "resume=true"],
    )
    train(one)
    _assert_close(_weights(copy), _weights(fsdp_runs["two"]), atol=1e-6)


def test_fsdp_one_process_checkpoint_resumes_on_two(fsdp_runs, tmp_path, tiny_model_dir):
    single = load_config(
        None,
        run_overrides(
            tiny_model_dir,
            fsdp_runs["data"],
            tmp_path / "one",
            *GAME,
            "distributed.strategy=fsdp",
            "save_steps=3",
        ),
    )
    train(single)
    import shutil

    assert (
        json.loads((tmp_path / "one" / "checkpoints" / "step-0000003" / "trainer_state.json").read_text())[
            "processes"
        ]
        == 1
    )
    # The run folder as it was at step 3: its newest checkpoint is step 3.
    shutil.copytree(
        tmp_path / "one", tmp_path / "two", ignore=shutil.ignore_patterns("step-0000006", "final")
    )
    args = run_overrides(
        tiny_model_dir,
        fsdp_runs["data"],
        tmp_path / "two",
        *GAME,
        "distributed.strategy=fsdp",
        "optim.batch_size=2",
        "resume=true",
    )
    done = _torchrun(args)
    assert "resumed from" in done.stdout and "at step 3/6" in done.stdout
    _assert_close(_weights(tmp_path / "two"), _weights(tmp_path / "one"), atol=1e-6)


@pytest.mark.parametrize(
    "extra", [["model.lora=true", "model.lora_r=4"], ["method=dpo", "optim.max_steps=4"]]
)
def test_fsdp_lora_and_a_sharded_reference_equal_one_process(tmp_path, tiny_model_dir, extra):
    data = write_pairs(tmp_path / "pairs.jsonl", n=24)
    one = load_config(None, run_overrides(tiny_model_dir, data, tmp_path / "one", *GAME, *extra))
    train(one)
    args = run_overrides(
        tiny_model_dir,
        data,
        tmp_path / "two",
        *GAME,
        *extra,
        "optim.batch_size=2",
        "distributed.strategy=fsdp",
    )
    done = _torchrun(args)
    assert "parameters per process" in done.stdout
    _assert_close(_weights(tmp_path / "two"), _weights(tmp_path / "one"), atol=1e-5)
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    trained = _weights(tmp_path / "two")
    assert any(not torch.equal(trained[k], base[k]) for k in base if k in trained)  # it did train
