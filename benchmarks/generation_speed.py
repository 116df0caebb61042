"""Where generation time goes on this CPU: HF `generate` on the embedded SmolLM2-135M-Instruct (16 held-out hh-rlhf
prompts, greedy, a fixed number of new tokens) with the default dynamic KV cache and with a static one (tokens/s,
and whether the tokens are the same), and a float32 vs bf16 linear of the model's MLP size at the row counts of a
decoding step (GFLOP/s): is decoding bound by compute or by memory here?

Then one decoding step (one new token for every row, KV cache of 128-token prompts) at 16, 32 and 64 rows, float32
and bf16 (ms): a step costs far less than twice as much at twice the rows, so rows are cheap and the fuller batch
wins.

Then the product's own path (iopo.eval.generate, what `iopo eval` and the online rounds run) on 32 held-out prompts,
each way of WAYS: transformers' generate in float32 at batch 16 (where issue 25 started), then bf16
(generation.dtype), the lean loop (iopo.eval.sampling) and the batch sizes the configs ship; tokens/s counts the
answers' tokens, and the lean loop's answers are compared with generate's at the same batch and precision.

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


# The product path's ways, each a (loop, generation settings) pair: transformers' generate in float32 at batch 16
# (where the issue started), the same loop in bf16 (generation.dtype), the lean loop (iopo.eval.sampling) at the same
# batch and precision (same answers?), and the lean loop at the settings the configs now ship.
WAYS = {
    "eval": (
        {"temperature": 0.8, "max_new_tokens": 96, "n": 1},
        [
            ("generate", {"batch_size": 16, "dtype": "model"}),
            ("generate", {"batch_size": 16, "dtype": "bfloat16"}),
            ("lean", {"batch_size": 16, "dtype": "bfloat16"}),
            ("lean", {"batch_size": 32, "dtype": "bfloat16"}),  # configs/eval.yaml
        ],
    ),
    "online round": (
        {"temperature": 0.8, "max_new_tokens": 96, "n": 2},
        [
            ("generate", {"batch_size": 16, "dtype": "model"}),
            ("lean", {"batch_size": 16, "dtype": "model"}),
            ("lean", {"batch_size": 16, "dtype": "bfloat16"}),
            ("lean", {"batch_size": 32, "dtype": "bfloat16"}),  # configs/online.yaml
        ],
    ),
    "greedy": (
        {"temperature": 0.0, "max_new_tokens": 64, "n": 1},
        [("generate", {"batch_size": 16, "dtype": "model"}), ("lean", {"batch_size": 16, "dtype": "model"})],
    ),
}


def decode_step_ms(model, tokenizer, prompts: list[list[int]], dtype, steps: int = 24) -> float:
    """Milliseconds of one greedy decoding step for len(prompts) rows (left-padded prompts in the KV cache)."""
    import copy

    import torch

    from iopo.data.collate import pad_sequences

    lm = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    ids, mask = pad_sequences(prompts, tokenizer.pad_token_id, "left")
    with torch.inference_mode():
        out = lm(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        tick = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = lm(input_ids=token, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    return round((time.perf_counter() - tick) / steps * 1000, 1)


def product_path(model, tokenizer) -> dict:
    """iopo's generate_answers (what `iopo eval` and the online rounds run) each way of WAYS on 32 held-out prompts:
    tokens/s (the answers' tokens over the wall time), speed-up over the first way, and how many answers equal those
    of transformers' generate at the same batch size and precision (the same seeds)."""
    import tempfile

    import iopo.eval.sampling as sampling
    from iopo.config import DataConfig, GenerationConfig
    from iopo.data.loading import split_prompts
    from iopo.eval.generate import generate_answers
    from iopo.io.models import model_fingerprint

    prompts = split_prompts(DataConfig(max_length=256, max_prompt_length=128), "test", 32)
    loaded = (model, tokenizer, model_fingerprint(model), "embedded")
    lean_obstacle = sampling.lean_obstacle
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (common, ways) in WAYS.items():
            rows, answers = [], {}
            for loop, fields in ways:
                sampling.lean_obstacle = (
                    lean_obstacle if loop == "lean" else (lambda m: "benchmark: generate")
                )
                gen = GenerationConfig(**common, **fields)
                label = f"{loop}, {fields['dtype'].replace('model', 'float32')}, batch {fields['batch_size']}"
                tick = time.perf_counter()
                records, _ = generate_answers(
                    None,
                    prompts,
                    gen,
                    Path(tmp) / f"{name}-{len(rows)}.jsonl",
                    max_prompt_length=128,
                    loaded=loaded,
                    progress=False,
                )
                seconds = time.perf_counter() - tick
                tokens = sum(r["completion_tokens"] for r in records)
                mine = [r["answer"] for r in records]
                answers[(loop, fields["batch_size"], fields["dtype"])] = mine
                twin = answers.get(("generate", fields["batch_size"], fields["dtype"]))
                row = {
                    "way": label,
                    "seconds": round(seconds, 1),
                    "tokens": tokens,
                    "tokens_per_s": round(tokens / seconds, 1),
                }
                if loop == "lean" and twin is not None:
                    same = sum(a == b for a, b in zip(twin, mine, strict=True))
                    row["same_answers_as_generate"] = f"{same}/{len(twin)}"
                rows.append(row)
                print(f"{name}: {row}", flush=True)
            for row in rows:
                row["speedup"] = round(row["tokens_per_s"] / rows[0]["tokens_per_s"], 2)
            out[name] = {"settings": {**common, "prompts": len(prompts)}, "ways": rows}
    sampling.lean_obstacle = lean_obstacle
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
    many = split_prompts(DataConfig(max_length=256, max_prompt_length=128), "test", 64)

    def prompts_of(rows: int) -> list[list[int]]:
        return [
            tokenizer(render_prompt(p["prompt"], tokenizer), add_special_tokens=False)["input_ids"][-128:]
            for p in many[:rows]
        ]

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
    steps = {
        str(rows): {
            name: decode_step_ms(model, tokenizer, prompts_of(rows), getattr(torch, name))
            for name in ("float32", "bfloat16")
        }
        for rows in (16, 32, 64)
    }
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
        "decode_step_ms": steps,
        "product_path": product,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
