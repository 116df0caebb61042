"""Hostile input, generated: bad rows of every kind in every container (JSON Lines, JSON, gzip, parquet, a data
folder), abusive settings and data limits. Each case asserts the exit (a DataError/ConfigError, exit status 2 through
the CLI), one line naming the file and line/row and the field (or the key), and that the good rows of the same file
are still used with skip_invalid. In process and fast: part of the default suite."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from iopo.cli import main as iopo_main
from iopo.config import ConfigError, DataConfig, OnlineConfig, load_config
from iopo.data import load_split
from iopo.data.formats import DataError, load_rows


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def good(i: int) -> dict:
    return {"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}


def good_chat(i: int) -> dict:
    return {
        "prompt": [user(f"question {i}?")],
        "chosen": [assistant(f"good {i}")],
        "rejected": [assistant(f"bad {i}")],
    }


def good_hh(i: int) -> dict:
    history = f"\n\nHuman: question {i}?"
    return {"chosen": history + f"\n\nAssistant: good {i}", "rejected": history + f"\n\nAssistant: bad {i}"}


def good_sharegpt(i: int) -> dict:
    return {
        "conversations": [{"from": "human", "value": f"question {i}?"}],
        "chosen": {"from": "gpt", "value": f"good {i}"},
        "rejected": {"from": "gpt", "value": f"bad {i}"},
    }


# name: (good row maker, bad row, field named, words of the reason)
BAD = {
    "standard: missing": (good, {"prompt": "p?", "chosen": "c"}, "rejected", "missing"),
    "standard: null": (good, {"prompt": "p?", "chosen": None, "rejected": "r"}, "chosen", "missing"),
    "standard: number": (good, {"prompt": "p?", "chosen": 3, "rejected": "r"}, "chosen", "expected a string"),
    "standard: empty prompt": (
        good,
        {"prompt": " ", "chosen": "c", "rejected": "r"},
        "prompt",
        "empty prompt",
    ),
    "standard: empty completion": (
        good,
        {"prompt": "p?", "chosen": "c", "rejected": ""},
        "rejected",
        "empty",
    ),
    "standard: same": (good, {"prompt": "p?", "chosen": "x", "rejected": "x"}, "rejected", "same as chosen"),
    "standard: surrogate": (
        good,
        {"prompt": "p?", "chosen": "a\ud800", "rejected": "r"},
        "chosen",
        "undecodable",
    ),
    "standard: not an object": (good, ["p", "c", "r"], "(record)", "expected a JSON object"),
    "standard: reads as another format": (
        good,
        {"chosen": "The sky is blue", "rejected": "The sky is red"},
        "prompt",
        "missing",
    ),
    "chat: empty prompt": (
        good_chat,
        {"prompt": [user("  ")], "chosen": [assistant("c")], "rejected": [assistant("r")]},
        "prompt",
        "empty prompt",
    ),
    "chat: only a system prompt": (
        good_chat,
        {
            "prompt": [{"role": "system", "content": "Be nice."}],
            "chosen": [assistant("c")],
            "rejected": [assistant("r")],
        },
        "prompt",
        "empty prompt",
    ),
    "chat: unknown role": (
        good_chat,
        {
            "prompt": [{"role": "wizard", "content": "q"}],
            "chosen": [assistant("c")],
            "rejected": [assistant("r")],
        },
        "prompt[0].role",
        "unknown role",
    ),
    "chat: reply by the user": (
        good_chat,
        {"prompt": [user("q")], "chosen": [user("c")], "rejected": [assistant("r")]},
        "chosen[0].role",
        "assistant",
    ),
    "hh: empty question": (
        good_hh,
        {"chosen": "\n\nHuman:  \n\nAssistant: a", "rejected": "\n\nHuman:  \n\nAssistant: b"},
        "prompt",
        "empty prompt",
    ),
    "hh: empty reply": (
        good_hh,
        {"chosen": "\n\nHuman: q\n\nAssistant:  ", "rejected": "\n\nHuman: q\n\nAssistant: b"},
        "chosen",
        "empty completion",
    ),
    "hh: different questions": (
        good_hh,
        {"chosen": "\n\nHuman: q1\n\nAssistant: a", "rejected": "\n\nHuman: q2\n\nAssistant: b"},
        "chosen",
        "share no",
    ),
    "hh: a row of another format": (
        good_hh,
        {"chosen": "The sky is blue", "rejected": "The sky is red"},
        "chosen",
        "Human:",
    ),
    "sharegpt: empty conversation": (
        good_sharegpt,
        {
            "conversations": [{"from": "human", "value": ""}],
            "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"},
        },
        "conversations",
        "empty prompt",
    ),
    "sharegpt: system not text": (
        good_sharegpt,
        {**good_sharegpt(99), "system": {"text": "be nice"}},
        "system",
        "expected a string",
    ),
}
PARQUET_SAFE = [  # rows Arrow can hold next to the good ones (same column types)
    "standard: null",
    "standard: empty prompt",
    "standard: empty completion",
    "standard: same",
    "hh: empty question",
    "hh: empty reply",
    "hh: different questions",
    "hh: a row of another format",
]


def _write(container: str, folder: Path, rows: list) -> tuple[Path, Path, list[str]]:
    """(path to load, the file the rows are in, each row's location label there)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    if container == "jsonl":
        path = folder / "data.jsonl"
        path.write_text("\n" + lines, encoding="utf-8")  # a blank first line: the rows are on lines 2, 3, 4
        return path, path, [f"line {i + 2}" for i in range(len(rows))]
    if container == "jsonl.gz":
        path = folder / "data.jsonl.gz"
        path.write_bytes(gzip.compress(lines.encode()))
        return path, path, [f"line {i + 1}" for i in range(len(rows))]
    if container == "json":
        path = folder / "data.json"
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
        return path, path, [f"row {i} (0-based)" for i in range(len(rows))]
    if container == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path, path, [f"row {i} (0-based)" for i in range(len(rows))]
    assert container == "folder"
    data = folder / "train-00000.jsonl"
    (folder / "train-00001.jsonl").write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    data.write_text(lines, encoding="utf-8")
    (folder / "notes.txt").write_text("not data\n", encoding="utf-8")
    return folder, data, [f"line {i + 1}" for i in range(len(rows))]


CASES = [(kind, c) for kind in BAD for c in ("jsonl", "jsonl.gz", "json", "folder")] + [
    (kind, "parquet") for kind in PARQUET_SAFE
]


@pytest.mark.parametrize(("kind", "container"), CASES, ids=[f"{k} [{c}]" for k, c in CASES])
def test_a_bad_row_is_its_own_one_line_error_and_the_good_rows_stay(tmp_path, kind, container):
    make, bad, field, reason = BAD[kind]
    rows = [make(0), bad, make(1)]
    path, file, where = _write(container, tmp_path / "d", rows)
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    message = str(info.value)
    assert "\n" not in message and len(message) < 600
    assert message.startswith(f"{file}: {where[1]}: field '{field}': "), message
    assert reason in message, message

    pairs, rejects, _, notes = load_rows(str(path), skip_invalid=True)
    good_sources = [f"{file}:{where[0]}", f"{file}:{where[2]}"]
    assert [
        p.source for p in pairs if p.source.startswith(str(file))
    ] == good_sources  # the good rows are used
    assert [(r["source"], r["where"], r["field"]) for r in rejects] == [(str(file), where[1], field)]
    json.dumps(rejects, ensure_ascii=False).encode("utf-8")  # the rejects file can be written
    if container == "folder":
        assert notes["ignored_files"] == [str(path / "notes.txt")]  # named, never silently dropped
        assert len(pairs) == 3  # the second file's row too


@pytest.mark.parametrize("make", [good, good_chat, good_hh, good_sharegpt])
def test_an_odd_first_row_does_not_decide_the_format_of_the_file(tmp_path, make):
    odd = {
        "chosen": "The sky is blue",
        "rejected": "The sky is red",
    }  # alone, it reads as the implicit format
    rows = [odd] + [make(i) for i in range(5)]
    path, file, where = _write("jsonl", tmp_path / "d", rows)
    with pytest.raises(DataError, match=rf"^{file}: line 2: field "):
        load_rows(str(path))  # the odd row is the error, not the good rows after it
    pairs, rejects, found, _ = load_rows(str(path), skip_invalid=True)
    assert len(pairs) == 5 and [r["where"] for r in rejects] == ["line 2"]
    assert (
        found
        == {good: "standard", good_chat: "conversational", good_hh: "hh", good_sharegpt: "sharegpt"}[make]
    )


def test_an_hh_looking_row_in_an_implicit_file_is_an_error_not_a_mangled_prompt(tmp_path):
    rows = [{"chosen": f"The sky is blue {i}", "rejected": f"The sky is red {i}"} for i in range(3)]
    rows.insert(1, good_hh(0))
    path, file, _ = _write("jsonl", tmp_path / "d", rows)
    with pytest.raises(
        DataError, match=r"line 3: field 'chosen': this row reads as the hh format while the file's"
    ):
        load_rows(str(path))
    with pytest.raises(
        DataError, match="line 2: field .chosen.: chosen and rejected share no"
    ):  # stated hh: row 1 is not
        load_rows(str(path), format="hh")
    pairs, _, _, _ = load_rows(str(path), format="implicit")  # stated: the user's choice, no mismatch error
    assert len(pairs) == 4


def test_hostile_json_is_a_row_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    huge_int = '{"prompt": "p?", "chosen": ' + "9" * 5000 + ', "rejected": "r"}'
    nested = json.dumps(
        {"prompt": "p?", "chosen": "c", "rejected": "r", "meta": json.loads("[" * 70 + "]" * 70)}
    )
    path = tmp_path / "hostile.jsonl"
    path.write_text("\n".join([json.dumps(good(0)), deep, huge_int, nested, json.dumps(good(1))]) + "\n")
    pairs, rejects, _, _ = load_rows(str(path), skip_invalid=True)
    assert len(pairs) == 2
    assert [(r["where"], r["field"]) for r in rejects] == [
        ("line 2", "(record)"),
        ("line 3", "(record)"),
        ("line 4", "(record)"),
    ]
    assert "nested more than 64 levels" in rejects[0]["reason"] and "nested" in rejects[2]["reason"]
    assert "integer" in rejects[1]["reason"] or "digits" in rejects[1]["reason"]
    for text in (f"[{deep}]", f"[{huge_int}]"):  # the same in a JSON array file: one line about the file
        array = tmp_path / "hostile.json"
        array.write_text(text)
        with pytest.raises(DataError) as info:
            load_rows(str(array))
        assert str(info.value).startswith(f"{array}: not usable JSON") and "\n" not in str(info.value)


def test_size_limits_are_row_errors_before_tokenization(tmp_path):
    long_row = {"prompt": "p?", "chosen": "x" * 2_000_001, "rejected": "r"}
    path, file, where = _write("jsonl", tmp_path / "d", [good(0), long_row, good(1)])
    with pytest.raises(
        DataError,
        match=r"line 3: field 'chosen': 2,000,001 characters, more than data.max_field_chars=1,000,000",
    ):
        load_rows(str(path))
    pairs, rejects, _, _ = load_rows(str(path), skip_invalid=True)
    assert len(pairs) == 2 and rejects[0]["field"] == "chosen"
    assert len(load_rows(str(path), max_field_chars=3_000_000)[0]) == 3  # a setting, not a hard wall
    with pytest.raises(DataError, match=r"3 rows, more than data.max_rows=2"):
        load_rows(str(path), max_rows=2)
    with pytest.raises(DataError, match="max_field_chars"):  # the DataConfig setting reaches the reader
        load_split(DataConfig(path=str(path), max_field_chars=100, test_size=1))


def test_data_folders_name_files_splits_and_what_they_do_not_read(tmp_path):
    folder = tmp_path / "folder"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text("".join(json.dumps(good(i)) + "\n" for i in range(6)))
    (folder / "data" / "test.jsonl").write_text(json.dumps(good(50)) + "\n" + json.dumps(good(51)) + "\n")
    (folder / "README.md").write_text("# my data\n")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.jsonl").write_text("hidden, not data\n")
    pairs, _, _, notes = load_rows(str(folder))
    assert len(pairs) == 6 and pairs[0].source == f"{folder / 'data' / 'train.jsonl'}:line 1"
    assert notes["ignored_files"] == [str(folder / "README.md")]
    assert notes["other_split_files"] == [str(folder / "data" / "test.jsonl")]
    test_pairs, _, _, _ = load_rows(str(folder), split="test")
    assert [p.chosen for p in test_pairs] == ["good answer 50", "good answer 51"]
    with pytest.raises(DataError, match=r"no files of split 'validation'.*splits here: test, train"):
        load_rows(str(folder), split="validation")
    _, _, _, report = load_split(DataConfig(path=str(folder), test_size=2))
    assert report["data_ignored_files"] == [str(folder / "README.md")]
    empty = tmp_path / "nodata"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"a folder with no data files .* it holds a.txt$"):
        load_rows(str(empty))


