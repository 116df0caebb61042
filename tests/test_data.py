"""iopo.data: every row format, file type and bad-row kind; the prompt-grouped split; tokenization and the masks."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import torch

from iopo.config import DataConfig
from iopo.data import (
    DataError,
    PreferencePair,
    TokenizedPair,
    collate_pairs,
    default_data_path,
    load_pairs,
    load_split,
    load_training_data,
    relabel_pairs,
    split_by_prompt,
    tokenize_pairs,
)

from tiny import build_tokenizer

HH_SHA256 = "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03"
HH_EMPTY_REPLY_LINES = [87, 517, 926, 1104]  # as an editor numbers the lines of test.jsonl
HH_PARTED_LINES = [1255, 1689, 1951, 1953, 2037]  # chosen and rejected differ before the last reply


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def standard_row(i: int) -> dict:
    return {"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"}


# --- formats on small rows -------------------------------------------------------------------------------------


def test_standard_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [standard_row(0), {**standard_row(1), "extra": [1, 2]}])
    pairs, rejects = load_pairs(str(path))
    assert rejects == []
    assert pairs == [
        PreferencePair("question 0", "good 0", "bad 0", f"{path}:line 1"),
        PreferencePair("question 1", "good 1", "bad 1", f"{path}:line 2"),
    ]


def test_conversational_rows_accept_from_value_and_single_messages(tmp_path):
    row = {
        "prompt": [{"from": "system", "value": "Be brief."}, {"role": "human", "content": "Hi?"}],
        "chosen": [
            {"role": "gpt", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "!"}]}
        ],
        "rejected": {"role": "assistant", "content": "Go away.", "loss_weight": 1.0},
    }
    (pair,), _ = load_pairs(str(write_jsonl(tmp_path / "c.jsonl", [row])))
    assert pair.prompt == [{"role": "system", "content": "Be brief."}, user("Hi?")]
    assert pair.chosen == [assistant("Hello!")]
    assert pair.rejected == [assistant("Go away.")]


def test_implicit_prompt_is_the_longest_common_message_prefix(tmp_path):
    history = [user("a"), assistant("b"), user("c")]
    row = {"chosen": history + [assistant("yes")], "rejected": history + [assistant("no")]}
    (pair,), _ = load_pairs(str(write_jsonl(tmp_path / "i.jsonl", [row])))
    assert pair.prompt == history
    assert (pair.chosen, pair.rejected) == ([assistant("yes")], [assistant("no")])


def test_full_conversations_win_over_a_string_prompt_column(tmp_path):
    # orpo-dpo-mix / capybara layout: "prompt" repeats the first user turn, the history is only in chosen/rejected.
    history = [user("first"), assistant("reply"), user("second")]
    row = {"prompt": "first", "chosen": history + [assistant("A")], "rejected": history + [assistant("B")]}
    (pair,), _ = load_pairs(str(write_jsonl(tmp_path / "o.jsonl", [row])))
    assert pair.prompt == history


def test_implicit_strings_follow_trl_extract_prompt(tmp_path):
    row = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    (pair,), _ = load_pairs(str(write_jsonl(tmp_path / "s.jsonl", [row])))
    assert (pair.prompt, pair.chosen, pair.rejected) == ("The sky is", " blue.", " green.")


def test_hh_transcripts_become_messages(tmp_path):
    history = "\n\nHuman: Hi there\n\nAssistant:  Hello.\n\nAssistant: More.\n\nHuman: Tell me a joke"
    row = {"chosen": history + "\n\nAssistant: A funny one. ", "rejected": history + "\n\nAssistant: No."}
    (pair,), _ = load_pairs(str(write_jsonl(tmp_path / "hh.jsonl", [row])))
    # Two Assistant turns in a row are merged, so templates that require alternation still render.
    assert pair.prompt == [user("Hi there"), assistant("Hello.\n\nMore."), user("Tell me a joke")]
    assert (pair.chosen, pair.rejected) == ([assistant("A funny one.")], [assistant("No.")])


def test_hh_conversations_that_part_before_the_last_reply_are_a_row_error(tmp_path):
    # chosen goes on for two more turns where rejected ends: its "completion" would hold the other history.
    history = "\n\nHuman: Q"
    row = {
        "chosen": history + "\n\nAssistant: Sure.\n\nHuman: ok\n\nAssistant: done",
        "rejected": history + "\n\nAssistant: No.",
    }
    path = write_jsonl(tmp_path / "hh.jsonl", [row])
    with pytest.raises(
        DataError, match=r"line 1: field 'chosen': chosen and rejected differ before their last reply"
    ):
        load_pairs(str(path))
    # A reply that only mentions a role without a new turn is fine.
    ok = {
        "chosen": history + "\n\nAssistant: A Human: could say that.",
        "rejected": history + "\n\nAssistant: No.",
    }
    (pair,), _ = load_pairs(str(write_jsonl(tmp_path / "ok.jsonl", [ok])))
    assert pair.chosen == [assistant("A Human: could say that.")]


def test_sharegpt_rows_with_system_column(tmp_path):
    row = {
        "conversations": [{"from": "human", "value": "2+2?"}],
        "system": "You are a calculator.",
        "chosen": {"from": "gpt", "value": "4"},
        "rejected": {"from": "gpt", "value": "5"},
    }
    (pair,), _ = load_pairs(str(write_jsonl(tmp_path / "g.jsonl", [row])))
    assert pair.prompt == [{"role": "system", "content": "You are a calculator."}, user("2+2?")]
    assert (pair.chosen, pair.rejected) == ([assistant("4")], [assistant("5")])


def test_explicit_format_is_honoured(tmp_path):
    row = {"chosen": "\n\nHuman: Q\n\nAssistant: yes", "rejected": "\n\nHuman: Q\n\nAssistant: no"}
    path = str(write_jsonl(tmp_path / "hh.jsonl", [row]))
    (as_hh,), _ = load_pairs(path)
    (as_text,), _ = load_pairs(path, format="implicit")
    assert as_hh.prompt == [user("Q")]
    assert (as_text.prompt, as_text.chosen) == ("\n\nHuman: Q\n\nAssistant:", " yes")
    with pytest.raises(DataError, match=r"line 1: field 'prompt': missing"):
        load_pairs(path, format="standard")


def test_columns_take_dotted_paths_with_list_indices(tmp_path):
    row = {"question": {"text": "Q"}, "response": ["safe", "unsafe"]}
    path = str(write_jsonl(tmp_path / "p.jsonl", [row]))
    columns = {"prompt": "question.text", "chosen": "response.0", "rejected": "response.1"}
    (pair,), _ = load_pairs(path, columns=columns)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Q", "safe", "unsafe")
    with pytest.raises(DataError, match="cannot map 'answer'"):
        load_pairs(path, columns={"answer": "response.0"})


# --- file types --------------------------------------------------------------------------------------------------


def test_file_types_give_the_same_pairs(tmp_path):
    rows = [standard_row(i) for i in range(3)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    (tmp_path / "lines.json").write_text(text, encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n" + text.replace("\n", "\r\n") + "\n\n", encoding="utf-8")
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "d.json.gz").write_bytes(gzip.compress(json.dumps(rows).encode()))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "e.parquet")
    expected = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    where = {
        "a.json": [f"row {i} (0-based)" for i in range(3)],
        "lines.json": [f"line {i}" for i in (1, 2, 3)],
        "b.jsonl": [
            f"line {i}" for i in (2, 3, 4)
        ],  # a blank first line: line numbers as an editor shows them
        "c.jsonl.gz": [f"line {i}" for i in (1, 2, 3)],
        "d.json.gz": [f"row {i} (0-based)" for i in range(3)],
        "e.parquet": [f"row {i} (0-based)" for i in range(3)],
    }
    for name, places in where.items():
        pairs, _ = load_pairs(str(tmp_path / name))
        assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == expected, name
        assert [p.source for p in pairs] == [f"{tmp_path / name}:{w}" for w in places], name


def test_datasets_save_to_disk_folders(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [standard_row(i) for i in range(4)]
    Dataset.from_list(rows).save_to_disk(tmp_path / "one")
    DatasetDict({"train": Dataset.from_list(rows[:3]), "test": Dataset.from_list(rows[3:])}).save_to_disk(
        tmp_path / "dd"
    )
    pairs, _ = load_pairs(str(tmp_path / "one"))
    assert [p.chosen for p in pairs] == ["good 0", "good 1", "good 2", "good 3"]
    test_pairs, _ = load_pairs(str(tmp_path / "dd"), split="test")
    assert [(p.chosen, p.source) for p in test_pairs] == [
        ("good 3", f"{tmp_path / 'dd'}[test]:row 0 (0-based)")
    ]
    with pytest.raises(DataError, match=r"no split 'validation'; splits: train, test"):
        load_pairs(str(tmp_path / "dd"), split="validation")


def test_file_level_errors_are_one_line(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\n", encoding="utf-8")
    (tmp_path / "broken.json").write_text('[{"prompt": "a",\n  "chosen": }]', encoding="utf-8")
    (tmp_path / "obj.json").write_text('{\n "data": []\n}', encoding="utf-8")
    cases = {
        str(tmp_path / "missing.jsonl"): "no such file",
        "missing.csv": "no such file",
        str(tmp_path / "d.csv"): "unknown file type '.csv'",
        str(tmp_path / "broken.json"): "not valid JSON (line 2, column 13)",
        str(tmp_path / "obj.json"): "one JSON object",
    }
    for path, reason in cases.items():
        with pytest.raises(DataError) as info:
            load_pairs(path)
        assert str(info.value).startswith(f"{path}: ") and reason in str(info.value)
        assert "\n" not in str(info.value)


# --- bad rows ----------------------------------------------------------------------------------------------------

GOOD = standard_row(0)
BAD_ROWS = {
    # name: (bad row, kwargs, field, reason)
    "missing field": ({"prompt": "p", "chosen": "c"}, {}, "rejected", "missing"),
    "null field": ({"prompt": "p", "chosen": None, "rejected": "r"}, {}, "chosen", "missing"),
    "number": ({"prompt": "p", "chosen": 3, "rejected": "r"}, {}, "chosen", "expected a string, got number"),
    "empty completion": (
        {"prompt": "p", "chosen": "c", "rejected": " \n"},
        {},
        "rejected",
        "empty completion",
    ),
    "empty prompt": ({"prompt": "", "chosen": "c", "rejected": "r"}, {}, "prompt", "empty prompt"),
    "chosen == rejected": (
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {},
        "rejected",
        "same as chosen",
    ),
    "lone surrogate": (
        {"prompt": "p", "chosen": "a\ud800b", "rejected": "r"},
        {},
        "chosen",
        "undecodable text",
    ),
    "not an object": (["p", "c", "r"], {}, "(record)", "expected a JSON object, got list"),
    "mapped path missing": (
        {"prompt": "p", "response": ["c"]},
        {"columns": {"chosen": "response.0", "rejected": "response.1"}},
        "response.1",
        "missing",
    ),
}
MESSAGE_ROWS = {
    "message without content": (
        {"prompt": [user("q")], "chosen": [{"role": "assistant"}], "rejected": [assistant("r")]},
        "chosen[0].content",
        "missing",
    ),
    "unknown role": (
        {
            "prompt": [{"role": "wizard", "content": "q"}],
            "chosen": [assistant("c")],
            "rejected": [assistant("r")],
        },
        "prompt[0].role",
        "unknown role 'wizard'",
    ),
    "completion not assistant": (
        {"prompt": [user("q")], "chosen": [user("c")], "rejected": [assistant("r")]},
        "chosen[0].role",
        "must start with an assistant message",
    ),
    "empty reply message": (
        {"prompt": [user("q")], "chosen": [assistant("c")], "rejected": [assistant("  ")]},
        "rejected[0].content",
        "empty completion",
    ),
    "implicit: no shared prefix": (
        {"chosen": [user("q"), assistant("c")], "rejected": [user("other"), assistant("r")]},
        "chosen",
        "share no prompt messages",
    ),
    "implicit: remainder not assistant": (
        {"chosen": [user("q"), assistant("c")], "rejected": [user("q"), user("again"), assistant("r")]},
        "rejected[1].role",
        "must start with an assistant message",
    ),
    "implicit: nothing left": (
        {"chosen": [user("q"), assistant("c")], "rejected": [user("q")]},
        "rejected",
        "no completion",
    ),
    "content part not text": (
        {
            "prompt": [user("q")],
            "chosen": [assistant("c")],
            "rejected": [{"role": "assistant", "content": [{"type": "image"}]}],
        },
        "rejected[0].content[0].type",
        "only text content",
    ),
}


def _check_bad_row(path: Path, field: str, reason: str, record, **kwargs):
    with pytest.raises(DataError) as info:
        load_pairs(str(path), **kwargs)
    message = str(info.value)
    assert message.startswith(f"{path}: line 2: field '{field}': ") and reason in message, message
    assert "\n" not in message
    assert (info.value.row, info.value.field) == ("line 2", field)

    pairs, rejects = load_pairs(str(path), skip_invalid=True, **kwargs)
    assert [p.source for p in pairs] == [f"{path}:line 1", f"{path}:line 3"]  # the good rows remain
    assert len(rejects) == 1
    reject = rejects[0]
    assert {k: reject[k] for k in ("source", "where", "line", "field")} == {
        "source": str(path),
        "where": "line 2",
        "line": 2,
        "field": field,
    }
    assert reason in reject["reason"]
    assert reject["record"] == record
    json.dumps(reject, ensure_ascii=False).encode("utf-8")  # a rejects.jsonl line can be written


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_bad_rows(tmp_path, kind):
    bad, kwargs, field, reason = BAD_ROWS[kind]
    good = {"prompt": "p", "response": ["c", "r"]} if "columns" in kwargs else GOOD
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad, good])
    record = json.loads(
        json.dumps(bad).replace("\\ud800", "\\ufffd")
    )  # rejects keep the row, made UTF-8 safe
    _check_bad_row(path, field, reason, record, **kwargs)


@pytest.mark.parametrize("kind", list(MESSAGE_ROWS))
def test_bad_message_rows(tmp_path, kind):
    bad, field, reason = MESSAGE_ROWS[kind]
    if "prompt" in bad:
        good = {"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [assistant("b")]}
    else:  # implicit prompt
        good = {"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]}
    _check_bad_row(write_jsonl(tmp_path / "bad.jsonl", [good, bad, good]), field, reason, bad)


def test_undecodable_bytes_and_invalid_json_name_their_row(tmp_path):
    good = json.dumps(GOOD).encode()
    bad_text = b'{"prompt": "p", "chosen": "caf\xe9", "rejected": "r"}'  # latin-1, not UTF-8
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b"\n".join([good, bad_text, good, b'{"prompt": ', good]) + b"\n")
    with pytest.raises(DataError, match=rf"^{path}: line 2: field 'chosen': undecodable text"):
        load_pairs(str(path))
    pairs, rejects = load_pairs(str(path), skip_invalid=True)
    assert [p.source for p in pairs] == [f"{path}:line 1", f"{path}:line 3", f"{path}:line 5"]
    assert [(r["line"], r["field"]) for r in rejects] == [(2, "chosen"), (4, "(record)")]
    assert rejects[0]["record"]["chosen"] == "caf\ufffd"
    assert rejects[1]["reason"].startswith("not valid JSON (column 12")
    assert rejects[1]["record"] is None


def test_hh_bad_rows(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: Q\n\nAssistant: yes", "rejected": "\n\nHuman: Q\n\nAssistant: no"},
        {"chosen": "\n\nHuman: Q\n\nAssistant: ", "rejected": "\n\nHuman: Q\n\nAssistant: no"},
        {"chosen": "\n\nHuman: Q\n\nAssistant: same", "rejected": "\n\nHuman: Q\n\nAssistant: same"},
        {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},
        {"chosen": "\n\nHuman: Q\n\nAssistant: yes", "rejected": 7},
    ]
    pairs, rejects = load_pairs(str(write_jsonl(tmp_path / "hh.jsonl", rows)), skip_invalid=True)
    assert len(pairs) == 1
    assert [(r["line"], r["field"], r["reason"]) for r in rejects] == [
        (2, "chosen", "empty completion"),
        (3, "rejected", "same as chosen"),
        (4, "chosen", "chosen and rejected share no '\\n\\nHuman: … \\n\\nAssistant:' history"),
        (5, "rejected", "expected a string, got number"),
    ]


def test_unknown_layout_is_a_file_level_error(tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", [{"messages": [user("q")], "label": True}])
    with pytest.raises(DataError, match=r"cannot tell the format from the keys \['label', 'messages'\]"):
        load_pairs(str(path), skip_invalid=True)


# --- the real shared files ---------------------------------------------------------------------------------------


def test_hh_rlhf_harmless_base(shared_data):
    path = str(shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz")
    with pytest.raises(DataError, match=rf"^{path}: line 87: field 'chosen': empty completion$"):
        load_pairs(path)
    pairs, rejects = load_pairs(path, skip_invalid=True)
    assert len(pairs) == 2303
    assert [r["line"] for r in rejects] == sorted(HH_EMPTY_REPLY_LINES + HH_PARTED_LINES)
    reasons = {r["line"]: r["reason"] for r in rejects}
    assert all(reasons[line] == "empty completion" for line in HH_EMPTY_REPLY_LINES)
    assert all(reasons[line].startswith("chosen and rejected differ before") for line in HH_PARTED_LINES)
    for pair in pairs:
        roles = [m["role"] for m in pair.prompt]
        assert roles[0] == "user" and roles[-1] == "user"
        assert all(a != b for a, b in zip(roles, roles[1:], strict=False))  # alternating after merging
        assert [m["role"] for m in pair.chosen + pair.rejected] == ["assistant", "assistant"]
    first = pairs[0]
    assert len(first.prompt) == 5  # a 3-turn history
    assert first.prompt[0] == user("what are some pranks with a pen i can do?")
    assert first.chosen[0]["content"].startswith("No, sorry!")
    assert sum(len(p.prompt) > 1 for p in pairs) > 1500  # mostly multi-turn
    assert not any("\n\nHuman:" in m["content"] for p in pairs for m in p.prompt)


def test_llamafactory_sharegpt_demo(shared_data):
    pairs, _ = load_pairs(str(shared_data / "llamafactory-demo" / "dpo_en_demo.json"))
    assert len(pairs) == 300
    assert sum(p.prompt[0]["role"] == "system" for p in pairs) == 80
    assert all(p.prompt[-1]["role"] == "user" for p in pairs)
    assert all(p.chosen[0]["role"] == "assistant" and len(p.chosen) == 1 for p in pairs)
    assert sum(sum(m["role"] == "user" for m in p.prompt) >= 3 for p in pairs) == 105  # multi-turn rows


def test_llamafactory_v1_content_parts_via_columns(shared_data):
    path = str(shared_data / "llamafactory-demo" / "v1_dpo_demo.jsonl")
    columns = {"chosen": "chosen_messages", "rejected": "rejected_messages"}
    pairs, _ = load_pairs(path, columns=columns)
    assert len(pairs) == 10
    first = pairs[0]
    assert [m["role"] for m in first.prompt] == ["system", "user"]
    assert first.prompt[0]["content"].startswith("You are an AI assistant.")
    assert first.chosen[0]["content"].startswith("Abdulah Hasanagic is the proud owner")
    assert first.rejected[0]["content"].startswith(" Abdulah")  # content is kept as written
    with pytest.raises(DataError, match="cannot tell the format"):
        load_pairs(path)  # its keys need the mapping


def test_pku_saferlhf_via_response_indices(shared_data):
    path = str(shared_data / "pku-saferlhf-realign-dpo-5k" / "pku_seferlhf_realign_dpo_5k.json")
    pairs, _ = load_pairs(path, columns={"chosen": "response.0", "rejected": "response.1"})
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    assert len(pairs) == 5135
    assert (pairs[7].prompt, pairs[7].chosen, pairs[7].rejected) == (raw[7]["prompt"], *raw[7]["response"])
    assert len({p.prompt for p in pairs}) == 930  # heavy duplication: the split must group by prompt


def test_ultrafeedback_sample(shared_data):
    path = str(shared_data / "ultrafeedback-binarized-sample" / "train_clean.jsonl")
    with pytest.raises(DataError, match=r"line 307: field 'rejected': same as chosen"):
        load_pairs(path)
    pairs, rejects = load_pairs(path, skip_invalid=True)
    assert len(pairs) == 994 and all(isinstance(p.prompt, str) for p in pairs)
    assert [(r["line"], r["field"], r["reason"]) for r in rejects] == [
        (307, "rejected", "same as chosen"),
        (479, "rejected", "empty completion"),
        (656, "rejected", "same as chosen"),
        (834, "chosen", "empty completion"),
        (911, "rejected", "same as chosen"),
        (998, "rejected", "same as chosen"),
    ]
    assert (
        rejects[0]["record"]["source_index"]
        == json.loads(Path(path).read_bytes().split(b"\n")[306])["source_index"]
    )


# --- split -------------------------------------------------------------------------------------------------------


def _pairs_with_groups(sizes: list[int]) -> list[PreferencePair]:
    return [
        PreferencePair(f"prompt {g}", f"c{g}.{k}", f"r{g}.{k}", f"f:{g}.{k}")
        for g, n in enumerate(sizes)
        for k in range(n)
    ]


def test_split_by_prompt_sizes_and_determinism():
    pairs = _pairs_with_groups([1] * 50)
    train, test = split_by_prompt(pairs, 0.2, seed=1)
    assert (len(train), len(test)) == (40, 10)
    assert split_by_prompt(pairs, 0.2, seed=1) == (train, test)
    assert split_by_prompt(pairs, 0.2, seed=2) != (train, test)
    assert len(split_by_prompt(pairs, 7, seed=1)[1]) == 7
    assert len(split_by_prompt(pairs, 0.001, seed=1)[1]) == 1  # at least one pair
    assert sorted(p.source for p in train + test) == sorted(p.source for p in pairs)


def test_split_by_prompt_keeps_each_prompt_on_one_side():
    pairs = _pairs_with_groups([5, 1, 3, 1, 2, 8, 1, 1, 4, 2, 6, 1] * 3)
    for seed in range(5):
        train, test = split_by_prompt(pairs, 0.25, seed=seed)
        assert not {p.prompt for p in train} & {p.prompt for p in test}
        assert 0 < len(test) <= round(0.25 * len(pairs))
        assert len(train) + len(test) == len(pairs)
    # Message prompts group by content.
    messages = [
        PreferencePair([user(f"q{i % 3}")], [assistant("a")], [assistant("b")], f"f:{i}") for i in range(9)
    ]
    train, test = split_by_prompt(messages, 0.3, seed=0)
    assert len(test) == 3 and len({json.dumps(p.prompt) for p in test}) == 1


def test_split_by_prompt_errors():
    with pytest.raises(DataError, match="fewer than 2 distinct prompts"):
        split_by_prompt(_pairs_with_groups([4]), 0.5, seed=0)
    with pytest.raises(DataError, match="leaves no training pairs"):
        split_by_prompt(_pairs_with_groups([1, 1]), 2, seed=0)


# --- tokenization and collation ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bos_tokenizer():
    """The tiny tokenizer, but adding <|endoftext|> as a BOS like Llama's does (for string prompts)."""
    from tokenizers import processors

    tok = build_tokenizer()
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    return tok


