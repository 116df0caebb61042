"""Reading preference rows from files: JSON, JSON Lines, gzip, parquet, data folders and `datasets` names, each row
with where it came from (file, line or row), and the one error of unusable data (DataError)."""

from __future__ import annotations

import gzip
import json
import re
import zlib
from pathlib import Path
from typing import Any

FILE_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet")


RECORD_FIELD = "(record)"  # the field named when the whole row is unusable (not JSON, not an object)


class DataError(ValueError):
    """Unusable data. One line: "<file>: <line N | row N (0-based)>: field '<field>': <reason>" for a row,
    "<file>: <reason>" else."""

    def __init__(
        self, message: str, *, source: str | None = None, row: int | None = None, field: str | None = None
    ):
        super().__init__(message)
        self.source, self.row, self.field = source, row, field

    @classmethod
    def at(cls, source: str, where: str, field: str, reason: str) -> DataError:
        """`where` is "line N" (JSON Lines, 1-based as editors count) or "row N (0-based)" (JSON arrays, parquet,
        `datasets`)."""
        return cls(f"{source}: {where}: field '{field}': {reason}", source=source, row=where, field=field)


def location_fields(where: str) -> dict:
    """{"line": N} or {"row": N} from a location label, for the rejects file."""
    kind, _, rest = where.partition(" ")
    number = rest.split(" ", 1)[0]
    return {kind: int(number)} if number.isdigit() and kind in ("line", "row") else {}


Row = tuple[Any, "tuple[str, str] | None", str, str]  # (record, parse error (field, reason), file, where)


MAX_JSON_DEPTH = 64  # levels of nesting a row may have (a preference row needs 4)


def read_rows(path: str, name: str | None, split: str) -> tuple[str, list[Row], dict]:
    """(label, rows, notes): every row with the file it came from and its location in it; `notes` has the files
    read and the files of a data folder that were not read (named, never silently dropped)."""
    given = str(path)
    p = Path(given).expanduser()
    lower = p.name.lower()
    if p.is_file():
        if lower.endswith(FILE_SUFFIXES[:-1]):
            return given, _read_json_file(p, given), {"files": [given]}
        if lower.endswith(".parquet"):
            return given, _read_parquet(p, given), {"files": [given]}
        raise DataError(
            f"{given}: unknown file type '{p.suffix}'; use .json, .jsonl, .json.gz, .jsonl.gz or .parquet",
            source=given,
        )
    if p.is_dir():
        if any((p / f).is_file() for f in ("state.json", "dataset_dict.json")):
            return _read_datasets(given, name, split)
        return _read_folder(p, given, split)
    other_files = (".txt", ".csv", ".tsv", ".arrow", ".gz", ".zip", ".yaml", ".yml")
    if lower.endswith(FILE_SUFFIXES + other_files) or p.is_absolute() or given.startswith((".", "~")):
        raise DataError(f"{given}: no such file", source=given)
    return _read_datasets(given, name, split)  # a `datasets` (Hub) name


_SPLIT_NAME = re.compile(r"^(train|test|validation|valid|dev|eval)(?=$|[-_.])", re.IGNORECASE)


def _read_folder(folder: Path, label: str, split: str) -> tuple[str, list[Row], dict]:
    """A folder of data files, read file by file so each row's error names its file and line. Files named after a
    split (train.jsonl, test-00000-of-00001.parquet, data/train/...) are that split's, as `datasets` does; a folder
    without split names is all the train split. Other files are listed in the notes, not read."""
    files, ignored = [], []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        (files if path.name.lower().endswith(FILE_SUFFIXES) else ignored).append(path)
    if not files:
        shown = ", ".join(p.name for p in ignored[:5]) or "nothing"
        raise DataError(
            f"{label}: a folder with no data files (.json, .jsonl, .json.gz, .jsonl.gz, .parquet); it holds {shown}",
            source=label,
        )

    def split_of(path: Path) -> str | None:
        for part in reversed(path.relative_to(folder).parts):
            match = _SPLIT_NAME.match(part)
            if match:
                word = match.group(1).lower()
                return {"valid": "validation", "dev": "validation", "eval": "validation"}.get(word, word)
        return None

    by_split: dict[str, list[Path]] = {}
    for path in files:
        by_split.setdefault(split_of(path) or "train", []).append(path)
    if split not in by_split:
        raise DataError(
            f"{label}: no files of split '{split}' (file names tell the split); splits here: {', '.join(sorted(by_split))}",
            source=label,
        )
    chosen = by_split[split]
    rows: list[Row] = []
    for path in chosen:
        name = str(path)
        if path.name.lower().endswith(".parquet"):
            rows += _read_parquet(path, name)
        else:
            rows += _read_json_file(path, name)
    notes = {
        "files": [str(p) for p in chosen],
        "ignored_files": [str(p) for p in ignored],
        "other_split_files": [str(p) for s, ps in by_split.items() if s != split for p in ps],
    }
    return label, rows, notes