ABUSIVE = {
    "optim.num_epochs=1e12": "optim.num_epochs",
    "optim.max_steps=100000000000": "optim.max_steps",
    "iopo.n_iter=99999999999": "iopo.n_iter",
    "optim.learning_rate=inf": "optim.learning_rate",
    "loss.beta=nan": "loss.beta",
    "seed=-1": "seed",
    "seed=99999999999": "seed",
    "output_dir={x}": "output_dir",
    "output_dir=": "output_dir",
    "optim.batch_size=0": "optim.batch_size",
    "data.max_field_chars=0": "data.max_field_chars",
    "model.lora_r=-4": "model.lora_r",
    "iopo.epsilon=1.5": "iopo.epsilon",
    "data.test_size=-1": "data.test_size",
    "method=ppo": "method",
    "no_such_key=1": "no_such_key",
}


@pytest.mark.parametrize("override", list(ABUSIVE))
def test_abusive_settings_are_one_line_naming_the_key(override, capsys, tmp_path):
    assert (
        iopo_main(
            ["train", override, f"output_dir={tmp_path / 'r'}"]
            if not override.startswith("output_dir")
            else ["train", override]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iopo: error: ") and len(err[0]) < 1200
    assert ABUSIVE[override] in err[0]
    assert not (tmp_path / "r").exists()  # refused before anything was written


def _errors(capsys) -> list[str]:
    """iopo's error lines on stderr (progress bars of model loading may precede them), and never a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("iopo:")]


def test_absurd_schedules_are_refused_before_they_are_built(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(good(i)) + "\n" for i in range(22)))
    args = [
        "train",
        f"model={tiny_model_dir}",
        f"data={data}",
        "data.test_size=2",
        "data.max_length=64",
        "data.max_prompt_length=32",
        f"output_dir={tmp_path / 'r'}",
        "progress_bar=false",
        "tensorboard=false",
    ]
    assert (
        iopo_main([*args, "optim.num_epochs=100000", "optim.batch_size=1"]) == 2
    )  # 20 pairs x 100,000 epochs
    err = _errors(capsys)
    assert len(err) == 1 and "optimizer steps" in err[0] and "at most 1,000,000" in err[0]
    assert iopo_main([*args, "model.attn_implementation=flash_attention_2"]) == 2  # not installed here
    err = _errors(capsys)
    assert len(err) == 1 and "model.attn_implementation=flash_attention_2" in err[0]
    assert iopo_main([*args, "model.lora=true", "model.lora_target_modules=[no_such_layer]"]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "model.lora_target_modules" in err[0] and "no_such_layer" in err[0]


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for command in ("train", "online", "train-rm"):
        extra = ["judge.type=reward_model", "judge.model=x"] if command == "online" else []
        assert iopo_main([command, f"output_dir={blocker / 'run'}", *extra]) == 2
        err = _errors(capsys)
        assert len(err) == 1 and str(blocker) in err[0], err
    assert blocker.read_text() == "x"  # untouched


def test_online_settings_are_bounded_too():
    with pytest.raises(ConfigError, match="rounds x steps_per_round"):
        load_config(None, ["method=dpo", "rounds=10000", "steps_per_round=1000"], OnlineConfig)


def test_the_hostile_input_benchmark_finds_nothing_wrong(tmp_path):
    """benchmarks/hostile_input.py on a few seeded files: no traceback, no silent mangle, every bad row rejected."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "hostile_input.py"
    out = tmp_path / "hostile.json"
    done = subprocess.run(
        [sys.executable, str(script), "--files", "40", "--seed", "7", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(out.read_text())["counts"]
    assert counts["files"] > 30 and counts["bad rows"] > 20
    for key in ("tracebacks", "wrong messages", "bad rows accepted", "good rows rejected", "silent mangles"):
        assert counts[key] == 0, (key, json.loads(out.read_text())["failures"])
    assert counts["config tracebacks"] == counts["config wrong outcomes"] == 0
