"""The judge interface: a judge takes prompts and answers and returns verdicts; it knows nothing of players,
checkpoints or files (after oat's `PreferenceOracleBase.compare`).

- `pairwise(items)`: items are (prompt, answer_a, answer_b) in ONE order; the result is {"winner": "A" | "B" |
  "tie" | None, "valid": bool, ...}. Callers ask both orders and combine them (MT-Bench's rule, iopo.stats).
- `score(items)`: items are (prompt, answer); the result is {"score": float | None, "valid": bool, ...} - a 0-3
  rubric score for an LLM judge, a scalar reward for a reward model.

Both yield (index into items, result, usage) as each judgment is ready, so the caller stores it at once; usage is
{"requests", "prompt_tokens", "completion_tokens", "seconds", "cost"}. A prompt is raw text or chat messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

Prompt = str | list[dict]


class Judge(Protocol):
    name: str  # the config's name for it, e.g. "rm"
    judge_id: (
        str  # what its verdicts depend on (type, model fingerprint or server and model, template version)
    )
    modes: list[str]  # "pairwise" and/or "score"
    facts: object  # its type's facts (iopo.config.JUDGE_TYPES): what its scores decide, how it annotates

    def pairwise(self, items: list[tuple[Prompt, str, str]]) -> Iterator[tuple[int, dict, dict]]: ...

    def score(self, items: list[tuple[Prompt, str]]) -> Iterator[tuple[int, dict, dict]]: ...

    def close(self) -> None: ...


def usage(
    requests: int = 1,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    seconds: float = 0.0,
    cost: float = 0.0,
):
    return {
        "requests": requests,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "seconds": seconds,
        "cost": cost,
    }
