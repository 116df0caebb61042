"""Where generation time goes on this CPU: HF `generate` on the embedded SmolLM2-135M-Instruct (16 held-out hh-rlhf
prompts, greedy, a fixed number of new tokens) with the default dynamic KV cache and with a static one (tokens/s,
and whether the tokens are the same), and a float32 vs bf16 linear of the model's MLP size at the row counts of a
decoding step (GFLOP/s): is decoding bound by compute or by memory here?

Then the product's own path (iopo.eval.generate, what `iopo eval` and the online rounds run) on the same prompts and
settings each way, float32 (generation.dtype=model, today's) against generation.dtype=bfloat16: the evaluation's
(configs/eval.yaml: 32 held-out prompts, temperature 0.8, 96 new tokens, batch 16) and an online round's (2 answers
a prompt); tokens/s counts the answers' tokens, each way run twice in alternating order (the better of the two).

Run: .venv/bin/python benchmarks/generation_speed.py [--new-tokens 64] [--out benchmarks/results/generation_speed.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine  # noqa: E402


def generate_rate(model, ids, mask, pad: int, new_tokens: int, **kwargs) -> tuple[float, object]:
    import torch

    tick = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad,
            **kwargs,
        )
    seconds = time.perf_counter() - tick
    new = out[:, ids.shape[1] :]
    return new.numel() / seconds, new


def linear_gflops(rows: int, dtype, repeat: int = 200) -> float:
    import torch

    weight, x = torch.randn(1536, 576).to(dtype), torch.randn(rows, 576).to(dtype)
    for _ in range(10):
        torch.nn.functional.linear(x, weight)
    tick = time.perf_counter()
    for _ in range(repeat):
        torch.nn.functional.linear(x, weight)
    return 2 * rows * 576 * 1536 * repeat / (time.perf_counter() - tick) / 1e9


def product_path(model, tokenizer) -> dict:
    """iopo's generate_answers on the evaluation's and an online round's settings, float32 vs bf16 (tokens/s)."""
    import tempfile

    from iopo.config import DataConfig, GenerationConfig
    from iopo.data.loading import split_prompts
    from iopo.eval.generate import generate_answers
    from iopo.io.models import model_fingerprint

    prompts = split_prompts(DataConfig(max_length=256, max_prompt_length=128), "test", 32)
    loaded = (model, tokenizer, model_fingerprint(model), "embedded")
    settings = {
        "eval": {"temperature": 0.8, "max_new_tokens": 96, "n": 1, "batch_size": 16},
        "online round": {"temperature": 0.8, "max_new_tokens": 96, "n": 2, "batch_size": 16},
    }
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fields in settings.items():
            best: dict[str, float] = {}
            for repeat in range(2):
                ways = ("model", "bfloat16") if repeat == 0 else ("bfloat16", "model")
                for dtype in ways:
                    gen = GenerationConfig(**fields, dtype=dtype)
                    tick = time.perf_counter()
                    records, _ = generate_answers(
                        None,
                        prompts,
                        gen,
                        Path(tmp) / f"{name}-{dtype}-{repeat}.jsonl",
                        max_prompt_length=128,
                        loaded=loaded,
                        progress=False,
                    )
                    rate = sum(r["completion_tokens"] for r in records) / (time.perf_counter() - tick)
                    best[dtype] = max(best.get(dtype, 0.0), rate)
            out[name] = {
                "settings": {**fields, "prompts": len(prompts)},
                "tokens_per_s": {"float32": round(best["model"], 1), "bfloat16": round(best["bfloat16"], 1)},
                "bf16_speedup": round(best["bfloat16"] / best["model"], 2),
            }
    return out


def main() -> None:
    import torch

    from iopo.config import DataConfig
    from iopo.data.collate import pad_sequences
    from iopo.data.loading import split_prompts
    from iopo.data.tokenize import render_prompt
    from iopo.io.models import load_inference_model, resolve_model

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/generation_speed.json"))
    args = parser.parse_args()
    model, tokenizer = load_inference_model(resolve_model("embedded"), "float32")
    prompts = split_prompts(DataConfig(max_length=256, max_prompt_length=128), "test", 16)
    encoded = [
        tokenizer(render_prompt(p["prompt"], tokenizer), add_special_tokens=False)["input_ids"][-128:]
        for p in prompts
    ]
    ids, mask = pad_sequences(encoded, tokenizer.pad_token_id, "left")
    pad = tokenizer.pad_token_id
    dynamic, tokens = generate_rate(model, ids, mask, pad, args.new_tokens)
    static, static_tokens = generate_rate(
        model, ids, mask, pad, args.new_tokens, cache_implementation="static"
    )
    product = product_path(model, tokenizer)
    result = {
        "machine": machine(),
        "prompts": len(prompts),
        "prompt_tokens_mean": round(sum(map(len, encoded)) / len(encoded), 1),
        "new_tokens": args.new_tokens,
        "greedy_tokens_per_s": {"dynamic_cache": round(dynamic, 1), "static_cache": round(static, 1)},
        "static_cache_same_tokens": bool(torch.equal(tokens, static_tokens)),
        "linear_576x1536_gflops": {
            str(rows): {
                "float32": round(linear_gflops(rows, torch.float32), 1),
                "bfloat16": round(linear_gflops(rows, torch.bfloat16), 1),
            }
            for rows in (16, 32, 64, 128)
        },
        "product_path": product,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
