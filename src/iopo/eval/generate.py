"""Answers to prompts, from a Hugging Face model in process (batched, left-padded, KV cache, chat template) or from
any OpenAI-compatible server (vLLM, llama.cpp), written as JSON Lines as they come.

One record per answer: prompt id, prompt, answer, finish reason ("stop" | "length"), token counts, the model's
label and fingerprint, and the settings. A record's key is (fingerprint, settings, prompt id, sample), so an
interrupted run continues where it stopped and a repeated one generates nothing. The HF backend plans fixed batches
(prompts sorted by length) and seeds each batch by its index in the plan: a resumed run writes exactly the answers
the uninterrupted one would have.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from iopo.config import ConfigError, GenerationConfig
from iopo.io.log import get_logger
from iopo.io.store import text_key

log = get_logger(__name__)


def settings_of(gen: GenerationConfig, max_prompt_length: int) -> dict:
    """The settings that change the answers (and so belong to each answer's key)."""
    out = {
        "backend": gen.backend,
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "max_new_tokens": gen.max_new_tokens,
        "n": gen.n,
        "seed": gen.seed,
        "max_prompt_length": max_prompt_length,
    }
    if gen.backend == "hf":
        out["batch_size"] = gen.batch_size  # batch composition changes padding and the sampling stream
    if gen.dtype != "model":
        out["dtype"] = gen.dtype  # absent for the model's own precision: the keys of earlier answers stay
    return out


def in_precision(model, dtype: str):
    """The model to generate with: itself for dtype=model or when it is already in that precision, else a copy
    cast to it (the caller's model, trained or evaluated in its own precision, is untouched)."""
    import copy

    from iopo.io.models import DTYPES

    if dtype == "model" or next(model.parameters()).dtype == DTYPES[dtype]:
        return model
    return copy.deepcopy(model).to(DTYPES[dtype])


def record_key(fingerprint: str, settings: dict, prompt_id: str, sample: int) -> str:
    return text_key("generation", fingerprint, settings, prompt_id, sample)[:32]


def read_records(path: Path) -> dict[str, dict]:
    """The records already in a JSON Lines file, by key; a torn last line (a crash mid-write) is ignored."""
    out: dict[str, dict] = {}
    if not path.is_file():
        return out
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # only the last line of a crashed write can be torn; it is generated again
            if isinstance(record, dict) and "key" in record:
                out[record["key"]] = record
    return out


class JsonlSink:
    """Appends records and syncs each batch to disk, so a kill loses at most the batch being generated."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file() and path.stat().st_size:
            with path.open("rb+") as f:  # a torn last line from a crash: end it so appends start clean
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def __call__(self, records: list[dict]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


class _Progress:
    """A progress bar counting answers, with answers/s and generated tokens/s of this session."""

    def __init__(self, total: int, done: int, label: str, enabled: bool):
        self.started, self.answers, self.tokens = time.perf_counter(), 0, 0
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=done, desc=f"generate {label}", unit="answer", dynamic_ncols=True
            )

    def update(self, records: list[dict]) -> None:
        self.answers += len(records)
        self.tokens += sum(r["completion_tokens"] for r in records)
        if self.bar is not None:
            seconds = max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_postfix_str(
                f"{self.answers / seconds:.2f} answers/s, {self.tokens / seconds:.1f} tok/s"
            )
            self.bar.update(len(records))

    def close(self) -> dict:
        if self.bar is not None:
            self.bar.close()
        seconds = time.perf_counter() - self.started
        return {"answers": self.answers, "completion_tokens": self.tokens, "seconds": seconds}


def answer_record(
    entry: dict, sample: int, answer: str, finish: str, n_prompt: int, n_completion: int, meta: dict
):
    return {
        "key": record_key(meta["model_fingerprint"], meta["settings"], entry["prompt_id"], sample),
        "prompt_id": entry["prompt_id"],
        "sample": sample,
        "prompt": entry["prompt"],
        "answer": answer,
        "finish_reason": finish,
        "prompt_tokens": n_prompt,
        "completion_tokens": n_completion,
        "model": meta["model"],
        "model_fingerprint": meta["model_fingerprint"],
        "settings": meta["settings"],
        "created": time.time(),
    }


# ---------------------------------------------------------------- Hugging Face generate


def _stop_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list) else {configured}
    return sorted(i for i in ids if i is not None)


def _generate(model, input_ids, attention_mask, gen: GenerationConfig, device, pad: int, stop: list[int]):
    """New tokens (B*n, <= max_new_tokens) from transformers' own `generate`, row b*n + j sample j of prompt b."""
    import torch

    sampling = gen.temperature > 0
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=sampling,
            temperature=gen.temperature if sampling else None,
            top_p=gen.top_p if sampling else None,
            # plain temperature + top_p sampling, whatever the model's defaults
            top_k=0 if sampling else None,
            max_new_tokens=gen.max_new_tokens,
            num_return_sequences=gen.n,
            pad_token_id=pad,
            eos_token_id=stop,
            use_cache=True,
        )
    return out[:, input_ids.shape[1] :].cpu()


