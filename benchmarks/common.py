"""What the speed benchmarks share: one preference-optimization step, and who else used the CPU meanwhile."""

from __future__ import annotations

import os
import time
from pathlib import Path


def cpu_busy() -> tuple[float, float]:
    """(clock ticks the whole machine was busy, ticks this process used) so far, from /proc."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    mine = [float(x) for x in Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[11:13]]
    return busy, sum(mine)


def timed(run) -> tuple[float, float]:
    """(seconds `run()` took, the share of all CPUs other processes used meanwhile)."""
    busy0, mine0 = cpu_busy()
    tick = time.perf_counter()
    run()
    seconds = time.perf_counter() - tick
    busy1, mine1 = cpu_busy()
    others = max(0.0, (busy1 - busy0) - (mine1 - mine0)) / os.sysconf("SC_CLK_TCK")
    return seconds, others / (seconds * (os.cpu_count() or 1))


def preference_step(agent, env, batch: dict, loss_fn, optimizer, bf16: bool) -> None:
    """One optimizer step of `agent` against the frozen `env` (a reference or the other player), as the trainer
    does it: env forward without autograd in eval mode, agent forward and backward, update."""
    import torch

    from iopo.logprobs import sequence_logps

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        was = env.training
        env.eval()
        with torch.no_grad():
            ref = sequence_logps(env, batch)
        env.train(was)
        out = sequence_logps(agent, batch)
        loss, _ = loss_fn(
            out["chosen_logps"],
            out["rejected_logps"],
            ref["chosen_logps"],
            ref["rejected_logps"],
            out["chosen_lengths"],
            out["rejected_lengths"],
            beta=0.1,
        )
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
