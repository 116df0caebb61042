"""Preference data to pairs: a file or `datasets` name -> PreferencePair -> the prompt-grouped train/test split
(with the annotator-bias relabelling of the experiments) -> tokenized pairs, rejects written beside the run."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import replace
from pathlib import Path

from iopo.data.files import DataError
from iopo.data.formats import PreferencePair, load_rows
from iopo.data.tokenize import TokenizedPair, file_of, prompt_key, tokenize_pairs

logger = logging.getLogger(__name__)


def default_data_path() -> Path:
    """The embedded Anthropic hh-rlhf harmless-base test split (2312 multi-turn pairs, MIT); see its PROVENANCE.md."""
    return Path(__file__).resolve().parents[1] / "assets" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


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
        groups.setdefault(prompt_key(pair.prompt), []).append(i)
    if len(groups) < 2:
        raise DataError(f"{file_of(pairs)}: cannot split {n} pairs by prompt: fewer than 2 distinct prompts")
    if target >= n:
        raise DataError(f"{file_of(pairs)}: test_size {test_size} leaves no training pairs (of {n})")
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
        train_prompts = {prompt_key(p.prompt) for p in train}
        report |= {
            "test_path": cfg.test_path,
            "test_format": test_format,
            "test_rows": len(test) + len(test_rejects),
            "test_prompts_in_train": sum(prompt_key(p.prompt) in train_prompts for p in test),
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
    train, test, rejects, report = tokenized_data(cfg, tokenizer)
    keep_rejects(rejects, report, run_dir)
    return train, test, report


def tokenized_data(cfg, tokenizer) -> tuple[list[TokenizedPair], list[TokenizedPair], list[dict], dict]:
    """cfg (a DataConfig) -> (train, test, rejects, report), tokenized; nothing written (`keep_rejects` writes
    the rejects once the run folder may be written)."""
    train, test, rejects, report = load_split(cfg)
    skip_invalid = report.pop("skip_invalid")
    lengths = {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length}
    # With skip_invalid, pairs that fail at tokenization (chat template errors, no tokens) are rejects too.
    token_rejects = rejects if skip_invalid else None
    train_tokens, train_stats = tokenize_pairs(train, tokenizer, **lengths, rejects=token_rejects)
    test_tokens, test_stats = tokenize_pairs(test, tokenizer, **lengths, rejects=token_rejects)
    report |= {
        "rejected": len(rejects),
        "train_pairs": len(train_tokens),
        "test_pairs": len(test_tokens),
        "prompts_truncated": train_stats["prompts_truncated"] + test_stats["prompts_truncated"],
        "completions_truncated": train_stats["completions_truncated"] + test_stats["completions_truncated"],
        "max_tokens": max(train_stats["max_tokens"], test_stats["max_tokens"]),
    }
    return train_tokens, test_tokens, rejects, report


def keep_rejects(rejects: list[dict], report: dict, run_dir: Path | None) -> None:
    """Write the rejects into run_dir/rejects.jsonl (none: no file), say so, and name the file in the report."""
    rejects_file = write_rejects(rejects, run_dir)
    if rejects:
        logger.warning("skipped %d bad rows%s", len(rejects), f"; see {rejects_file}" if rejects_file else "")
    report["rejects_file"] = str(rejects_file) if rejects_file else None


def prompt_id(prompt: str | list[dict]) -> str:
    """A stable id of a prompt's content (the same prompt in two files gets the same id)."""

    return hashlib.sha256(prompt_key(prompt).encode("utf-8")).hexdigest()[:16]


def unique_prompts(pairs: list[PreferencePair]) -> list[dict]:
    """The split's distinct prompts in first-seen order: [{"prompt_id", "prompt", "source"}]."""
    seen: dict[str, dict] = {}
    for pair in pairs:
        pid = prompt_id(pair.prompt)
        if pid not in seen:
            seen[pid] = {"prompt_id": pid, "prompt": pair.prompt, "source": pair.source}
    return list(seen.values())


def split_prompts(cfg, split: str, max_prompts: int | None = None) -> list[dict]:
    """The distinct prompts of a split of cfg (a DataConfig), exactly as training splits the data (the first N
    when max_prompts is set)."""
    train, test, _, _ = load_split(cfg)
    return unique_prompts(pick_split(train, test, split))[:max_prompts]


def pick_split(train: list[PreferencePair], test: list[PreferencePair], split: str) -> list[PreferencePair]:
    """The pairs of split "train", "test" or "all"."""
    return {"test": test, "train": train, "all": train + test}[split]