def _completion_text(batch, row, tokenizer):
    return tokenizer.decode(batch["input_ids"][row][batch["completion_mask"][row]])


def test_message_pairs_mask_exactly_the_reply_tokens(tokenizer):
    pair = PreferencePair(
        [user("How do I bake bread?")], [assistant("Knead it.")], [assistant("No idea!")], "f:0"
    )
    (tok,), stats = tokenize_pairs([pair], tokenizer, max_length=256, max_prompt_length=128)
    longest = len(tok.prompt_ids) + max(len(tok.chosen_ids), len(tok.rejected_ids))
    assert stats == {"pairs": 1, "prompts_truncated": 0, "completions_truncated": 0, "max_tokens": longest}
    assert (
        tokenizer.decode(tok.prompt_ids)
        == "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n"
    )
    batch = collate_pairs([tok], tokenizer.pad_token_id)
    # The template closes the turn, so the end-of-turn tokens count as completion (TRL's convention).
    assert _completion_text(batch, 0, tokenizer) == "Knead it.<|im_end|>\n"
    assert _completion_text(batch, 1, tokenizer) == "No idea!<|im_end|>\n"


def test_string_pairs_get_bos_from_the_tokenizer_and_eos_appended(bos_tokenizer):
    pair = PreferencePair("What is the capital of France?", " Paris.", " Rome.", "f:0")
    (tok,), _ = tokenize_pairs([pair], bos_tokenizer, max_length=64, max_prompt_length=32)
    assert tok.prompt_ids[0] == bos_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tok.chosen_ids[-1] == bos_tokenizer.eos_token_id
    assert bos_tokenizer.decode(tok.chosen_ids) == " Paris.<|im_end|>"
    batch = collate_pairs([tok], bos_tokenizer.pad_token_id)
    assert _completion_text(batch, 1, bos_tokenizer) == " Rome.<|im_end|>"
    prompt_part = (
        batch["attention_mask"][0].bool() & ~batch["completion_mask"][0]
    )  # row 0 is padded: " Rome." is longer
    assert bos_tokenizer.decode(batch["input_ids"][0][prompt_part]) == (
        "<|endoftext|>What is the capital of France?"
    )


