"""Parsing each preference row into a PreferencePair.

Formats follow TRL's (https://huggingface.co/docs/trl/dataset_formats), plus Anthropic hh-rlhf transcripts and
LLaMA-Factory sharegpt rows. `format="auto"` picks one per file, the format most of its rows are in; a row that
does not fit its file's format is that row's error. A bad row raises DataError naming file, line (JSON Lines, from 1)
or row (0-based elsewhere) and field, or with `skip_invalid` becomes a reject record: nothing is dropped silently.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from iopo.data.files import RECORD_FIELD, DataError, location_fields, read_rows

FORMATS = ("standard", "conversational", "implicit", "hh", "sharegpt")


COLUMN_FIELDS = ("prompt", "chosen", "rejected", "conversations")


_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}


_HH_ASSISTANT = "\n\nAssistant:"


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class PreferencePair:
    """One preference. `prompt` is raw text (then chosen/rejected are completion text) or chat messages (then
    chosen/rejected are lists of assistant messages), messages being {"role", "content"} with role in
    system/user/assistant."""

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    source: str  # "<file>:<where>", e.g. "pairs.jsonl:line 7" or "pairs.parquet:row 6 (0-based)"
    # per-pair numbers an online round gives its loss (SPPO's win probabilities, XPO's reference side)
    extras: dict[str, float] | None = None


class _RowError(Exception):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


_MISSING = object()

# ---------------------------------------------------------------- field access


def get_path(record: Any, dotted: str) -> Any:
    """record["a"]["b"][0] for "a.b.0"; _MISSING where any step is absent."""
    node = record
    for key in dotted.split("."):
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.lstrip("-").isdigit() and -len(node) <= int(key) < len(node):
            node = node[int(key)]
        else:
            return _MISSING
    return node


def _apply_columns(record: dict, columns: dict[str, str]) -> dict:
    if not columns:
        return record
    mapped = dict(record)
    for ours, theirs in columns.items():
        value = get_path(record, theirs)
        if value is _MISSING:
            mapped.pop(ours, None)
        else:
            mapped[ours] = value
    return mapped


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _has_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _required(record: dict, key: str) -> Any:
    value = record.get(key)
    if value is None:
        raise _RowError(key, "missing")
    return value


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _RowError(field, f"expected a string, got {_kind(value)}")
    if _has_surrogate(value):
        raise _RowError(field, "undecodable text (invalid UTF-8 or a lone surrogate)")
    return value


def _content(value: Any, field: str) -> str:
    """A message's content: a string, or text parts [{"type": "text", "text"|"value": str}] joined."""
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if isinstance(part, str):
                texts.append(_text(part, f"{field}[{i}]"))
                continue
            if not isinstance(part, dict):
                raise _RowError(f"{field}[{i}]", f"expected a content part object, got {_kind(part)}")
            if (part.get("type") or "text") != "text":
                raise _RowError(
                    f"{field}[{i}].type", f"only text content is supported, got {part.get('type')!r}"
                )
            key = "text" if part.get("text") is not None else "value"
            texts.append(_text(part.get(key), f"{field}[{i}].{key}"))
        return "".join(texts)
    return _text(value, field)


def _message(value: Any, field: str) -> dict:
    """{role|from, content|value, ...} -> {"role": system|user|assistant, "content": str}; extra keys ignored."""
    if not isinstance(value, dict):
        raise _RowError(field, f"expected a message object, got {_kind(value)}")
    # Arrow-backed rows (parquet, `datasets`) carry every key of the schema, None where a row lacks it.
    role_key = "role" if value.get("role") is not None else "from"
    role = value.get(role_key)
    if role is None:
        raise _RowError(f"{field}.role", "missing")
    if not isinstance(role, str) or role.lower() not in _ROLES:
        raise _RowError(f"{field}.{role_key}", f"unknown role {role!r}; expected system, user or assistant")
    content_key = "content" if value.get("content") is not None else "value"
    content = value.get(content_key)
    if content is None:
        raise _RowError(f"{field}.content", "missing")
    return {"role": _ROLES[role.lower()], "content": _content(content, f"{field}.{content_key}")}


