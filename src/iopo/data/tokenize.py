"""Pairs to token ids, following TRL's DPO conventions: the chat template renders messages, prompts are cut at the
start and completions at the end; and the prompts and answers of generation and judges, rendered the same way."""

from __future__ import annotations

import json
from dataclasses import dataclass

from iopo.data.files import DataError, location_fields, one_line
from iopo.data.formats import PreferencePair


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # the completion only; the prompt is prompt_ids
    rejected_ids: list[int]
    source: str  # "<file>:<row>"
    extras: dict[str, float] | None = None  # per-pair numbers for the loss, from PreferencePair.extras


def prompt_key(prompt: str | list[dict]) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def file_of(pairs: list) -> str:
    return pairs[0].source.rpartition(":")[0] if pairs else "data"


def _pair_error(pair: PreferencePair, field: str, reason: str) -> DataError:
    file, _, where = pair.source.rpartition(":")
    if file and location_fields(where):
        return DataError.at(file, where, field, reason)
    return DataError(f"{pair.source}: field '{field}': {reason}", source=pair.source, field=field)


def _render(pair: PreferencePair, tokenizer) -> tuple[str, str, str]:
    """(prompt_text, chosen_text, rejected_text). Messages: the completion is the render of prompt+completion minus
    the render of the prompt with the generation prompt, so it ends with the template's end-of-turn tokens."""
    if isinstance(pair.prompt, str):
        return pair.prompt, pair.chosen, pair.rejected
    try:
        prompt_text = tokenizer.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises TemplateError or whatever the template calls raise_exception with
        raise _pair_error(pair, "prompt", f"the chat template failed: {one_line(e)}") from None
    completions = []
    for field in ("chosen", "rejected"):
        try:
            full = tokenizer.apply_chat_template(pair.prompt + getattr(pair, field), tokenize=False)
        except Exception as e:
            raise _pair_error(pair, field, f"the chat template failed: {one_line(e)}") from None
        if not full.startswith(prompt_text):
            raise _pair_error(
                pair,
                field,
                "the chat template's render of prompt+completion does not start with its render of the prompt "
                "(with generation prompt); use another model or a string format",
            )
        completions.append(full[len(prompt_text) :])
    return prompt_text, completions[0], completions[1]


def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]


def _reject(error: DataError, pair: PreferencePair) -> dict:
    """A pair that failed at tokenization, in the rejects.jsonl layout the row readers use."""
    file, _, where = pair.source.rpartition(":")
    reason = str(error).split(f"field '{error.field}': ", 1)[-1]
    record = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    return {
        "source": file,
        "where": where,
        **location_fields(where),
        "field": error.field,
        "reason": reason,
        "record": record,
    }