def test_collate_right_pads_and_orders_chosen_then_rejected(tokenizer):
    pairs = [
        TokenizedPair([5, 6], [7], [8, 9, 10], "f:0"),
        TokenizedPair([11], [12, 13], [14], "f:1"),
    ]
    batch = collate_pairs(pairs, pad_token_id=0)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 0, 0],
        [11, 12, 13, 0, 0],
        [5, 6, 8, 9, 10],
        [11, 14, 0, 0, 0],
    ]
    assert batch["attention_mask"].dtype == torch.long
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
    ]
    assert batch["completion_mask"].dtype == torch.bool
    assert batch["completion_mask"].int().tolist() == [
        [0, 0, 1, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1],
        [0, 1, 0, 0, 0],
    ]


def test_truncation_keeps_the_prompt_end_and_the_completion_start(tokenizer):
    long_prompt = "hello world " * 20
    pair = PreferencePair(long_prompt, "The quick brown fox jumps over the lazy dog.", "ok", "f:0")
    short = PreferencePair("hi", "ok", "fine", "f:1")
    full, _ = tokenize_pairs([pair], tokenizer, max_length=1000, max_prompt_length=999)
    (cut, kept), stats = tokenize_pairs([pair, short], tokenizer, max_length=16, max_prompt_length=10)
    assert stats == {"pairs": 2, "prompts_truncated": 1, "completions_truncated": 1, "max_tokens": 16}
    assert cut.prompt_ids == full[0].prompt_ids[-10:]  # cut on the left
    assert cut.chosen_ids == full[0].chosen_ids[:6]  # cut on the right to 16 - 10
    assert cut.rejected_ids == full[0].rejected_ids  # "ok" + EOS fits
    assert (kept.prompt_ids, kept.chosen_ids) == (
        tokenizer("hi")["input_ids"],
        tokenizer("ok")["input_ids"] + [2],
    )


