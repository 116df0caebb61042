"""The CUDA path in one short go, for the moment a GPU is at hand: IOPO and DPO optimizer steps in bf16 for a
SmolLM2-135M-shaped model and a ~0.5B Llama built from a config (random weights: speed and memory do not depend on
the values; nothing from the hub, no dataset, no tokenizer), their seconds per step, tokens per second, model FLOP
utilisation and peak memory, then a 1-process FSDP2 smoke run (DPO, two steps, distributed.strategy=fsdp).

Run (one command, < 8 minutes on an H100):
    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json
On a machine without CUDA it runs the same plumbing on the CPU with small shapes (--device cpu --small), which is
how the test suite checks it. Needs only torch and the package (transformers, accelerate).

Each step is a real `iopo.engine.fit.train_step` of the method's METHODS row through a session (players, optimizer,
batching, autocast), on synthetic pairs of fixed lengths (prompt P, chosen C, rejected R tokens). Useful FLOPs per step
are benchmarks/common.useful_flops (the prompt counted once, 4 forwards: the agent's forward and backward and the
env's forward); MFU divides them by the step time and the GPU's dense bf16 peak (H100/H200: 989 TFLOP/s; others:
not given, the achieved TFLOP/s are reported).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import model_shape, useful_flops  # noqa: E402

SHAPES = {  # Llama configs: the embedded model's shape, and a ~0.5B one
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
    "llama-0.5b": {
        "hidden_size": 1280,
        "intermediate_size": 3584,
        "num_hidden_layers": 24,
        "num_attention_heads": 20,
        "num_key_value_heads": 4,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
}
SMALL = {  # --small: the same plumbing in seconds on a CPU
    "tiny-a": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True},
    "tiny-b": {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 3, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True},
}  # fmt: skip
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class _Tokenizer:
    """What a session asks of a tokenizer when pairs come tokenized: the pad id."""

    pad_token_id = 0


def save_model(folder: Path, shape: dict) -> Path:
    """A random Llama of `shape`, with a small byte-level BPE tokenizer (pad 0, bos 1, eos 2) for `iopo train`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        **shape, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["good answers and bad answers to questions 0123456789"] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return folder


def synthetic_pairs(n: int, lengths: tuple[int, int, int], vocab: int, seed: int = 0):
    import torch

    from iopo.data.tokenize import TokenizedPair

    g = torch.Generator().manual_seed(seed)
    p, c, r = lengths

    def ids(k):
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    return [TokenizedPair(ids(p), ids(c), ids(r), f"synthetic:{i}") for i in range(n)]


def time_method(model_dir: Path, method: str, args, work: Path) -> dict:
    """`args.steps` optimizer steps of `method` on `model_dir`; the first `args.warmup` are not timed."""
    import torch

    from iopo.config import load_config
    from iopo.core.logprobs import language_model
    from iopo.core.methods import METHODS
    from iopo.engine.batching import choose_batching
    from iopo.engine.fit import fit
    from iopo.engine.session import build_schedule, open_accelerator, open_session

    cuda = args.device == "cuda"
    overrides = [
        f"method={method}",
        f"model={model_dir}",
        f"output_dir={work / method}",
        f"mixed_precision={'bf16' if cuda else 'no'}",
        f"optim.batch_size={args.batch}",
        f"optim.max_steps={args.steps}",
        "iopo.n_mu=1",
        "iopo.n_nu=1",
        "optim.warmup_ratio=0",
        "progress_bar=false",
        "tensorboard=false",
    ]
    cfg = load_config(None, overrides)
    accelerator = open_accelerator(cfg)
    shape_cfg = json.loads((model_dir / "config.json").read_text())
    pairs = synthetic_pairs(args.batch * (args.steps + 1), args.lengths, shape_cfg["vocab_size"])
    schedule = build_schedule(cfg, len(pairs), args.batch)[: args.steps]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    session = open_session(cfg, accelerator, _Tokenizer(), schedule)
    choose_batching(session, pairs[: args.batch])
    marks: list[float] = []

    def on_step(_session) -> None:
        if cuda:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    start = time.perf_counter()
    fit(session, pairs, schedule, on_step)
    times = [b - a for a, b in zip([start, *marks[:-1]], marks, strict=True)][args.warmup :]
    model = language_model(session.policy.module)
    shape = model_shape(model)
    flops = useful_flops(shape, [args.lengths] * args.batch)
    median = statistics.median(times)
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    row = {
        "method": method,
        "parameters": sum(p.numel() for p in model.parameters()),
        "players": list(METHODS[method].players),
        "steps_timed": len(times),
        "median_s_per_step": round(median, 4),
        "tokens_per_s": round(args.batch * sum(args.lengths) / median, 1),
        "achieved_tflops": float(f"{flops / median / 1e12:.4g}"),  # 4 digits: a tiny CPU model's is < 0.001
        "mfu": round(flops / median / peak, 4) if peak else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "batching": "shared" if isinstance(session.collate, functools.partial) else "plain",
    }
    del session
    if cuda:
        torch.cuda.empty_cache()
    return row


def fsdp_smoke(model_dir: Path, args, work: Path) -> dict:
    """Two DPO steps under distributed.strategy=fsdp in one process (torchrun), through `iopo train`."""
    data = work / "pairs.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"q {i}", "chosen": f"good {i}", "rejected": f"bad {i} no"}) + "\n")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        "-m", "iopo", "train", "method=dpo", f"model={model_dir}", f"data={data}", f"output_dir={work / 'fsdp'}",
        "distributed.strategy=fsdp", f"mixed_precision={'bf16' if args.device == 'cuda' else 'no'}",
        "optim.max_steps=2", "optim.batch_size=2", "data.test_size=4", "data.max_length=32",
        "data.max_prompt_length=16", "progress_bar=false", "tensorboard=false", "export=false",
    ]  # fmt: skip
    tick = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.fsdp_timeout)
    ok = done.returncode == 0 and (work / "fsdp" / "eval.json").is_file()
    return {
        "ok": ok,
        "seconds": round(time.perf_counter() - tick, 1),
        "note": "one process: iopo shards only over more than one (distributed.md), so this checks the fsdp "
        "setting's path through training, its DCP checkpoint and the evaluation, not the sharding itself",
        "tail": "" if ok else (done.stderr or done.stdout)[-1500:],
    }


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--small", action="store_true", help="small shapes (the CPU plumbing check)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per method and model")
    parser.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument(
        "--lengths", type=int, nargs=3, default=[256, 128, 128], help="prompt chosen rejected"
    )
    parser.add_argument("--fsdp-timeout", type=int, default=240)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu_check.json"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --device cpu --small to check the plumbing")
    shapes = SMALL if args.small else SHAPES
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "bf16_supported": bool(args.device == "cuda" and torch.cuda.is_bf16_supported()),
        "settings": {
            "batch": args.batch,
            "lengths": args.lengths,
            "steps": args.steps,
            "warmup": args.warmup,
        },
        "models": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, shape in shapes.items():
            model_dir = save_model(work / name, shape)
            rows = []
            for method in ("dpo", "iopo"):
                rows.append(time_method(model_dir, method, args, work / f"{name}-runs"))
                print(json.dumps({"model": name, **rows[-1]}), flush=True)
            result["models"][name] = {"parameters": rows[0]["parameters"], "rows": rows}
            out.write_text(json.dumps(result, indent=2) + "\n")  # each finished model is kept
        first = next(iter(shapes))
        result["fsdp_smoke"] = fsdp_smoke(work / first, args, work)
        print(json.dumps({"fsdp_smoke": result["fsdp_smoke"]["ok"]}), flush=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
