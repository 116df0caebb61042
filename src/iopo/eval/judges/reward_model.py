"""A reward-model judge: any Hugging Face sequence-classification model with one output (an `iopo train-rm`
folder, Ziya-Reward, ...). Each answer gets a scalar reward; the pairwise verdict comes from the score gap and a
tie margin, applied by the caller (iopo.stats.score_gap_outcome), so changing the margin reuses stored scores."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from iopo.eval.judges.base import usage


class RewardModelJudge:
    def __init__(self, name: str, cfg, dtype: str = "float32", trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification

        from iopo.config import ConfigError, ModelConfig
        from iopo.io.models import DTYPES, first_line, load_tokenizer, model_fingerprint, resolve_model

        self.name, self.cfg, self.modes = name, cfg, ["score"]
        source = resolve_model(cfg.model)
        self.tokenizer = load_tokenizer(
            ModelConfig(name_or_path=source.tokenizer_path, trust_remote_code=trust_remote_code)
        )
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                source.path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"judge '{name}': cannot load '{cfg.model}' as a reward model: {first_line(e)}"
            ) from None
        if model.config.num_labels != 1:
            raise ConfigError(
                f"judge '{name}': '{cfg.model}' has {model.config.num_labels} outputs; a reward model has 1"
            )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.eval().requires_grad_(False)
        self.judge_id = "reward_model:" + model_fingerprint(self.model)

    def pairwise(self, items):
        raise NotImplementedError("a reward model scores answers; its verdicts come from the score gap")

    @torch.inference_mode()
    def score(self, items) -> Iterator[tuple[int, dict, dict]]:
        from iopo.data.collate import pad_sequences
        from iopo.data.tokenize import answer_ids

        pad = self.tokenizer.pad_token_id
        encoded = [answer_ids(p, a, self.tokenizer, self.cfg.max_length) for p, a in items]
        order = sorted(range(len(items)), key=lambda i: -len(encoded[i]))
        for start in range(0, len(order), self.cfg.batch_size):
            chunk = order[start : start + self.cfg.batch_size]
            input_ids, attention_mask = pad_sequences([encoded[i] for i in chunk], pad, "right")  # (B, T)
            tick = time.perf_counter()
            rewards = (
                self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
            )  # (B,)
            seconds = (time.perf_counter() - tick) / len(chunk)
            for row, i in enumerate(chunk):
                value = float(rewards[row])
                valid = value == value and abs(value) != float("inf")
                result = {"score": value if valid else None, "valid": valid}
                yield i, result, usage(1, len(encoded[i]), 0, seconds)

    def close(self) -> None:
        self.model = None
