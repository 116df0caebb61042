"""Preference data: a file or `datasets` name -> PreferencePair -> prompt-grouped train/test split -> TokenizedPair
-> padded (2B, T) batches whose completion_mask marks the tokens whose log-probs count.

Reading and the row formats (standard, conversational, implicit, hh, sharegpt) live in data_formats.py;
tokenization follows TRL's DPO conventions.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from iopo.data_formats import DataError, PreferencePair, load_rows, location_fields, one_line

__all__ = [
    "DataError",
    "PreferencePair",
    "TokenizedPair",
    "collate_pairs",
    "collate_shared",
    "default_data_path",
    "load_pairs",
    "load_split",
    "relabel_pairs",
    "load_training_data",
    "prompt_id",
    "split_by_prompt",
    "tokenize_pairs",
]

logger = logging.getLogger(__name__)


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # the completion only; the prompt is prompt_ids
    rejected_ids: list[int]
    source: str  # "<file>:<row>"


def default_data_path() -> Path:
    """The embedded Anthropic hh-rlhf harmless-base test split (2312 multi-turn pairs, MIT); see its PROVENANCE.md."""
    return Path(__file__).resolve().parent / "assets" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def load_pairs(
    path: str,
    *,
    name: str | None = None,
    split: str = "train",
    format: str = "auto",
    columns: dict[str, str] | None = None,
    skip_invalid: bool = False,
) -> tuple[list[PreferencePair], list[dict]]:
    """Read a local .json/.jsonl(.gz)/.parquet file, a `save_to_disk` folder or a `datasets` name into pairs.

    `columns` maps our fields (prompt, chosen, rejected, conversations) to dotted paths in the rows, e.g.
    {"chosen": "response.0"}. A bad row raises DataError("<file>: row <n>: field '<f>': <reason>"); with
    `skip_invalid` it is returned in `rejects` as {"source", "row", "field", "reason", "record"} instead.
    """
    pairs, rejects, _, _ = load_rows(
        path, name=name, split=split, format=format, columns=columns, skip_invalid=skip_invalid
    )
    return pairs, rejects


def _prompt_key(prompt: str | list[dict]) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def _file_of(pairs: list) -> str:
    return pairs[0].source.rpartition(":")[0] if pairs else "data"


def _pair_error(pair: PreferencePair, field: str, reason: str) -> DataError:
    file, _, where = pair.source.rpartition(":")
    if file and location_fields(where):
        return DataError.at(file, where, field, reason)
    return DataError(f"{pair.source}: field '{field}': {reason}", source=pair.source, field=field)


def split_by_prompt(
    pairs: list[PreferencePair], test_size: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, test), each shuffled; all pairs of one prompt land on the same side, so no test prompt is trained on.

    test_size < 1 is the share of pairs, >= 1 a number of pairs. Whole prompt groups are taken in seeded random
    order while they fit, so the test side has at most that many pairs (at least one group).
    """
    n = len(pairs)
    if test_size <= 0:
        raise ValueError(f"test_size must be > 0, got {test_size}")
    target = max(1, round(test_size * n) if test_size < 1 else int(test_size))
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(_prompt_key(pair.prompt), []).append(i)
    if len(groups) < 2:
        raise DataError(f"{_file_of(pairs)}: cannot split {n} pairs by prompt: fewer than 2 distinct prompts")
    if target >= n:
        raise DataError(f"{_file_of(pairs)}: test_size {test_size} leaves no training pairs (of {n})")
    order = list(groups.values())
    rng = random.Random(seed)
    rng.shuffle(order)
    test_idx: list[int] = []
    for group in order:
        if len(test_idx) + len(group) <= target:
            test_idx.extend(group)
            if len(test_idx) == target:
                break
    if not test_idx:  # every group is larger than the target: take the smallest
        test_idx = list(min(order, key=len))
    in_test = set(test_idx)
    train_idx = [i for i in range(n) if i not in in_test]
    rng.shuffle(train_idx)
    rng.shuffle(test_idx)
    return [pairs[i] for i in train_idx], [pairs[i] for i in test_idx]


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
            f"{_file_of(pairs)}: string completions end with EOS, but the tokenizer has no eos token"
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
        out.append(TokenizedPair(prompt, chosen, rejected, pair.source))
    stats["pairs"] = len(out)
    return out, stats