def _messages(value: Any, field: str, *, single_ok: bool = False) -> list[dict]:
    if single_ok and isinstance(value, dict):
        return [_message(value, field)]
    if not isinstance(value, list):
        raise _RowError(field, f"expected a list of messages, got {_kind(value)}")
    if not value:
        raise _RowError(field, "empty message list")
    return [_message(m, f"{field}[{i}]") for i, m in enumerate(value)]


def _check_completion(messages: list[dict], field: str, start: int = 0) -> None:
    """A completion is assistant turn(s) with something in them; `start` is its index in the row's list."""
    if messages[0]["role"] != "assistant":
        raise _RowError(
            f"{field}[{start}].role",
            f"the completion must start with an assistant message, got {messages[0]['role']!r}",
        )
    for i, message in enumerate(messages, start=start):
        if not message["content"].strip():
            raise _RowError(f"{field}[{i}].content", "empty completion")


def _check_text_pair(prompt: str, chosen: str, rejected: str) -> None:
    if not prompt.strip():
        raise _RowError("prompt", "empty prompt")
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise _RowError(field, "empty completion")
    if chosen == rejected:
        raise _RowError("rejected", "same as chosen")


# ---------------------------------------------------------------- formats: record -> (prompt, chosen, rejected)


def _standard(record: dict) -> tuple:
    prompt, chosen, rejected = (_text(_required(record, k), k) for k in ("prompt", "chosen", "rejected"))
    _check_text_pair(prompt, chosen, rejected)
    return prompt, chosen, rejected


def _message_completions(record: dict) -> tuple[list[dict], list[dict]]:
    """chosen/rejected as assistant message lists (a single message allowed), non-empty and different."""
    chosen = _messages(_required(record, "chosen"), "chosen", single_ok=True)
    rejected = _messages(_required(record, "rejected"), "rejected", single_ok=True)
    _check_completion(chosen, "chosen")
    _check_completion(rejected, "rejected")
    if chosen == rejected:
        raise _RowError("rejected", "same as chosen")
    return chosen, rejected


def _check_prompt(messages: list[dict], field: str) -> None:
    """A prompt has something to answer: a non-system message with text (as the standard form's non-empty prompt)."""
    if not any(m["content"].strip() for m in messages if m["role"] != "system"):
        raise _RowError(field, "empty prompt")


def _conversational(record: dict) -> tuple:
    prompt = _messages(_required(record, "prompt"), "prompt")
    _check_prompt(prompt, "prompt")
    return prompt, *_message_completions(record)


def _sharegpt(record: dict) -> tuple:
    prompt = _messages(_required(record, "conversations"), "conversations")
    _check_prompt(prompt, "conversations")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise _RowError("system", f"expected a string, got {_kind(system)}")  # never ignored silently
    if system is not None and system.strip() and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": _text(system, "system")})
    return prompt, *_message_completions(record)


def _implicit(record: dict) -> tuple:
    """chosen/rejected are whole conversations; the prompt is their longest common prefix (TRL extract_prompt)."""
    chosen, rejected = _required(record, "chosen"), _required(record, "rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        return _implicit_text(_text(chosen, "chosen"), _text(rejected, "rejected"))
    chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if chosen == rejected:
        raise _RowError("rejected", "same as chosen")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise _RowError("chosen", "chosen and rejected share no prompt messages")
    _check_prompt(chosen[:shared], "chosen")
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) == shared:
            raise _RowError(field, "no completion after the prompt shared with the other conversation")
        _check_completion(messages[shared:], field, start=shared)
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _implicit_text(chosen: str, rejected: str) -> tuple:
    cut = len(os.path.commonprefix([chosen, rejected]))
    if cut and chosen[cut - 1] == " ":  # TRL: the completion keeps its leading space
        cut -= 1
    if cut == 0:
        raise _RowError("chosen", "chosen and rejected share no prompt text")
    prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
    _check_text_pair(prompt, chosen, rejected)
    return prompt, chosen, rejected


def looks_like_hh(text: str) -> bool:
    return _HH_ASSISTANT in text and text.lstrip().startswith("Human:")


