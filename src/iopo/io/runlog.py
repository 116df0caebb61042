"""What a run leaves as it goes: metrics.jsonl records (and TensorBoard scalars), progress bars, and the phase
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
    """Append one record to metrics.jsonl and its numbers to TensorBoard (train/<key>, eval/* as they are)."""
    if not is_main or path is None:
        return
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                writer.add_scalar(key if key.startswith("eval/") else f"train/{key}", value, record["step"])
        if "agent" in record:
            writer.add_scalar(
                "train/agent_is_adversary", float(record["agent"] == "adversary"), record["step"]
            )


def tensorboard_writer(enabled: bool, run_dir: Path, is_main: bool = True):
    """A TensorBoard SummaryWriter into run_dir/tensorboard (main process only), or None."""
    if not (enabled and is_main):
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def progress_bar(enabled: bool, total: int, done: int, desc: str, unit: str = "step", is_main: bool = True):
    """A tqdm bar (main process only), or None."""
    if not (enabled and is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=desc, unit=unit, dynamic_ncols=True)
