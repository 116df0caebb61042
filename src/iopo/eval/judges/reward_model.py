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
        self.shares: bool | None = None  # prefix-shared scoring, once checked against the plain forward

    def pairwise(self, items):
        raise NotImplementedError("a reward model scores answers; its verdicts come from the score gap")

    @torch.inference_mode()
    def score(self, items) -> Iterator[tuple[int, dict, dict]]:
        """Each answer's reward. Two answers to the same prompt that fit in max_length uncut go through the model as
        one prefix-shared sequence (the prompt computed once, as train-rm's batches) when the model allows it and
        its first such batch gives the plain forward's rewards; the rest as plain right-padded rows."""
        from iopo.core.logprobs import reward_sharing_obstacle, sequence_rewards, shared_tolerance
        from iopo.data.collate import collate_shared, layouts_gap, pad_sequences
        from iopo.data.tokenize import TokenizedPair, answer_parts

        pad, limit = self.tokenizer.pad_token_id, self.cfg.max_length
        parts = [answer_parts(p, a, self.tokenizer) for p, a in items]
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for i, (prompt_ids, completion) in enumerate(parts):
            if len(prompt_ids) + len(completion) <= limit:
                by_prompt.setdefault(tuple(prompt_ids), []).append(i)
        twos = [(m[k], m[k + 1]) for m in by_prompt.values() for k in range(0, len(m) - 1, 2)]
        twos.sort(key=lambda t: -(len(parts[t[0]][0]) + len(parts[t[0]][1]) + len(parts[t[1]][1])))
        per_batch = max(1, self.cfg.batch_size // 2)
        if twos and self.shares is None:  # decided once, on the first batch that could share
            self.shares = reward_sharing_obstacle(self.model) is None
            if self.shares:
                sample = [
                    TokenizedPair(parts[a][0], parts[a][1], parts[b][1], "") for a, b in twos[:per_batch]
                ]
                gap, _ = layouts_gap(lambda batch: sequence_rewards(self.model, batch), sample, pad, None)
                self.shares = gap <= shared_tolerance(self.model.dtype != torch.float32)
        if not self.shares:
            twos = []
        paired = {i for two in twos for i in two}
        for start in range(0, len(twos), per_batch):
            chunk = twos[start : start + per_batch]
            # One pair a row, not packed: the pairs come sorted by length (little padding), and packing several
            # into one long row makes the attention quadratic in the row (the check's 64 hh-rlhf pairs: 75 s
            # packed up to 2 x max_length, 61 s one a row, float32, this CPU).
            batch = collate_shared(
                [TokenizedPair(parts[a][0], parts[a][1], parts[b][1], "") for a, b in chunk], pad
            )
            tick = time.perf_counter()
            rewards = sequence_rewards(self.model, batch).float()  # (2B,): first answers, then second ones
            seconds = (time.perf_counter() - tick) / (2 * len(chunk))
            for row, i in enumerate([a for a, _ in chunk] + [b for _, b in chunk]):
                yield i, _result(float(rewards[row])), usage(1, sum(map(len, parts[i])), 0, seconds)
        encoded = {i: (p + c)[-limit:] for i, (p, c) in enumerate(parts) if i not in paired}
        order = sorted(encoded, key=lambda i: -len(encoded[i]))
        for start in range(0, len(order), self.cfg.batch_size):
            chunk = order[start : start + self.cfg.batch_size]
            input_ids, attention_mask = pad_sequences([encoded[i] for i in chunk], pad, "right")  # (B, T)
            tick = time.perf_counter()
            rewards = sequence_rewards(
                self.model, {"input_ids": input_ids, "attention_mask": attention_mask}
            ).float()  # (B,)
            seconds = (time.perf_counter() - tick) / len(chunk)
            for row, i in enumerate(chunk):
                yield i, _result(float(rewards[row])), usage(1, len(encoded[i]), 0, seconds)

    def close(self) -> None:
        self.model = None


def _result(value: float) -> dict:
    valid = value == value and abs(value) != float("inf")
    return {"score": value if valid else None, "valid": valid}