def _hh(record: dict) -> tuple:
    """ "\\n\\nHuman: …\\n\\nAssistant: …" transcripts: the prompt is the longest common prefix cut back to its last
    "\\n\\nAssistant:"; history turns become messages. Conversations that part before the last reply (a completion
    holding further turns) are a row error, not a completion with the other history inside."""
    chosen, rejected = (_text(_required(record, k), k) for k in ("chosen", "rejected"))
    chosen, rejected = (
        "\n\n" + t.lstrip() if t.lstrip().startswith("Human:") else t for t in (chosen, rejected)
    )
    cut = os.path.commonprefix([chosen, rejected]).rfind(_HH_ASSISTANT)
    if cut < 0:
        raise _RowError("chosen", "chosen and rejected share no '\\n\\nHuman: … \\n\\nAssistant:' history")
    parts = _HH_TURN.split(chosen[:cut])
    if parts[0].strip() or len(parts) < 3:
        raise _RowError("chosen", "the transcript does not start with '\\n\\nHuman:'")
    prompt: list[dict] = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        if prompt and prompt[-1]["role"] == role:  # a few rows have two Assistant turns in a row: merge them
            prompt[-1]["content"] += "\n\n" + content.strip()
        else:
            prompt.append({"role": role, "content": content.strip()})
    # hh rows keep the prompt inside chosen and rejected: an empty question is the prompt's fault, named so.
    _check_prompt(prompt, "prompt")
    replies = []
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        reply = text[cut + len(_HH_ASSISTANT) :].strip()
        if not reply:
            raise _RowError(field, "empty completion")
        turn = _HH_TURN.search(reply)
        if turn:  # the histories part before the last reply: training on it would put turns in a completion
            raise _RowError(
                field,
                f"chosen and rejected differ before their last reply (this completion holds a further "
                f"'{turn.group(1)}:' turn)",
            )
        replies.append([{"role": "assistant", "content": reply}])
    if replies[0] == replies[1]:
        raise _RowError("rejected", "same as chosen")
    return prompt, replies[0], replies[1]


PARSERS: dict[str, Callable[[dict], tuple]] = {
    "standard": _standard,
    "conversational": _conversational,
    "implicit": _implicit,
    "hh": _hh,
    "sharegpt": _sharegpt,
}


def detect_format(record: dict) -> str | None:
    """The format a (column-mapped) row is in, from its keys and value types; None if it does not tell."""
    prompt, chosen, rejected = record.get("prompt"), record.get("chosen"), record.get("rejected")
    if record.get("conversations") is not None and prompt is None:
        return "sharegpt"
    if isinstance(prompt, list):
        return "conversational"
    if prompt is not None and not isinstance(
        prompt, str
    ):  # a prompt column of another type: the standard form's
        return "standard"  # error names that column (not chosen, as reading the row without a prompt would)
    # Full conversations win over a string prompt column (capybara-dpo and orpo-dpo-mix copy the first user turn
    # into "prompt" but keep the whole multi-turn history only in chosen/rejected).
    if isinstance(chosen, list) or isinstance(rejected, list):
        return "implicit"
    if isinstance(prompt, str):
        return "standard"
    text = chosen if isinstance(chosen, str) else rejected
    if isinstance(text, str):
        return "hh" if looks_like_hh(text) else "implicit"
    return None


# ---------------------------------------------------------------- the loader