def tokenize_pairs(
    pairs: list[PreferencePair],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    rejects: list[dict] | None = None,
) -> tuple[list[TokenizedPair], dict]:
    """TRL's conventions. Message prompts: the chat template's render, tokenized without extra special tokens.
    String prompts: tokenizer(prompt) with its special tokens (BOS), completion + [eos_token_id].

    A prompt over max_prompt_length keeps its last tokens (the question nearest the reply); then each completion
    is cut at the end to max_length - len(prompt). A pair that cannot be rendered or tokenizes to nothing raises
    DataError naming its row and field, or, when a `rejects` list is given, is appended to it and left out.
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
    is_chat = [not isinstance(pair.prompt, str) for pair in pairs]
    if any(is_chat) and not getattr(tokenizer, "chat_template", None):
        file = pairs[is_chat.index(True)].source.rpartition(":")[0]
        raise DataError(
            f"{file}: the data are chat messages but the tokenizer has no chat template; "
            "use a chat (instruct) model or data with plain-string prompts (standard format)"
        )
    if not all(is_chat) and tokenizer.eos_token_id is None:
        raise DataError(
            f"{file_of(pairs)}: string completions end with EOS, but the tokenizer has no eos token"
        )
    if rejects is not None:  # render one by one so a bad pair can be set aside
        kept = []
        for pair in pairs:
            try:
                _render(pair, tokenizer)
                kept.append(pair)
            except DataError as e:
                rejects.append(_reject(e, pair))
        pairs, is_chat = kept, [not isinstance(pair.prompt, str) for pair in kept]
    texts = [_render(pair, tokenizer) for pair in pairs]

    prompt_ids: list[list[int]] = [[] for _ in pairs]
    for chat in (True, False):  # the template already wrote any BOS; raw text gets the tokenizer's own
        idx = [i for i, c in enumerate(is_chat) if c == chat]
        for i, ids in zip(idx, _encode(tokenizer, [texts[i][0] for i in idx], not chat), strict=True):
            prompt_ids[i] = ids
    chosen_ids = _encode(tokenizer, [t[1] for t in texts], False)
    rejected_ids = _encode(tokenizer, [t[2] for t in texts], False)

    stats = {"pairs": len(pairs), "prompts_truncated": 0, "completions_truncated": 0, "max_tokens": 0}
    out = []
    for i, pair in enumerate(pairs):
        prompt, chosen, rejected = prompt_ids[i], chosen_ids[i], rejected_ids[i]
        if not is_chat[i]:
            chosen, rejected = chosen + [tokenizer.eos_token_id], rejected + [tokenizer.eos_token_id]
        empty = next(
            (f for f, ids in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)) if not ids),
            None,
        )
        if empty is not None:
            error = _pair_error(pair, empty, "tokenizes to no tokens")
            if rejects is None:
                raise error
            rejects.append(_reject(error, pair))
            continue
        if len(prompt) > max_prompt_length:
            prompt = prompt[-max_prompt_length:]
            stats["prompts_truncated"] += 1
        budget = max_length - len(prompt)
        if len(chosen) > budget or len(rejected) > budget:
            chosen, rejected = chosen[:budget], rejected[:budget]
            stats["completions_truncated"] += 1
        stats["max_tokens"] = max(stats["max_tokens"], len(prompt) + max(len(chosen), len(rejected)))
        out.append(TokenizedPair(prompt, chosen, rejected, pair.source, pair.extras))
    stats["pairs"] = len(out)
    return out, stats


def render_prompt(prompt: str | list[dict], tokenizer) -> str:
    """The text a model continues: a chat prompt through its template with the generation prompt, else as is."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def answer_parts(prompt: str | list[dict], answer: str, tokenizer) -> tuple[list[int], list[int]]:
    """The prompt's token ids and the answer's (with its end token) exactly as training tokenizes a pair."""
    chosen = answer if isinstance(prompt, str) else [{"role": "assistant", "content": answer}]
    pair = PreferencePair(prompt, chosen, chosen, "answer:0")
    prompt_text, completion_text, _ = _render(pair, tokenizer)
    prompt_ids = _encode(tokenizer, [prompt_text], isinstance(prompt, str))[0]
    completion = _encode(tokenizer, [completion_text], False)[0]
    if isinstance(prompt, str) and tokenizer.eos_token_id is not None:
        completion.append(tokenizer.eos_token_id)
    return prompt_ids, completion


def answer_ids(prompt: str | list[dict], answer: str, tokenizer, max_length: int) -> list[int]:
    """Token ids of prompt + answer exactly as training tokenizes a pair (the reward model sees both the same way),
    cut from the left to max_length so the answer's end, which the reward head reads, is kept."""
    prompt_ids, completion = answer_parts(prompt, answer, tokenizer)
    return (prompt_ids + completion)[-max_length:]


def prompt_as_text(prompt: str | list[dict]) -> str:
    """A prompt for a judge's eyes: raw text as is, a conversation as "User: ... / Assistant: ..." turns."""
    if isinstance(prompt, str):
        return prompt
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in prompt)