def generate_hf(
    model,
    tokenizer,
    prompts: list[dict],
    gen: GenerationConfig,
    *,
    meta: dict,
    done: set[str],
    sink: Callable[[list[dict]], None],
    max_prompt_length: int,
    progress: bool = True,
) -> dict:
    """Generate gen.n answers per prompt entry ({"prompt_id", "prompt"}) that `done` lacks; `sink` gets each batch.

    Prompts are rendered with the chat template (generation prompt on), cut from the left to max_prompt_length
    tokens as in training, sorted by length into fixed batches, left-padded, and sampled with the KV cache.
    """
    import torch

    from iopo.data.collate import pad_sequences
    from iopo.data.tokenize import render_prompt
    from iopo.eval.sampling import CacheUnsupported, lean_obstacle, sample_answers

    stop = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    encoded = []
    for entry in prompts:
        text = render_prompt(entry["prompt"], tokenizer)
        ids = tokenizer(text, add_special_tokens=isinstance(entry["prompt"], str))["input_ids"]
        encoded.append((entry, ids[-max_prompt_length:]))
    order = sorted(encoded, key=lambda item: (-len(item[1]), item[0]["prompt_id"]))
    batches = [order[i : i + gen.batch_size] for i in range(0, len(order), gen.batch_size)]

    def keys_of(batch):
        return [
            record_key(meta["model_fingerprint"], meta["settings"], e["prompt_id"], j)
            for e, _ in batch
            for j in range(gen.n)
        ]

    total = len(prompts) * gen.n
    progress_bar = _Progress(
        total, sum(k in done for b in batches for k in keys_of(b)), meta["model"], progress
    )
    device = next(model.parameters()).device
    generator, obstacle = None, None  # obstacle: why the lean loop does not run (then transformers' generate)
    said = False
    for index, batch in enumerate(batches):
        if all(k in done for k in keys_of(batch)):
            continue
        if generator is None:
            generator = in_precision(model, gen.dtype)  # only once there is something to generate
            obstacle = lean_obstacle(generator)
        input_ids, attention_mask = pad_sequences([ids for _, ids in batch], pad, "left")  # (B, T)
        new_tokens = None
        # Seeded by the batch's place in the plan, so a resumed run samples the same.
        torch.manual_seed(gen.seed + index)
        if obstacle is None:
            try:
                new_tokens = sample_answers(
                    generator,
                    input_ids.to(device),
                    attention_mask.to(device),
                    n=gen.n,
                    max_new_tokens=gen.max_new_tokens,
                    temperature=gen.temperature,
                    top_p=gen.top_p,
                    stop=stop,
                    pad=pad,
                ).cpu()  # (B*n, max_new_tokens), row b*n + j is sample j of prompt b
            except CacheUnsupported as why:
                obstacle = str(why)
                torch.manual_seed(gen.seed + index)  # nothing was drawn; the same stream for generate
        if new_tokens is None:
            if not said:
                log.info(f"generate {meta['model']}: transformers' generate, not the lean loop ({obstacle})")
                said = True
            new_tokens = _generate(generator, input_ids, attention_mask, gen, device, pad, stop)
        records = []
        for row in range(new_tokens.shape[0]):
            entry, ids = batch[row // gen.n]
            tokens = new_tokens[row].tolist()
            end = next((i for i, t in enumerate(tokens) if t in stop), None)
            finish = "stop" if end is not None else "length"
            kept = tokens[:end] if end is not None else tokens
            text = tokenizer.decode(kept, skip_special_tokens=True).strip()
            records.append(
                answer_record(entry, row % gen.n, text, finish, len(ids), len(kept) + (end is not None), meta)
            )
        records = [r for r in records if r["key"] not in done]
        sink(records)
        done.update(r["key"] for r in records)
        progress_bar.update(records)
    return progress_bar.close()


# ---------------------------------------------------------------- OpenAI-compatible servers


def generate_openai(
    prompts: list[dict],
    gen: GenerationConfig,
    *,
    meta: dict,
    done: set[str],
    sink: Callable[[list[dict]], None],
    progress: bool = True,
) -> dict:
    """The same records through /chat/completions (message prompts) or /completions (raw text), `concurrency`
    requests at a time; each answer is written as it arrives. Sample j of a prompt is asked with its own seed."""
    from iopo.io.openai_client import Endpoint, chat_text, usage_of

    if not gen.base_url:
        raise ConfigError("generation.backend=openai needs generation.base_url")
    endpoint = Endpoint(gen.base_url, gen.api_key_env, gen.timeout_s, gen.max_retries)
    jobs = []
    for entry in prompts:
        for j in range(gen.n):
            key = record_key(meta["model_fingerprint"], meta["settings"], entry["prompt_id"], j)
            if key not in done:
                jobs.append((entry, j))
    progress_bar = _Progress(len(prompts) * gen.n, len(prompts) * gen.n - len(jobs), meta["model"], progress)

    def ask(entry: dict, sample: int) -> dict:
        payload = {
            "temperature": gen.temperature,
            "top_p": gen.top_p,
            "max_tokens": gen.max_new_tokens,
            "seed": (gen.seed * 1_000_003 + int(entry["prompt_id"][:8], 16) + sample) % 2**31,
        }
        if gen.api_model:
            payload["model"] = gen.api_model
        if isinstance(entry["prompt"], str):
            reply = endpoint.post("completions", {**payload, "prompt": entry["prompt"]})
        else:
            reply = endpoint.post("chat/completions", {**payload, "messages": entry["prompt"]})
        text, finish = chat_text(reply.body)
        if text is None:
            from iopo.io.openai_client import ServerError

            raise ServerError(f"{gen.base_url}: a completion reply without text")
        n_prompt, n_completion = usage_of(reply.body)
        finish = "length" if finish == "length" else "stop"
        return answer_record(entry, sample, text.strip(), finish, n_prompt, n_completion, meta)

    with ThreadPoolExecutor(max_workers=gen.concurrency) as pool:
        futures = [pool.submit(ask, entry, j) for entry, j in jobs]
        try:
            for future in as_completed(futures):
                record = future.result()
                sink([record])
                done.add(record["key"])
                progress_bar.update([record])
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return progress_bar.close()


def openai_fingerprint(gen: GenerationConfig) -> str:
    return "openai:" + text_key(gen.base_url, gen.api_model)[:16]


# ---------------------------------------------------------------- `iopo generate`


def answers_file(folder: Path, label: str) -> Path:
    """Where an eval folder keeps a model's answers: generations/<label, made safe for a file name>.jsonl."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:100] or "model"
    return folder / "generations" / f"{safe}.jsonl"


def generate_answers(
    spec: str | None,
    prompts: list[dict],
    gen: GenerationConfig,
    output: Path,
    *,
    max_prompt_length: int,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    loaded=None,
    label: str | None = None,
    progress: bool = True,
    engine=None,
) -> tuple[list[dict], dict]:
    """Generate what `output` lacks and return (the records of these prompts, in prompt order, and the timing).

    `loaded` = (model, tokenizer, fingerprint, label) reuses a model the caller already holds (iopo eval, the online
    rounds). `engine` (the online rounds' iopo.eval.vllm_engine.VllmEngine, holding `loaded`'s weights) generates instead
    of HF `generate`; its answers are keyed apart.
    """
    settings = settings_of(gen, max_prompt_length)
    if engine is not None:
        settings["engine"] = "vllm"  # its answers never mix with the HF path's
    if gen.backend == "openai":
        meta = {"model": label or gen.api_model or "server", "model_fingerprint": openai_fingerprint(gen)}
    elif loaded is not None:
        model, tokenizer, fingerprint, name = loaded
        meta = {"model": label or name, "model_fingerprint": fingerprint}
    else:
        from iopo.io.models import load_inference_model, model_fingerprint, resolve_model

        source = resolve_model(spec)
        model, tokenizer = load_inference_model(source, dtype, trust_remote_code)
        meta = {"model": label or source.label, "model_fingerprint": model_fingerprint(model)}
    meta["settings"] = settings
    existing = read_records(output)
    done = set(existing)
    sink = JsonlSink(output)
    written: list[dict] = []

    def collect(records: list[dict]) -> None:
        sink(records)
        written.extend(records)

    if gen.backend == "openai":
        timing = generate_openai(prompts, gen, meta=meta, done=done, sink=collect, progress=progress)
    elif engine is not None:
        timing = engine.generate(
            tokenizer, prompts, gen, meta=meta, done=done, sink=collect, max_prompt_length=max_prompt_length
        )
    else:
        timing = generate_hf(
            model,
            tokenizer,
            prompts,
            gen,
            meta=meta,
            done=done,
            sink=collect,
            max_prompt_length=max_prompt_length,
            progress=progress,
        )
    by_key = {**existing, **{r["key"]: r for r in written}}
    records = []
    for entry in prompts:
        for j in range(gen.n):
            records.append(by_key[record_key(meta["model_fingerprint"], settings, entry["prompt_id"], j)])
    timing["reused"] = len(prompts) * gen.n - len(written)
    return records, timing
