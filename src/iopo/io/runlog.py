"""What a run leaves as it goes: metrics.jsonl records (and the trackers' scalars), progress bars, and the phase
marks of the memory trace (IOPO_MEMORY_TRACE). Main-process switches are the caller's (`is_main`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

# A file path: with it set, every phase mark of the run is appended to that file as one JSON line.
MEMORY_TRACE = "IOPO_MEMORY_TRACE"


def mark_phase(phase: str) -> None:
    """With IOPO_MEMORY_TRACE=<file> set, append {"t", "pid", "phase", "rss_gb", "hwm_gb"} to that file: the
    phase starting now, with this process's resident set and its high-water mark so far (benchmarks/
    memory_timeline.py lines its RSS samples up with these). Without the variable: one dictionary lookup."""
    path = os.environ.get(MEMORY_TRACE)
    if not path:
        return
    record = {"t": time.time(), "pid": os.getpid(), "phase": phase}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            record[f"{key[2:].lower()}_gb"] = int(value.split()[0]) * 1024 / 1e9  # the kernel counts in KiB
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def write_record(record: dict, path: Path | None, writer, is_main: bool = True) -> None:
    """Append one record to metrics.jsonl and its numbers to the trackers (train/<key>, eval/* as they are)."""
    if not is_main or path is None:
        return
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        values = {
            key if key.startswith("eval/") else f"train/{key}": float(value)
            for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"
        }
        if "agent" in record:
            values["train/agent_is_adversary"] = float(record["agent"] == "adversary")
        writer.log(values, record["step"])


class Trackers:
    """Where a run's numbers go besides metrics.jsonl: TensorBoard (run_dir/tensorboard), and accelerate's Weights &
    Biases and MLflow trackers, all with the same metric names (`train/<key>`, `eval/<key>`). W&B writes under
    run_dir/wandb and follows its own environment (WANDB_MODE=offline works without the network); MLflow logs to
    MLFLOW_TRACKING_URI (a local `file:` store works offline) in the experiment "iopo", one run per run folder."""

    def __init__(self, names: list[str], run_dir: Path, config: dict):
        self.tensorboard = None
        self.others = []
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if "wandb" in names:
            from accelerate.tracking import WandBTracker

            (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
            self.others.append(WandBTracker("iopo", name=run_dir.name, dir=str(run_dir), config=config))
        if "mlflow" in names:
            from accelerate.tracking import MLflowTracker

            self.others.append(MLflowTracker(experiment_name="iopo", run_name=run_dir.name))
        for tracker in self.others:
            if hasattr(tracker, "start"):  # recent accelerate starts a tracker explicitly
                tracker.start()
        if "mlflow" in names:  # W&B took the config at its start; MLflow's parameters are flat
            self.others[-1].store_init_configuration(_flat(config))

    def log(self, values: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        for tracker in self.others:
            tracker.log(values, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        for tracker in self.others:
            tracker.finish()


def _flat(config: dict, prefix: str = "") -> dict:
    """A nested config as "section.key" -> value (MLflow's parameters are flat)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def open_trackers(cfg, run_dir: Path, is_main: bool = True) -> Trackers | None:
    """The run's trackers (cfg.report_to; TensorBoard unless cfg.tensorboard is false), on the main process only;
    None when there are none."""
    names = [name for name in cfg.report_to if name != "tensorboard" or cfg.tensorboard]
    if not (names and is_main):
        return None
    return Trackers(names, Path(run_dir), cfg.model_dump(mode="json"))


def progress_bar(enabled: bool, total: int, done: int, desc: str, unit: str = "step", is_main: bool = True):
    """A tqdm bar (main process only), or None."""
    if not (enabled and is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=desc, unit=unit, dynamic_ncols=True)
