"""`iopo generate`: answers to a split's prompts from a model or an OpenAI-compatible server, as JSON Lines
written as they come (an existing file is continued, nothing is generated twice)."""

from __future__ import annotations

from pathlib import Path

from iopo.config import GenerateConfig
from iopo.data.loading import split_prompts
from iopo.eval.generate import generate_answers
from iopo.io.log import get_logger

log = get_logger(__name__)


def generate_command(cfg: GenerateConfig) -> dict:
    """Answers to cfg.split's prompts, appended to cfg.output (continued when it exists); returns the timing."""
    prompts = split_prompts(cfg.data, cfg.split, cfg.max_prompts)
    output = Path(cfg.output)
    records, timing = generate_answers(
        cfg.model,
        prompts,
        cfg.generation,
        output,
        max_prompt_length=cfg.data.max_prompt_length,
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        progress=cfg.progress_bar,
    )
    rate = timing["completion_tokens"] / timing["seconds"] if timing["seconds"] > 0 else 0.0
    log.info(
        f"{len(records)} answers to {len(prompts)} prompts in {output} "
        f"({timing['answers']} new, {timing['reused']} already there; {timing['seconds']:.1f}s, {rate:.1f} tok/s)"
    )
    return timing