def test_message_data_needs_a_chat_template():
    tok = build_tokenizer()
    tok.chat_template = None
    pair = PreferencePair([user("q")], [assistant("a")], [assistant("b")], "data.jsonl:0")
    with pytest.raises(DataError, match=r"^data.jsonl: .*no chat template.*chat \(instruct\) model"):
        tokenize_pairs([pair], tok, max_length=32, max_prompt_length=16)
    # Plain strings need none.
    tokenize_pairs([PreferencePair("q", "a", "b", "data.jsonl:1")], tok, max_length=32, max_prompt_length=16)


def test_a_template_that_rewrites_the_prompt_is_a_row_error():
    tok = build_tokenizer()
    # Renders the history differently once an assistant reply follows, so the prompt is not a prefix.
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}{% if messages[-1]['role'] == 'assistant' %}!{% endif %}: "
        "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    pair = PreferencePair([user("q")], [assistant("a")], [assistant("b")], "data.jsonl:line 3")
    with pytest.raises(DataError, match=r"^data.jsonl: line 3: field 'chosen': the chat template's render"):
        tokenize_pairs([pair], tok, max_length=32, max_prompt_length=16)
    # With a rejects list (skip_invalid), the pair is set aside with its row and field; good pairs go on.
    good = PreferencePair("plain q", "a", "b", "data.jsonl:line 4")
    rejects: list[dict] = []
    kept, stats = tokenize_pairs([pair, good], tok, max_length=32, max_prompt_length=16, rejects=rejects)
    assert [k.source for k in kept] == ["data.jsonl:line 4"] and stats["pairs"] == 1
    assert len(rejects) == 1
    assert (
        rejects[0]["source"] == "data.jsonl" and rejects[0]["line"] == 3 and rejects[0]["field"] == "chosen"
    )
    assert rejects[0]["reason"].startswith("the chat template's render")
    assert rejects[0]["record"]["chosen"] == [assistant("a")]