def _jsonable(value: Any) -> Any:
    """The row as JSON can store it: lone surrogates -> U+FFFD, unknown types -> str."""
    if isinstance(value, str):
        return (
            "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value)
            if _has_surrogate(value)
            else value
        )
    if isinstance(value, dict):
        return {str(_jsonable(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return str(value)


def _their_field(field: str, columns: dict[str, str]) -> str:
    """Name a field as the user's file does: 'chosen[2].content' -> 'chosen_messages[2].content'."""
    base = re.match(r"[a-z]+", field)
    if base and base.group(0) in columns:
        return columns[base.group(0)] + field[base.end() :]
    return field


def _oversized(value: Any, limit: int, path: str = "") -> tuple[str, int] | None:
    """(field path, length) of the first string longer than `limit` characters in a row, or None."""
    if isinstance(value, str):
        return (path or RECORD_FIELD, len(value)) if len(value) > limit else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found = _oversized(
            child, limit, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}".lstrip(".")
        )
        if found:
            return found
    return None


def _format_of_file(mapped: list[dict | None], detected: list[str | None], label: str) -> str | None:
    """The format most rows of a file are in (`detected`: each row's own, judged alone; ties go to the first seen):
    one odd row does not decide for the others, it becomes that row's error."""
    counts: dict[str, int] = {}
    for found in detected:
        if found:
            counts[found] = counts.get(found, 0) + 1
    if not counts:
        keys = sorted(next((r for r in mapped if r is not None), {}))
        if any(r is not None for r in mapped):
            raise DataError(
                f"{label}: cannot tell the format from the keys {keys}; expected prompt/chosen/rejected, "
                "chosen/rejected or conversations/chosen/rejected (set data.columns or data.format)",
                source=label,
            )
        return None
    return max(counts, key=lambda f: counts[f])  # max keeps the first of equal counts (dicts keep order)


def load_rows(
    path: str,
    *,
    name: str | None = None,
    split: str = "train",
    format: str = "auto",
    columns: dict[str, str] | None = None,
    skip_invalid: bool = False,
    max_field_chars: int = 1_000_000,
    max_rows: int = 10_000_000,
) -> tuple[list[PreferencePair], list[dict], str | None, dict]:
    """load_pairs plus the format used (None when no row told; "mixed" over a folder's files) and the reading notes
    (files read, files not read)."""
    columns = dict(columns or {})
    label = str(path)
    for ours, theirs in columns.items():
        if ours not in COLUMN_FIELDS or not isinstance(theirs, str) or not theirs:
            raise DataError(
                f"{label}: columns: cannot map {ours!r} to {theirs!r}; map {', '.join(COLUMN_FIELDS)}"
            )
    if format != "auto" and format not in PARSERS:
        raise DataError(f"{label}: unknown format {format!r}; use auto or one of {', '.join(FORMATS)}")
    label, rows, notes = read_rows(label, name, split)
    if len(rows) > max_rows:
        raise DataError(f"{label}: {len(rows)} rows, more than data.max_rows={max_rows}", source=label)
    mapped = [
        _apply_columns(r, columns) if e is None and isinstance(r, dict) else None for r, e, _, _ in rows
    ]
    detected = [
        detect_format(m) if m is not None and format == "auto" else None for m in mapped
    ]  # each row alone

    # The format is decided per file (a folder may mix files of different formats), from all its rows.
    formats: dict[str, str | None] = {}
    for file in dict.fromkeys(file for _, _, file, _ in rows):
        if format != "auto":
            formats[file] = format
        else:
            in_file = [i for i, (_, _, f, _) in enumerate(rows) if f == file]
            formats[file] = _format_of_file(
                [mapped[i] for i in in_file], [detected[i] for i in in_file], file
            )

    pairs: list[PreferencePair] = []
    rejects: list[dict] = []
    for (record, error, file, where), record_mapped, own in zip(rows, mapped, detected, strict=True):
        try:
            if error is not None:
                raise _RowError(*error)
            if not isinstance(record, dict):
                raise _RowError(RECORD_FIELD, f"expected a JSON object, got {_kind(record)}")
            too_long = _oversized(record_mapped, max_field_chars)
            if too_long:
                raise _RowError(
                    too_long[0],
                    f"{too_long[1]:,} characters, more than data.max_field_chars={max_field_chars:,}",
                )
            file_format = formats[file]
            prompt, chosen, rejected = PARSERS[file_format](record_mapped)
            if own and own != file_format:
                field = "chosen" if {own, file_format} <= {"hh", "implicit", "standard"} else "prompt"
                raise _RowError(
                    field,
                    f"this row reads as the {own} format while the file's other rows are {file_format} "
                    "(fix the row or set data.format)",
                )
        except _RowError as e:
            field = _their_field(e.field, columns)
            if not skip_invalid:
                raise DataError.at(file, where, field, e.reason) from None
            rejects.append(
                {
                    "source": file,
                    "where": where,
                    **location_fields(where),
                    "field": field,
                    "reason": e.reason,
                    "record": _jsonable(record),
                }
            )
            continue
        pairs.append(PreferencePair(prompt, chosen, rejected, f"{file}:{where}"))
    used = set(formats.values()) - {None}
    found_format = used.pop() if len(used) == 1 else ("mixed" if used else None)
    return pairs, rejects, found_format, notes
