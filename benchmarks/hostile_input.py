"""Hostile input, counted: seeded malformed data files in every container and abusive settings, run through iopo's
readers and command line; prints and writes how each ended.

    python benchmarks/hostile_input.py [--files 300] [--seed 0] [--out benchmarks/results/hostile_input.json]

For every generated data file (JSON Lines, gzip, JSON array, parquet, a data folder; 12 rows, some mutated in one
of 20 ways), it loads the file strictly and with skip_invalid and checks:
- strict: a clean file loads; a file with a bad row raises one DataError line that names the file, the first bad
  row's line/row and a field; anything else (another exception, a multi-line message) is counted as a traceback;
- skip_invalid: every untouched row comes back exactly as it parses alone (a different result is a silent mangle),
  every bad row is in the rejects with its location, and nothing else is rejected.
Each abusive setting goes through `iopo train` in process and must exit 2 with one line naming the key (those
refused only once the run folder exists, such as a model that does not load, are counted apart). The result is the counts; the suite's tests/test_fuzz.py asserts the same rules case by case.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import random
import tempfile
import time
from pathlib import Path

from iopo.data.formats import DataError, load_rows


def good_row(kind: str, i: int) -> dict:
    if kind == "standard":
        return {"prompt": f"Question {i}: why?", "chosen": f"Because {i}.", "rejected": f"No idea {i}."}
    if kind == "conversational":
        return {
            "prompt": [{"role": "user", "content": f"Question {i}?"}],
            "chosen": [{"role": "assistant", "content": f"Answer {i}."}],
            "rejected": [{"role": "assistant", "content": f"Other {i}."}],
        }
    if kind == "hh":
        history = f"\n\nHuman: Question {i}?\n\nAssistant: Which part?\n\nHuman: All of it."
        return {
            "chosen": history + f"\n\nAssistant: Answer {i}.",
            "rejected": history + f"\n\nAssistant: Other {i}.",
        }
    return {  # sharegpt
        "conversations": [{"from": "human", "value": f"Question {i}?"}],
        "chosen": {"from": "gpt", "value": f"Answer {i}."},
        "rejected": {"from": "gpt", "value": f"Other {i}."},
    }


# mutation name -> (applies to kinds, function(row, rng) -> row or raw text); all make the row unusable
def _text_field(kind: str) -> str:
    return {"standard": "chosen", "hh": "chosen"}.get(kind, "")


def _drop(row, rng):
    key = rng.choice(sorted(row))
    return {k: v for k, v in row.items() if k != key}


def _null(row, rng):
    key = rng.choice(sorted(row))
    return {**row, key: None}


def _number(row, rng):
    return {**row, "chosen": rng.randint(-(10**6), 10**6)}


def _empty_completion(row, rng):
    if isinstance(row.get("rejected"), str) and "prompt" in row:
        return {**row, "rejected": "  "}
    if isinstance(row.get("rejected"), str):  # hh
        return {**row, "rejected": row["rejected"].rsplit("\n\nAssistant:", 1)[0] + "\n\nAssistant: "}
    if isinstance(row.get("rejected"), dict):
        return {**row, "rejected": {"from": "gpt", "value": ""}}
    return {**row, "rejected": [{"role": "assistant", "content": ""}]}


def _same(row, rng):
    return {**row, "rejected": row["chosen"]}


def _surrogate(row, rng):
    if isinstance(row.get("chosen"), str):
        return {**row, "chosen": row["chosen"] + "\ud800"}
    return {**row, "rejected": "\udcff"}


def _not_object(row, rng):
    return rng.choice([[1, 2, 3], "a string", 42, None, True])


def _huge_int(row, rng):
    return (
        "RAW",
        json.dumps({k: v for k, v in row.items() if k != "chosen"})[:-1] + ', "chosen": ' + "9" * 5000 + "}",
    )


def _deep(row, rng):
    return ("RAW", "[" * 5000 + "]" * 5000)


def _torn(row, rng):
    text = json.dumps(row)
    return ("RAW", text[: rng.randint(1, len(text) - 2)])


def _long(row, rng):
    return {**row, "rejected": "x" * 1_000_001}


def _list_for_text(row, rng):
    return (
        {**row, "chosen": ["a", "b"]}
        if "prompt" in row and isinstance(row["prompt"], str)
        else {**row, "chosen": 7}
    )


def _unknown_role(row, rng):
    if isinstance(row.get("prompt"), list):
        return {**row, "prompt": [{"role": "wizard", "content": "q"}]}
    if "conversations" in row:
        return {**row, "conversations": [{"from": "wizard", "value": "q"}]}
    return {**row, "chosen": {"role": "wizard"}}


def _empty_prompt(row, rng):
    if isinstance(row.get("prompt"), str):
        return {**row, "prompt": ""}
    if isinstance(row.get("prompt"), list):
        return {**row, "prompt": [{"role": "user", "content": " "}]}
    if "conversations" in row:
        return {**row, "conversations": [{"from": "human", "value": ""}]}
    return {
        "chosen": "\n\nHuman: \n\nAssistant: yes",
        "rejected": "\n\nHuman: \n\nAssistant: no",
    }


def _parted(row, rng):
    if "prompt" in row or "conversations" in row:
        return {**row, "chosen": 3.5}
    return {**row, "chosen": row["chosen"] + "\n\nHuman: and then?\n\nAssistant: more."}


def _other_format(row, rng):
    return (
        {"chosen": "The sky is blue.", "rejected": "The sky is red."}
        if "prompt" in row or "conversations" in row
        else {"prompt": 5}
    )


def _system_not_text(row, rng):
    return {**row, "system": {"x": 1}} if "conversations" in row else {**row, "chosen": {"nested": True}}


MUTATIONS = {
    "drop a field": _drop,
    "null a field": _null,
    "number for text": _number,
    "empty completion": _empty_completion,
    "chosen == rejected": _same,
    "lone surrogate": _surrogate,
    "not an object": _not_object,
    "huge integer": _huge_int,
    "deep nesting": _deep,
    "torn JSON": _torn,
    "field over the size limit": _long,
    "list for text": _list_for_text,
    "unknown role": _unknown_role,
    "empty prompt": _empty_prompt,
    "parted histories / wrong type": _parted,
    "a row of another format": _other_format,
    "non-text system / object for text": _system_not_text,
}
RAW_ONLY = {"huge integer", "deep nesting", "torn JSON"}  # JSON text that only JSON Lines can carry per row
CONTAINERS = ("jsonl", "jsonl.gz", "json", "parquet", "folder")


def write(container: str, folder: Path, rows: list) -> tuple[Path, Path, list[str]]:
    """(path to load, file holding the rows, location label of each row)."""
    folder.mkdir(parents=True)
    lines = [r[1] if isinstance(r, tuple) else json.dumps(r) for r in rows]
    if container in ("jsonl", "folder"):
        name = "train-00000.jsonl" if container == "folder" else "data.jsonl"
        file = folder / name
        file.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
        if container == "folder":
            (folder / "README.txt").write_text("not data")
        return (folder if container == "folder" else file), file, [f"line {i + 1}" for i in range(len(rows))]
    if container == "jsonl.gz":
        file = folder / "data.jsonl.gz"
        file.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")))
        return file, file, [f"line {i + 1}" for i in range(len(rows))]
    if container == "json":
        file = folder / "data.json"
        file.write_text(json.dumps(rows), encoding="utf-8")
        return file, file, [f"row {i} (0-based)" for i in range(len(rows))]
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = folder / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), file)
    # Arrow takes its columns from the first row and adds nulls: a key only a later row has is dropped on the way.
    stored = [
        {k: v for k, v in read.items() if k in row or v is not None}
        for read, row in zip(pq.read_table(file).to_pylist(), rows, strict=True)
    ]
    if stored != rows:
        raise ValueError("Arrow did not store these rows as they are")
    return file, file, [f"row {i} (0-based)" for i in range(len(rows))]


def probe_file(rng: random.Random, root: Path, index: int, counts: dict, failures: list) -> None:
    kind = rng.choice(["standard", "conversational", "hh", "sharegpt"])
    container = rng.choice(CONTAINERS)
    rows = [good_row(kind, i) for i in range(12)]
    names = list(MUTATIONS)
    if container != "jsonl" and container != "folder" and container != "jsonl.gz":
        names = [n for n in names if n not in RAW_ONLY]
    bad: dict[int, str] = {}
    for position in rng.sample(range(12), rng.randint(0, 3)):
        name = rng.choice(names)
        rows[position] = MUTATIONS[name](rows[position], rng)
        bad[position] = name
    try:
        path, file, where = write(container, root / f"f{index}", rows)
    except Exception:  # Arrow cannot hold the mixed types: a file nobody could have written; not a probe
        counts["skipped (not writable in this container)"] += 1
        return
    counts["files"] += 1
    counts["bad rows"] += len(bad)
    # strict
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            pairs, _, _, _ = load_rows(str(path))
        if bad:
            failures.append(
                f"{file}: loaded although rows {sorted(bad)} are bad ({sorted(set(bad.values()))})"
            )
            counts["bad rows accepted"] += 1
        else:
            counts["clean files loaded"] += 1
    except DataError as e:
        message = str(e)
        first = min(bad) if bad else None
        if "\n" in message or first is None or not message.startswith(f"{file}: {where[first]}: field '"):
            failures.append(
                f"{container}/{kind}: strict error not one line naming the first bad row: {message[:300]}"
            )
            counts["wrong messages"] += 1
        else:
            counts["one-line errors"] += 1
    except Exception as e:  # noqa: BLE001 - the point is to count them
        counts["tracebacks"] += 1
        failures.append(f"{container}/{kind} {sorted(set(bad.values()))}: {type(e).__name__}: {str(e)[:200]}")
        return
    # skip_invalid: good rows exact, bad rows rejected with their location
    try:
        pairs, rejects, _, _ = load_rows(str(path), skip_invalid=True)
    except Exception as e:  # noqa: BLE001
        counts["tracebacks"] += 1
        failures.append(f"skip_invalid {container}/{kind}: {type(e).__name__}: {str(e)[:200]}")
        return
    expected = {}
    for i in range(12):
        if i not in bad:
            expected[f"{file}:{where[i]}"] = good_row(kind, i)
    got = {p.source: p for p in pairs}
    for source, row in expected.items():
        alone_dir = root / f"alone{index}"
        alone_dir.mkdir(exist_ok=True)
        alone = alone_dir / "one.jsonl"
        alone.write_text(json.dumps(row) + "\n")
        (reference,), _, _, _ = load_rows(str(alone))
        pair = got.get(source)
        if pair is None:
            counts["good rows rejected"] += 1
            failures.append(f"{source}: a good row was rejected")
        elif (pair.prompt, pair.chosen, pair.rejected) != (
            reference.prompt,
            reference.chosen,
            reference.rejected,
        ):
            counts["silent mangles"] += 1
            failures.append(f"{source}: parsed differently than alone")
        else:
            counts["good rows kept exactly"] += 1
    rejected = {r["where"] for r in rejects}
    for i in bad:
        if where[i] in rejected:
            counts["bad rows rejected with location"] += 1
        else:
            counts["bad rows accepted"] += 1
            failures.append(f"{file}: {where[i]} ({bad[i]}) was not rejected")


ABUSIVE = [
    "optim.num_epochs=1e12",
    "optim.max_steps=100000000000",
    "iopo.n_iter=99999999999",
    "iopo.n_mu=0",
    "optim.learning_rate=inf",
    "optim.learning_rate=-1",
    "loss.beta=nan",
    "loss.beta=0",
    "seed=-1",
    "seed=99999999999",
    "output_dir={x}",
    "output_dir={method",
    "output_dir=",
    "optim.batch_size=0",
    "optim.batch_size=1.5",
    "data.max_field_chars=0",
    "model.lora_r=-4",
    "iopo.epsilon=1.5",
    "data.test_size=-1",
    "method=ppo",
    "no_such_key=1",
    "model.dtype=int8",
    "data.max_prompt_length=600",
    "data.format=csv",
    "optim.lr_scheduler=cyclic",
    "iopo.is_clip=none",
    "mixed_precision=fp8",
    "data.columns=[1,2]",
    "model=[unclosed",
    "save_total_limit=0",
    "optim.warmup_ratio=1",
    "optim.adam_beta1=1",
    "logging_steps=-3",
    "eval_steps=0",
    "model.lora_alpha=-1",
    "data.columns.answer=x",
]


def probe_configs(root: Path, counts: dict, failures: list) -> None:
    from iopo.cli import main

    for number, override in enumerate(ABUSIVE):
        run = root / f"cfg-run-{number}"
        args = (
            ["train", override]
            if override.startswith("output_dir")
            else ["train", override, f"output_dir={run}"]
        )
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(args)
        except BaseException as e:  # noqa: BLE001
            counts["config tracebacks"] += 1
            failures.append(f"{override}: {type(e).__name__}: {str(e)[:200]}")
            continue
        lines = [line for line in err.getvalue().splitlines() if line.startswith("iopo:")]
        key = override.split("=", 1)[0]
        if code == 2 and len(lines) == 1 and (key in lines[0] or key.split(".")[-1] in lines[0]):
            counts["config one-line errors"] += 1
            if run.exists():  # refused after the run folder was made (a model or data that does not load)
                counts["config errors after the run folder was made"] += 1
        else:
            counts["config wrong outcomes"] += 1
            failures.append(f"{override}: exit {code}, {lines}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/hostile_input.json")
    args = parser.parse_args()
    keys = [
        "files",
        "clean files loaded",
        "bad rows",
        "one-line errors",
        "wrong messages",
        "tracebacks",
        "bad rows rejected with location",
        "bad rows accepted",
        "good rows kept exactly",
        "good rows rejected",
        "silent mangles",
        "skipped (not writable in this container)",
        "config one-line errors",
        "config errors after the run folder was made",
        "config wrong outcomes",
        "config tracebacks",
    ]
    counts = dict.fromkeys(keys, 0)
    failures: list[str] = []
    rng = random.Random(args.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.files):
            probe_file(rng, Path(tmp), index, counts, failures)
        probe_configs(Path(tmp), counts, failures)
    result = {
        "files_generated": args.files,
        "seed": args.seed,
        "mutations": list(MUTATIONS),
        "containers": list(CONTAINERS),
        "abusive_settings": len(ABUSIVE),
        "counts": counts,
        "failures": failures[:50],
        "seconds": round(time.perf_counter() - started, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for key in keys:
        print(f"{key:>45}: {counts[key]}")
    for failure in failures[:20]:
        print("FAIL", failure)
    print(
        f"[hostile_input] {args.files} files, {len(ABUSIVE)} settings in {result['seconds']}s -> {args.out}"
    )


if __name__ == "__main__":
    main()