def collate_pairs(batch: list[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows 0..B-1 = prompt+chosen, rows B..2B-1 = prompt+rejected (same order), right-padded to the longest."""
    if not batch:
        raise ValueError("collate_pairs needs at least one pair")
    sequences = [(p.prompt_ids, p.chosen_ids) for p in batch] + [
        (p.prompt_ids, p.rejected_ids) for p in batch
    ]
    width = max(len(prompt) + len(completion) for prompt, completion in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (2B, T)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.bool)  # (2B, T)
    for row, (prompt, completion) in enumerate(sequences):
        end = len(prompt) + len(completion)
        input_ids[row, :end] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[row, :end] = 1
        completion_mask[row, len(prompt) : end] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def collate_shared(
    batch: list[TokenizedPair], pad_token_id: int, pack_tokens: int | None = None
) -> dict[str, torch.Tensor]:
    """Prefix sharing: each pair as ONE sequence [prompt, chosen, rejected], so its prompt is computed once.

    The rejected tokens restart their positions where the chosen ones started and cannot see the chosen tokens (a
    block attention mask), so every token sees exactly what it sees in its own prompt+completion sequence and gets
    the same log-prob. With `pack_tokens`, several pairs share a row (first fit in order, each pair in its own
    block, positions restarting at 0) up to that many tokens, so little is padding; else one pair per row.

    Returns input_ids and position_ids (N, T); attention_mask (N, 1, T, T) bool, True where a query (row) may
    attend a key (column); and the completion-token table: target_index (M,) the flat index (row * T + t) of the
    position whose output predicts each completion token, target_ids (M,), target_seq (M,) in [0, 2B) - pair i's
    chosen is i, its rejected B + i - in the same order as collate_pairs' rows.
    """
    if not batch:
        raise ValueError("collate_shared needs at least one pair")
    sizes = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in batch]
    rows: list[list[int]] = []  # pair indices per row
    used: list[int] = []
    for i, size in enumerate(sizes):
        spot = None
        if pack_tokens:
            spot = next((r for r, n in enumerate(used) if n + size <= pack_tokens), None)
        if spot is None:
            rows.append([i])
            used.append(size)
        else:
            rows[spot].append(i)
            used[spot] += size
    width = max(used)
    n_rows, n_pairs = len(rows), len(batch)
    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    block = torch.full(
        (n_rows, width), -1, dtype=torch.long
    )  # which pair a position belongs to (-1: padding)
    branch = torch.zeros((n_rows, width), dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected
    index, targets, seqs = [], [], []
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            pair = batch[i]
            p, c, j = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
            end = start + p + c + j
            input_ids[r, start:end] = torch.tensor(pair.prompt_ids + pair.chosen_ids + pair.rejected_ids)
            position_ids[r, start : start + p + c] = torch.arange(p + c)
            position_ids[r, start + p + c : end] = torch.arange(p, p + j)
            block[r, start:end] = i
            branch[r, start + p : start + p + c] = 1
            branch[r, start + p + c : end] = 2
            base = r * width + start
            # chosen token k (at p + k) is predicted by the position before it; so is rejected token k, except the
            # first, which is predicted by the last prompt token (as in its own sequence)
            index += [base + p + k - 1 for k in range(c)]
            index += [base + p - 1] + [base + p + c + k - 1 for k in range(1, j)] if j else []
            targets += pair.chosen_ids + pair.rejected_ids
            seqs += [i] * c + [n_pairs + i] * j
            start = end
    same = block[:, :, None] == block[:, None, :]  # (N, T, T)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    hidden_branch = (branch[:, :, None] == 2) & (
        branch[:, None, :] == 1
    )  # rejected queries never see chosen keys
    mask = same & causal & ~hidden_branch & (block[:, :, None] >= 0)
    mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself (no empty softmax row)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": mask[:, None],
        "target_index": torch.tensor(index, dtype=torch.long),
        "target_ids": torch.tensor(targets, dtype=torch.long),
        "target_seq": torch.tensor(seqs, dtype=torch.long),
        "n_pairs": torch.tensor(n_pairs),
    }


def pad_sequences(
    sequences: list[list[int]], pad_token_id: int, side: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (N, T), padded on the left (generation, next-token judges) or the right."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (N, T)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        input_ids[row, span] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def _duplicates(pairs: list[PreferencePair]) -> int:
    keys = {json.dumps([p.prompt, p.chosen, p.rejected], ensure_ascii=False) for p in pairs}
    return len(pairs) - len(keys)


def load_split(cfg) -> tuple[list[PreferencePair], list[PreferencePair], list[dict], dict]:
    """cfg (a DataConfig) -> (train, test, rejects, report) as untokenized pairs, exactly as training splits them.

    Without cfg.test_path the file is split by prompt (shuffled, seeded); with it both files keep their order.
    max_train_samples / max_eval_samples take the first N after that. skip_invalid=None means true for the
    embedded data (its 9 unusable rows are reported) and false for the user's (the first bad row stops the run).
    """
    embedded = cfg.path is None
    path = str(default_data_path()) if embedded else cfg.path
    skip_invalid = embedded if cfg.skip_invalid is None else cfg.skip_invalid
    options = {
        "name": cfg.name,
        "format": cfg.format,
        "columns": cfg.columns,
        "skip_invalid": skip_invalid,
        "max_field_chars": cfg.max_field_chars,
        "max_rows": cfg.max_rows,
    }
    pairs, rejects, found_format, notes = load_rows(path, split=cfg.split, **options)
    report = {"path": path, "format": found_format, "rows": len(pairs) + len(rejects)}
    if notes.get("ignored_files") or len(notes.get("files", [])) > 1:  # a folder: what was read, what was not
        report |= {f"data_{k}": v for k, v in notes.items()}
        for file in notes.get("ignored_files", []):
            logger.warning(
                "%s: not a data file (.json, .jsonl, .json.gz, .jsonl.gz, .parquet), not read", file
            )
    if not pairs:
        raise DataError(f"{path}: no usable preference pairs ({len(rejects)} rows rejected)")
    report["duplicate_pairs"] = _duplicates(pairs)
    if cfg.test_path:
        train, (test, test_rejects, test_format, _) = (
            pairs,
            load_rows(cfg.test_path, split=cfg.test_split, **options),
        )
        train_prompts = {_prompt_key(p.prompt) for p in train}
        report |= {
            "test_path": cfg.test_path,
            "test_format": test_format,
            "test_rows": len(test) + len(test_rejects),
            "test_prompts_in_train": sum(_prompt_key(p.prompt) in train_prompts for p in test),
        }
        rejects = rejects + test_rejects
    else:
        train, test = split_by_prompt(pairs, cfg.test_size, cfg.split_seed)
    report["skip_invalid"] = skip_invalid
    train, relabelled = relabel_pairs(
        train[: cfg.max_train_samples], cfg.annotator, cfg.flip_labels, cfg.split_seed
    )
    report |= relabelled
    return train, test[: cfg.max_eval_samples], list(rejects), report


def answer_chars(answer: str | list[dict]) -> int:
    """Length of an answer in characters: the text, or the content of its messages."""
    if isinstance(answer, str):
        return len(answer)
    return sum(len(m["content"]) for m in answer if isinstance(m.get("content"), str))


def relabel_pairs(
    pairs: list[PreferencePair], annotator: str = "data", flip: float = 0.0, seed: int = 0
) -> tuple[list[PreferencePair], dict]:
    """The pairs as a corrupted annotator would label them, and what changed (annotator-bias experiments).

    annotator="longer" makes the longer answer (in characters) the chosen one; equal lengths keep the data's
    label. Then exactly round(flip * n) pairs, drawn with `seed`, have chosen and rejected swapped. The report says
    how many pairs now carry the opposite of the data's label. Nothing changes for ("data", 0.0).
    """
    if annotator not in ("data", "longer"):
        raise ValueError(f"annotator must be 'data' or 'longer', got {annotator!r}")
    if not 0.0 <= flip <= 1.0:
        raise ValueError(f"flip_labels must be in [0, 1], got {flip}")
    if annotator == "data" and flip == 0.0:
        return pairs, {}
    swapped = [annotator == "longer" and answer_chars(p.rejected) > answer_chars(p.chosen) for p in pairs]
    biased = sum(swapped)
    n_flip = round(flip * len(pairs))
    for i in random.Random(f"flip_labels:{seed}").sample(range(len(pairs)), n_flip):
        swapped[i] = not swapped[i]
    out = [
        replace(p, chosen=p.rejected, rejected=p.chosen) if s else p
        for p, s in zip(pairs, swapped, strict=True)
    ]
    report = {
        "annotator": annotator,
        "flip_labels": flip,
        "labels_flipped": n_flip,
        "labels_opposite_data": sum(swapped),
    }
    if annotator == "longer":
        report["labels_by_length_changed"] = biased
    return out, report


def write_rejects(rejects: list[dict], run_dir: Path | None) -> Path | None:
    """rejects.jsonl in the run folder (none when nothing was rejected)."""
    if not rejects or run_dir is None:
        return None
    rejects_file = Path(run_dir) / "rejects.jsonl"
    rejects_file.parent.mkdir(parents=True, exist_ok=True)
    with rejects_file.open("w", encoding="utf-8") as f:
        for reject in rejects:
            f.write(json.dumps(reject, ensure_ascii=False) + "\n")
    return rejects_file


def load_training_data(
    cfg, tokenizer, run_dir: Path | None
) -> tuple[list[TokenizedPair], list[TokenizedPair], dict]:
    """cfg (a DataConfig) -> (train, test, report), tokenized. Rejected rows go to run_dir/rejects.jsonl."""
    train, test, rejects, report = load_split(cfg)
    skip_invalid = report.pop("skip_invalid")
    lengths = {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length}
    # With skip_invalid, pairs that fail at tokenization (chat template errors, no tokens) are rejects too.
    token_rejects = rejects if skip_invalid else None
    train_tokens, train_stats = tokenize_pairs(train, tokenizer, **lengths, rejects=token_rejects)
    test_tokens, test_stats = tokenize_pairs(test, tokenizer, **lengths, rejects=token_rejects)
    rejects_file = write_rejects(rejects, run_dir)
    if rejects:
        logger.warning("skipped %d bad rows%s", len(rejects), f"; see {rejects_file}" if rejects_file else "")
    report |= {
        "rejected": len(rejects),
        "train_pairs": len(train_tokens),
        "test_pairs": len(test_tokens),
        "prompts_truncated": train_stats["prompts_truncated"] + test_stats["prompts_truncated"],
        "completions_truncated": train_stats["completions_truncated"] + test_stats["completions_truncated"],
        "max_tokens": max(train_stats["max_tokens"], test_stats["max_tokens"]),
        "rejects_file": str(rejects_file) if rejects_file else None,
    }
    return train_tokens, test_tokens, report


# ---------------------------------------------------------------- prompts and answers (generation, judges)


def prompt_id(prompt: str | list[dict]) -> str:
    """A stable id of a prompt's content (the same prompt in two files gets the same id)."""
    import hashlib

    return hashlib.sha256(_prompt_key(prompt).encode("utf-8")).hexdigest()[:16]


def unique_prompts(pairs: list[PreferencePair]) -> list[dict]:
    """The split's distinct prompts in first-seen order: [{"prompt_id", "prompt", "source"}]."""
    seen: dict[str, dict] = {}
    for pair in pairs:
        pid = prompt_id(pair.prompt)
        if pid not in seen:
            seen[pid] = {"prompt_id": pid, "prompt": pair.prompt, "source": pair.source}
    return list(seen.values())


def render_prompt(prompt: str | list[dict], tokenizer) -> str:
    """The text a model continues: a chat prompt through its template with the generation prompt, else as is."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def answer_ids(prompt: str | list[dict], answer: str, tokenizer, max_length: int) -> list[int]:
    """Token ids of prompt + answer exactly as training tokenizes a pair (the reward model sees both the same way),
    cut from the left to max_length so the answer's end, which the reward head reads, is kept."""
    chosen = answer if isinstance(prompt, str) else [{"role": "assistant", "content": answer}]
    pair = PreferencePair(prompt, chosen, chosen, "answer:0")
    prompt_text, completion_text, _ = _render(pair, tokenizer)
    ids = _encode(tokenizer, [prompt_text], isinstance(prompt, str))[0]
    ids = ids + _encode(tokenizer, [completion_text], False)[0]
    if isinstance(prompt, str) and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids[-max_length:]


def prompt_as_text(prompt: str | list[dict]) -> str:
    """A prompt for a judge's eyes: raw text as is, a conversation as "User: ... / Assistant: ..." turns."""
    if isinstance(prompt, str):
        return prompt
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in prompt)