# --- the top level -----------------------------------------------------------------------------------------------


def test_embedded_default_data_is_packaged():
    path = default_data_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == HH_SHA256
    assert "Copyright (c) 2022 Anthropic" in (path.parents[1] / "LICENSE").read_text(encoding="utf-8")
    assert HH_SHA256 in (path.parents[1] / "PROVENANCE.md").read_text(encoding="utf-8")


def test_load_training_data_on_the_embedded_data(tokenizer, tmp_path):
    cfg = DataConfig(max_length=64, max_prompt_length=32)
    assert cfg.path is None and cfg.skip_invalid is None
    train, test, report = load_training_data(cfg, tokenizer, tmp_path)
    assert report["rows"] == 2312 and report["rejected"] == 9 and report["format"] == "hh"
    assert (report["train_pairs"], report["test_pairs"]) == (len(train), len(test))
    assert len(train) + len(test) == 2303 and len(test) == 230
    assert not {tuple(p.prompt_ids) for p in train} & {tuple(p.prompt_ids) for p in test}
    assert report["prompts_truncated"] > 0 and report["max_tokens"] == 64
    lines = (tmp_path / "rejects.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["line"] for line in lines] == sorted(HH_EMPTY_REPLY_LINES + HH_PARTED_LINES)
    assert report["rejects_file"] == str(tmp_path / "rejects.jsonl")
    json.dumps(report)  # the trainer logs it as JSON

    few = DataConfig(max_length=64, max_prompt_length=32, max_train_samples=50, max_eval_samples=5)
    again, again_test, _ = load_training_data(few, tokenizer, None)
    # The seeded split is reproducible, and the samples are its first pairs.
    assert [p.source for p in again] == [p.source for p in train[:50]]
    assert [p.source for p in again_test] == [p.source for p in test[:5]]


def test_load_training_data_on_user_files(tokenizer, tmp_path):
    rows = [standard_row(i) for i in range(20)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    test_path = write_jsonl(tmp_path / "test.jsonl", rows[:3] + [standard_row(99)])
    cfg = DataConfig(path=str(path), test_size=5, max_train_samples=4, max_length=64, max_prompt_length=32)
    train, test, report = load_training_data(cfg, tokenizer, tmp_path / "run")
    assert (len(train), len(test), report["rejected"], report["rejects_file"]) == (4, 5, 0, None)
    assert not (tmp_path / "run" / "rejects.jsonl").exists()

    cfg = DataConfig(
        path=str(path), test_path=str(test_path), max_eval_samples=2, max_length=64, max_prompt_length=32
    )
    train, test, report = load_training_data(cfg, tokenizer, None)
    assert [p.source for p in test] == [f"{test_path}:line 1", f"{test_path}:line 2"]  # the given order
    assert [p.source for p in train][:2] == [f"{path}:line 1", f"{path}:line 2"]
    assert report["test_prompts_in_train"] == 3

    write_jsonl(path, rows + [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match=r"line 21: field 'rejected': same as chosen"):
        load_training_data(DataConfig(path=str(path)), tokenizer, tmp_path)  # user data: strict by default
    _, _, report = load_training_data(DataConfig(path=str(path), skip_invalid=True), tokenizer, tmp_path)
    assert report["rejected"] == 1 and (tmp_path / "rejects.jsonl").is_file()


# ---------------------------------------------------------------- corrupted annotators (flip_labels, annotator)


def _pairs(n: int) -> list[PreferencePair]:
    # chosen is shorter than rejected in even rows, longer in odd rows; row 3 has equal lengths
    return [
        PreferencePair(f"q{i}", "a" * (5 if i % 2 == 0 else 9), "b" * (7 if i != 3 else 9), f"f:line {i + 1}")
        for i in range(n)
    ]


def test_flip_labels_swaps_exactly_that_share_seeded():
    pairs = _pairs(20)
    out, report = relabel_pairs(pairs, flip=0.3, seed=7)
    flipped = [i for i, (a, b) in enumerate(zip(pairs, out, strict=True)) if a.chosen != b.chosen]
    assert len(flipped) == 6 == report["labels_flipped"] == report["labels_opposite_data"]
    for i in flipped:  # a swap, nothing else
        assert (out[i].chosen, out[i].rejected) == (pairs[i].rejected, pairs[i].chosen)
        assert out[i].prompt == pairs[i].prompt and out[i].source == pairs[i].source
    again, _ = relabel_pairs(pairs, flip=0.3, seed=7)
    other, _ = relabel_pairs(pairs, flip=0.3, seed=8)
    assert again == out and other != out
    assert relabel_pairs(pairs) == (pairs, {})  # the default changes nothing and reports nothing
    assert all(a.chosen != b.chosen for a, b in zip(pairs, relabel_pairs(pairs, flip=1.0)[0], strict=True))


def test_length_biased_annotator_prefers_the_longer_answer():
    pairs = _pairs(6)
    out, report = relabel_pairs(pairs, annotator="longer")
    for b in out:
        assert len(b.chosen) >= len(b.rejected)
    # rows 0, 2, 4 had the shorter answer chosen; row 3 is a tie (kept), rows 1 and 5 already chose the longer
    assert [a.chosen != b.chosen for a, b in zip(pairs, out, strict=True)] == [
        True,
        False,
        True,
        False,
        True,
        False,
    ]
    assert report["labels_by_length_changed"] == 3 and report["labels_opposite_data"] == 3
    messages = PreferencePair(
        [{"role": "user", "content": "q"}],
        [{"role": "assistant", "content": "short"}],
        [{"role": "assistant", "content": "much longer"}],
        "m:line 1",
    )
    (b,), _ = relabel_pairs([messages], annotator="longer")
    assert b.chosen == messages.rejected and b.rejected == messages.chosen
    # the length bias first, then random flips on top: a flipped biased label can be the data's again
    both, report = relabel_pairs(pairs, annotator="longer", flip=0.5, seed=1)
    assert report["labels_flipped"] == 3
    assert report["labels_opposite_data"] == sum(
        a.chosen != b.chosen for a, b in zip(pairs, both, strict=True)
    )


def test_load_split_corrupts_the_training_side_only(tmp_path):
    rows = [standard_row(i) for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    clean_train, clean_test, _, _ = load_split(DataConfig(path=str(path), test_size=10, max_train_samples=20))
    train, test, _, report = load_split(
        DataConfig(path=str(path), test_size=10, max_train_samples=20, flip_labels=0.25)
    )
    assert test == clean_test  # held-out labels are the data's
    assert [p.prompt for p in train] == [p.prompt for p in clean_train]  # same pairs, same order
    assert (
        sum(a.chosen != b.chosen for a, b in zip(clean_train, train, strict=True))
        == 5
        == report["labels_flipped"]
    )
    with pytest.raises(ValueError, match="flip_labels"):
        DataConfig(flip_labels=1.5)
    with pytest.raises(ValueError, match="annotator"):
        DataConfig(annotator="shorter")


def test_a_prompt_column_of_another_type_is_named_not_chosen(tmp_path):
    """A standard file whose prompt column holds numbers (here parquet, as a spreadsheet export may make it): each
    row's error names `prompt`, not `chosen` (read as an implicit-prompt row, chosen would be blamed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": i, "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(3)]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"row 0 \(0-based\): field 'prompt': expected a string"):
        load_pairs(str(path))
    one_odd = [
        {"prompt": "q0", "chosen": "a", "rejected": "b"},
        {"prompt": {"text": "q1"}, "chosen": "a", "rejected": "b"},
    ]
    (tmp_path / "odd.jsonl").write_text("".join(json.dumps(r) + "\n" for r in one_odd))
    with pytest.raises(DataError, match=r"line 2: field 'prompt'"):
        load_pairs(str(tmp_path / "odd.jsonl"))


def test_an_empty_question_of_an_hh_transcript_names_the_prompt(tmp_path):
    row = {"chosen": "\n\nHuman:   \n\nAssistant: sure", "rejected": "\n\nHuman:   \n\nAssistant: no"}
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: sure", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    (tmp_path / "hh.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"line 2: field 'prompt': empty prompt"):
        load_pairs(str(tmp_path / "hh.jsonl"))
