"""What the speed benchmarks share: one preference-optimization step, and who else used the CPU meanwhile."""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path


def cpu_busy() -> tuple[float, float]:
    """(clock ticks the whole machine was busy, ticks this process used) so far, from /proc."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    mine = [float(x) for x in Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[11:13]]
    return busy, sum(mine)


def machine() -> str:
    """The machine in one line: CPU, cores, memory, C library (its malloc decides how much freed memory stays in the
    RSS), Python and torch with its thread count."""
    import torch

    kib = int(Path("/proc/meminfo").read_text().split()[1])  # MemTotal
    libc = " ".join(platform.libc_ver()) or "unknown libc"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {kib / 2**20:.0f} GiB, {libc}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


MAX_LENGTH, MAX_PROMPT = 256, 128  # the quickstart's data sizes


def quickstart_batches(n: int) -> tuple[list[list], int]:
    """The first `n` batches of 4 hh-rlhf harmless-base training pairs (from the package) at the quickstart's sizes,
    tokenized for the embedded model, and its pad token id."""
    from iopo.config import DataConfig, ModelConfig
    from iopo.data import load_training_data
    from iopo.io.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    train, _, _ = load_training_data(
        DataConfig(max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT), tokenizer, None
    )
    return [train[4 * k : 4 * k + 4] for k in range(n)], tokenizer.pad_token_id


def matmul_gflops(dtype, shape: tuple[int, int, int] = (1024, 1024, 1024), repeat: int = 20) -> float:
    """This machine's rate for one (m, k) x (k, n) matmul in `dtype`, GFLOP/s: the best of 3 timings of `repeat`
    products, after 3 warm-up products."""
    import torch

    m, k, n = shape
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(3):
        tick = time.perf_counter()
        for _ in range(repeat):
            a @ b
        best = min(best, time.perf_counter() - tick)
    return 2 * m * k * n * repeat / best / 1e9


def model_shape(model) -> dict:
    """What the useful FLOPs of a Llama-like causal LM scale with: parameters outside the embedding and the LM head
    (`body`), hidden size, layers, vocabulary."""
    config = model.config
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    body = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    return {
        "body_parameters": body,
        "hidden": config.hidden_size,
        "layers": config.num_hidden_layers,
        "vocabulary": config.vocab_size,
    }


def useful_flops(shape: dict, pairs: list[tuple[int, int, int]]) -> float:
    """The FLOPs one preference step needs at the least, for (prompt, chosen, rejected) token counts per pair: the
    prompt once, no padding, the LM head on completion tokens only, causal attention over the pairs it really
    attends. One forward costs 2 x body parameters per token, 2 x hidden x vocabulary per completion token and 4 x
    hidden per attended (query, key) pair and layer; a step is the agent's forward and backward (3 forwards) and
    the reference's or the other player's forward: 4 forwards. Embedding lookups, norms and the optimizer are left
    out (their FLOPs are small, not matmuls)."""
    h, v, layers = shape["hidden"], shape["vocabulary"], shape["layers"]
    forward = 0.0
    for p, c, r in pairs:
        attended = p * (p + 1) / 2 + (c + r) * p + c * (c + 1) / 2 + r * (r + 1) / 2
        forward += (
            2 * shape["body_parameters"] * (p + c + r) + 2 * h * v * (c + r) + 4 * h * layers * attended
        )
    return 4 * forward


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
    does it: env forward without autograd in eval mode, agent forward and backward of the mean of the loss's
    per-pair values (the trainer's `reduce="pairs"`), update."""
    import torch

    from iopo.core.logprobs import sequence_logps

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
    loss.mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