def _parse_json(text: str):
    """json.loads whose failures on hostile input (huge integers, deep nesting) are ValueErrors with a reason."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def _depth(value: Any) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            return depth
        level = [
            child
            for node in level
            if isinstance(node, dict | list)
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]
    return depth


def _read_json_file(path: Path, label: str) -> list[Row]:
    try:
        raw = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{label}: cannot read: {e}", source=label) from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    # Undecodable bytes become lone surrogates (\udc80-\udcff) so the JSON still parses and the check of each
    # text field names the row and field, the same way as a "\ud800" escape does.
    if path.name.lower().endswith((".json", ".json.gz")):
        text = raw.decode("utf-8", "surrogateescape")
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("["):
                raise DataError(
                    f"{label}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}", source=label
                ) from None
            whole = None  # JSON Lines in a .json file
        except (ValueError, RecursionError) as e:  # a huge integer, nesting deeper than Python's stack
            reason = "nested too deep" if isinstance(e, RecursionError) else one_line(e)
            raise DataError(f"{label}: not usable JSON: {reason}", source=label) from None
        if isinstance(whole, list):
            rows = []
            for i, record in enumerate(whole):
                error = None
                if _depth(record) > MAX_JSON_DEPTH:
                    record, error = None, (RECORD_FIELD, f"nested more than {MAX_JSON_DEPTH} levels deep")
                rows.append((record, error, label, f"row {i} (0-based)"))
            return rows
        if isinstance(whole, dict) and len(text.strip().splitlines()) > 1:
            raise DataError(
                f"{label}: the file is one JSON object; expected an array of rows or JSON Lines", source=label
            )
    rows = []  # JSON Lines: one row per non-blank line, numbered as editors number lines (from 1)
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        text = line.decode("utf-8", "surrogateescape")
        where = f"line {number}"
        try:
            rows.append((_parse_json(text), None, label, where))
        except json.JSONDecodeError as e:
            rows.append((None, (RECORD_FIELD, f"not valid JSON (column {e.colno}): {e.msg}"), label, where))
        except ValueError as e:  # a huge integer, deep nesting
            rows.append(
                (None, (RECORD_FIELD, f"not usable JSON: {str(e).splitlines()[0][:200]}"), label, where)
            )
    return rows


def _read_parquet(path: Path, label: str) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{label}: cannot read parquet: {one_line(e)}", source=label) from None
    return [(record, None, label, f"row {i} (0-based)") for i, record in enumerate(records)]


def _read_datasets(path: str, name: str | None, split: str) -> tuple[str, list[Row], dict]:
    import datasets

    label = f"{path}[{split}]" if name is None else f"{path}[{name}/{split}]"
    folder = Path(path).expanduser()
    try:
        if folder.is_dir() and any((folder / f).is_file() for f in ("state.json", "dataset_dict.json")):
            label = path
            loaded = datasets.load_from_disk(str(folder))  # a Dataset.save_to_disk folder
            if isinstance(loaded, datasets.DatasetDict):
                label = f"{path}[{split}]"
                if split not in loaded:
                    raise DataError(f"{label}: no split '{split}'; splits: {', '.join(loaded)}", source=label)
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(path, name, split=split)
    except DataError:
        raise
    except Exception as e:  # network, missing config, bad split: datasets raises many types
        raise DataError(f"{label}: cannot load with datasets: {one_line(e)}", source=label) from None
    return (
        label,
        [(record, None, label, f"row {i} (0-based)") for i, record in enumerate(loaded)],
        {"files": [label]},
    )


def one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
