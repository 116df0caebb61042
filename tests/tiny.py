"""Tiny random causal LMs and a real (trained-on-the-spot) byte-level BPE tokenizer, all offline."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, then knead and bake.",
    "The quick brown fox jumps over the lazy dog. I'm sorry, I can't help with that request.",
    "What is the capital of France? Paris is the capital of France. Thank you for asking!",
    "Please write a poem about the sea. Waves roll in and out, the gulls cry overhead.",
    "0123456789 +-*/=()[]{}<>.,;:!?'\"\n\t hello world user assistant system",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def save_tiny(path: Path, seed: int = 0) -> Path:
    tok = build_tokenizer()
    model = build_model(len(tok), seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


_WORDS = "bread water salt yeast fox dog Paris France poem sea waves gulls capital quick brown lazy".split()


def write_pairs(path: Path, n: int = 24, seed: int = 0) -> Path:
    """n standard-format pairs (prompt/chosen/rejected strings), every prompt distinct, as JSONL."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = rng.sample(_WORDS, 6)
            row = {
                "prompt": f"Question {i}: tell me about {words[0]} and {words[1]}?",
                "chosen": f"Thank you for asking! The {words[2]} and the {words[3]}." * (1 + i % 3),
                "rejected": f"I'm sorry, {words[4]} {words[5]}.",
            }
            f.write(json.dumps(row) + "\n")
    return path


def run_overrides(model_dir, data, output_dir, *extra: str) -> list[str]:
    """The config overrides of a quick tiny-model run (later entries win), shared by the pipeline tests."""
    return [
        f"model={model_dir}",
        f"data={data}",
        f"output_dir={output_dir}",
        "data.max_length=64",
        "data.max_prompt_length=32",
        "data.test_size=4",
        "optim.batch_size=4",
        "optim.learning_rate=1e-2",
        "optim.warmup_ratio=0",
        "loss.beta=0.5",
        "progress_bar=false",
        "tensorboard=false",
        "eval_batch_size=3",
        *extra,
    ]


def train_records(run_dir) -> list[dict]:
    """The per-optimizer-step records of a run's metrics.jsonl (eval/* records left out)."""
    import json

    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "agent" in r]


def eval_records(run_dir) -> list[dict]:
    """The eval/* records of a run's metrics.jsonl (eval_steps and the end of training)."""
    import json

    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "eval/pairwise_accuracy" in r]


def kill_9_when(args: list[str], ready, timeout: float = 240.0) -> int:
    """Run `python -m iopo *args` and SIGKILL it as soon as `ready()` is true (polled every millisecond).
    Returns the return code: -SIGKILL when the kill landed, anything else when the run ended first."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "iopo", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and not ready():
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def make_cfg(tmp_path, model_dir, *extra, method="iopo"):
    """The TrainConfig of a quick tiny-model run in tmp_path/run, on 24 pairs written there once."""
    from iopo.config import load_config

    data = tmp_path / "pairs.jsonl"
    tmp_path.mkdir(parents=True, exist_ok=True)
    if not data.exists():
        write_pairs(data, n=24)
    return load_config(None, run_overrides(model_dir, data, tmp_path / "run", f"method={method}", *extra))


def run_iopo(*args, cwd=None):
    """`python -m iopo *args` in a subprocess with this interpreter's import path; its CompletedProcess (text)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-m", "iopo", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def train_rm_args(model_dir, data, output_dir, *extra: str) -> list[str]:
    """`iopo train-rm` arguments of a quick tiny reward model (4 steps at lr 3e-3, 6 test pairs; later entries win),
    shared by the tests that need a trained reward model."""
    return [
        "train-rm",
        f"model={model_dir}",
        f"data={data}",
        "data.max_length=64",
        "data.max_prompt_length=32",
        "data.test_size=6",
        "optim.max_steps=4",
        "optim.learning_rate=3e-3",
        f"output_dir={output_dir}",
        "progress_bar=false",
        "tensorboard=false",
        *extra,
    ]
