"""A local LLM judge: a Hugging Face causal LM in process, reading its next-token probabilities of "A" and "B"
after the pairwise question (no sampling, no parsing). P(A) beyond 0.5 ± tie_margin is the verdict of that order;
the caller asks both orders and combines them (MT-Bench's rule)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from iopo.data.collate import pad_sequences
from iopo.data.tokenize import prompt_as_text
from iopo.eval.judges import prompts as P
from iopo.eval.judges.base import usage


class LocalJudge:
    def __init__(self, name: str, cfg, dtype: str = "float32", trust_remote_code: bool = False):
        from iopo.io.models import load_inference_model, model_fingerprint, resolve_model

        self.name, self.cfg = name, cfg
        self.modes = cfg.effective_modes()  # pairwise: the config refuses a score mode (JUDGE_TYPES)
        self.model, self.tokenizer = load_inference_model(resolve_model(cfg.model), dtype, trust_remote_code)
        self.model.config.use_cache = False
        self.letter_ids = [self._letter_ids(letter) for letter in ("A", "B")]
        self.judge_id = "local:" + model_fingerprint(self.model) + ":" + P.TEMPLATE_VERSION

    def _letter_ids(self, letter: str) -> list[int]:
        ids = set()
        for text in (letter, " " + letter):
            encoded = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1:
                ids.add(encoded[0])
        if not ids:
            raise ValueError(f"the judge's tokenizer has no single token for '{letter}'")
        return sorted(ids)

    def _encode(self, prompt, answer_a: str, answer_b: str) -> list[int]:
        user = P.LOCAL_PAIRWISE.format(prompt=prompt_as_text(prompt), answer_a=answer_a, answer_b=answer_b)
        messages = [{"role": "system", "content": P.SYSTEM}, {"role": "user", "content": user}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(P.SYSTEM + "\n\n" + user + "\nAnswer:")["input_ids"]
        return ids[-self.cfg.max_length :]

    @torch.inference_mode()
    def pairwise(self, items) -> Iterator[tuple[int, dict, dict]]:
        pad = self.tokenizer.pad_token_id
        encoded = [self._encode(*item) for item in items]
        order = sorted(range(len(items)), key=lambda i: -len(encoded[i]))
        for start in range(0, len(order), self.cfg.batch_size):
            chunk = order[start : start + self.cfg.batch_size]
            input_ids, attention_mask = pad_sequences([encoded[i] for i in chunk], pad, "left")  # (B, T)
            tick = time.perf_counter()
            logits = (
                self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1].float()
            )  # (B, V)
            logps = logits.log_softmax(-1)
            a = logps[:, self.letter_ids[0]].logsumexp(-1)  # (B,)
            b = logps[:, self.letter_ids[1]].logsumexp(-1)
            p_a = torch.sigmoid(a - b)  # P(A) among {A, B}
            seconds = (time.perf_counter() - tick) / len(chunk)
            for row, i in enumerate(chunk):
                p = float(p_a[row])
                margin = self.cfg.tie_margin
                winner = "A" if p > 0.5 + margin else "B" if p < 0.5 - margin else "tie"
                mass = float(a[row].exp() + b[row].exp())
                yield (
                    i,
                    {"winner": winner, "valid": True, "p_a": p, "ab_mass": mass},
                    usage(1, len(encoded[i]), 0, seconds),
                )

    def score(self, items):
        raise NotImplementedError("a local judge gives pairwise verdicts only")

    def close(self) -> None:
        self.model = None
