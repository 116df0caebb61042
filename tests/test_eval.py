"""Evaluation on tiny models: generation (batched, resumable), train-rm, judges, the store (no judgment paid twice),
`iopo eval` end to end, plots and the report, and an OpenAI-compatible judge's faults against a stub server."""

from __future__ import annotations

import json
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from iopo.cli import main as iopo_main
from iopo.config import GenerateConfig, JudgeConfig, load_config

from tiny import save_tiny, train_rm_args, write_pairs

TINY_DATA = ["data.max_length=64", "data.max_prompt_length=32", "data.test_size=6"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dir):
    """A data file, a second tiny model (the 'trained' one) and a reward model trained for a few steps."""
    root = tmp_path_factory.mktemp("eval")
    data = write_pairs(root / "pairs.jsonl", n=30)
    other = save_tiny(root / "other", seed=1)
    assert iopo_main(train_rm_args(tiny_model_dir, data, root / "rm", "optim.max_steps=6")) == 0
    return {"root": root, "data": data, "base": tiny_model_dir, "other": other, "rm": root / "rm"}


# ---------------------------------------------------------------- generation


def _generate(work, output, *extra):
    cfg = load_config(
        None,
        [
            f"model={work['base']}",
            f"data={work['data']}",
            *TINY_DATA,
            f"output={output}",
            "progress_bar=false",
            "generation.max_new_tokens=10",
            "generation.n=2",
            "generation.batch_size=4",
            *extra,
        ],
        GenerateConfig,
    )
    from iopo.commands.generate import generate_command

    return generate_command(cfg)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_writes_every_field_and_a_rerun_generates_nothing(work, tmp_path):
    out = tmp_path / "answers.jsonl"
    timing = _generate(work, out)
    records = _records(out)
    assert timing["answers"] == len(records) == 12  # 6 test prompts x n=2
    for r in records:
        assert {
            "prompt_id",
            "prompt",
            "answer",
            "finish_reason",
            "prompt_tokens",
            "completion_tokens",
            "model_fingerprint",
            "settings",
            "sample",
        } <= r.keys()
        assert r["finish_reason"] in ("stop", "length") and 0 < r["completion_tokens"] <= 10
        assert r["settings"]["temperature"] == 0.8 and r["settings"]["n"] == 2
    assert {(r["prompt_id"], r["sample"]) for r in records} == {
        (r["prompt_id"], s) for r in records for s in (0, 1)
    }
    again = _generate(work, out)
    assert again["answers"] == 0 and again["reused"] == 12 and len(_records(out)) == 12


def test_generate_resumed_after_a_crash_equals_uninterrupted(work, tmp_path, monkeypatch):
    straight = tmp_path / "straight.jsonl"
    _generate(work, straight)

    from iopo.eval import generate as G

    broken = tmp_path / "broken.jsonl"
    real_call = G.JsonlSink.__call__
    calls = {"n": 0}

    def crash_after_first_batch(self, records):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed while the second batch is being written
        real_call(self, records)

    monkeypatch.setattr(G.JsonlSink, "__call__", crash_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        _generate(work, broken)
    assert 0 < len(_records(broken)) < 12
    monkeypatch.setattr(G.JsonlSink, "__call__", real_call)
    with broken.open("a") as f:
        f.write('{"key": "torn')  # a torn last line from the kill
    timing = _generate(work, broken)
    assert timing["reused"] > 0
    from iopo.eval.generate import read_records

    by_key = lambda path: {k: r["answer"] for k, r in read_records(path).items()}  # noqa: E731
    assert len(by_key(broken)) == 12
    assert by_key(broken) == by_key(straight)  # the same answers, sampled with the same per-batch seeds


def test_greedy_batched_generation_equals_one_by_one(work, tmp_path):
    a, b = tmp_path / "b4.jsonl", tmp_path / "b1.jsonl"
    _generate(work, a, "generation.temperature=0", "generation.n=1", "generation.batch_size=4")
    _generate(work, b, "generation.temperature=0", "generation.n=1", "generation.batch_size=1")
    answers = lambda path: {r["prompt_id"]: r["answer"] for r in _records(path)}  # noqa: E731
    assert answers(a) == answers(b)  # left padding and the attention mask do not change greedy answers


def test_generation_dtype_generates_from_a_copy_in_that_precision_keyed_apart(work, tmp_path):
    """generation.dtype=bfloat16: greedy answers equal those of the model loaded in bf16 (the same weights, the same
    precision); the float32 model the caller holds is untouched; the answers are keyed apart from the model
    precision's, whose keys stay what they were; a server backend refuses it in one line."""
    import torch

    from iopo.eval.generate import in_precision, settings_of
    from iopo.io.models import load_inference_model, resolve_model

    greedy = ["generation.temperature=0", "generation.n=1"]
    fp32, bf16 = tmp_path / "fp32.jsonl", tmp_path / "bf16.jsonl"
    _generate(work, fp32, *greedy)
    _generate(work, bf16, *greedy, "generation.dtype=bfloat16")
    loaded_bf16 = tmp_path / "loaded.jsonl"
    _generate(work, loaded_bf16, *greedy, "dtype=bfloat16")
    answers = lambda path: {r["prompt_id"]: r["answer"] for r in _records(path)}  # noqa: E731
    assert answers(bf16) == answers(loaded_bf16)
    assert {r["key"] for r in _records(bf16)}.isdisjoint(r["key"] for r in _records(fp32))
    assert all(r["settings"]["dtype"] == "bfloat16" for r in _records(bf16))
    assert all("dtype" not in r["settings"] for r in _records(fp32))

    model, _ = load_inference_model(resolve_model(str(work["base"])), "float32")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = in_precision(model, "bfloat16")
    assert copy is not model and next(copy.parameters()).dtype == torch.bfloat16
    assert all(torch.equal(v, before[k]) and v.dtype == torch.float32 for k, v in model.state_dict().items())
    assert in_precision(model, "model") is model and in_precision(model, "float32") is model
    from iopo.config import GenerationConfig

    assert "dtype" not in settings_of(GenerationConfig(), 128)
    with pytest.raises(ValueError, match="applies to backend=hf"):
        GenerationConfig(backend="openai", dtype="bfloat16")


# ---------------------------------------------------------------- reward model


def test_train_rm_saves_a_standard_reward_model_and_reports_accuracy(work):
    from transformers import AutoModelForSequenceClassification

    rm = work["rm"]
    result = json.loads((rm / "eval.json").read_text())
    assert result["kind"] == "reward_model" and result["n_pairs"] == 6
    assert 0.0 <= result["pairwise_accuracy"] <= 1.0
    model = AutoModelForSequenceClassification.from_pretrained(rm / "final")
    assert model.config.num_labels == 1
    card = (rm / "final" / "README.md").read_text()  # its model card, with the held-out accuracy
    assert "pipeline_tag: text-classification" in card and f"{result['pairwise_accuracy']:.4f} [" in card
    records = [json.loads(x) for x in (rm / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))

    # The held-out accuracy in eval.json is what the saved model gives.
    from iopo.data import load_training_data
    from iopo.engine.reward import PairRewards, heldout_accuracy

    cfg = load_config(rm / "config.yaml", schema=__import__("iopo.config").config.TrainRMConfig)
    from iopo.io.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    _, test, _ = load_training_data(cfg.data, tokenizer, None)
    # read as transformers reads a right-padded row (its plain forward), the reward model trained on shared batches
    again = heldout_accuracy(PairRewards(model), test, 4, tokenizer.pad_token_id, "cpu")
    assert again["pairwise_accuracy"] == result["pairwise_accuracy"]
    assert again["margins"] == pytest.approx(result["margins"], abs=1e-4)


def test_reward_model_judge_shares_prompts_and_scores_as_the_plain_forward(work):
    """The reward-model judge scores two answers to one prompt as one prefix-shared sequence: every score equals the
    plain forward of that answer alone (transformers' own path); an answer cut by max_length, a third answer to a
    prompt and a lone prompt's answer go as plain rows. Every item gets exactly one score."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from iopo.data.tokenize import answer_ids, answer_parts
    from iopo.eval.judges.reward_model import RewardModelJudge

    judge = RewardModelJudge(
        "rm", JudgeConfig(type="reward_model", model=str(work["rm"] / "final"), batch_size=4)
    )
    long_answer = " ".join(["word"] * 400)
    items = [
        ("What is a cat?", "A small animal."),
        ("What is a cat?", "A cat is a pet that purrs and sleeps a lot."),
        ("What is a cat?", "Cats."),
        ("Name a colour.", "Blue."),
        ("Name a colour.", "Red, or maybe green."),
        ("Why is the sky blue?", "Scattering."),
        ("Name a colour.", long_answer),
    ]
    got = {}
    plain = AutoModelForSequenceClassification.from_pretrained(work["rm"] / "final").eval()
    plain.config.pad_token_id = judge.tokenizer.pad_token_id
    for i, result, _ in judge.score(items):
        assert i not in got
        got[i] = result["score"]
    assert sorted(got) == list(range(len(items)))
    with torch.no_grad():
        for i, (prompt, answer) in enumerate(items):
            ids = torch.tensor([answer_ids(prompt, answer, judge.tokenizer, judge.cfg.max_length)])
            alone = float(plain(input_ids=ids).logits[0, 0])
            assert got[i] == pytest.approx(alone, abs=1e-4), items[i]
    assert len(answer_ids(*items[-1], judge.tokenizer, judge.cfg.max_length)) == judge.cfg.max_length
    assert judge.shares is True
    widths = []
    backbone = judge.model.model
    real = backbone.forward

    def spy(*args, **kwargs):
        widths.append(tuple((kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape))
        return real(*args, **kwargs)

    # Again: the two shared pairs a row each (not packed), the three others in plain rows.
    backbone.forward = spy
    assert dict((i, r["score"]) for i, r, _ in judge.score(items)) == got
    parts = [answer_parts(p, a, judge.tokenizer) for p, a in items]
    longest = max(len(parts[i][0]) + len(parts[i][1]) + len(parts[j][1]) for i, j in ((0, 1), (3, 4)))
    assert widths == [(2, longest), (3, judge.cfg.max_length)]


def test_a_judge_dtype_loads_its_model_in_that_precision_and_is_another_judge(work):
    """judges.NAME.dtype=bfloat16: the reward model is loaded in bf16 (whatever the evaluation's dtype), its
    identity differs from the float32 judge's (stored verdicts never mix), its rewards are the float32 ones up to
    bf16 rounding; a judge that runs no model here refuses the setting in one line."""
    import torch

    from iopo.eval.judges import build_judge

    items = [("What is a cat?", "A small animal."), ("What is a cat?", "Cats purr.")]
    rm = str(work["rm"] / "final")
    fp32 = build_judge("rm", JudgeConfig(type="reward_model", model=rm), "float32")
    bf16 = build_judge("rm", JudgeConfig(type="reward_model", model=rm, dtype="bfloat16"), "float32")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert next(fp32.model.parameters()).dtype == torch.float32
    assert fp32.judge_id != bf16.judge_id
    a = {i: r["score"] for i, r, _ in fp32.score(items)}
    b = {i: r["score"] for i, r, _ in bf16.score(items)}
    assert a.keys() == b.keys() == {0, 1}
    for i in a:
        assert b[i] == pytest.approx(a[i], abs=0.05 * (1 + abs(a[i])))
    with pytest.raises(ValueError, match="dtype applies to a judge that runs a model here"):
        JudgeConfig(type="openai", base_url="http://127.0.0.1:1/v1", dtype="bfloat16")


def test_bradley_terry_loss_by_hand():
    import math

    import torch

    from iopo.core.losses import bradley_terry_loss

    losses, metrics = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    # per pair -log σ(r_w - r_l): [-log σ(1), -log σ(-1)] = [log(1+e^-1), log(1+e)]; the step takes their mean
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-1)), math.log1p(math.e)], rel=1e-6)
    assert metrics["accuracy"] == 0.5 and metrics["margin"] == 0.0


def test_refusing_to_overwrite_a_reward_model(work, capsys):
    code = iopo_main(
        [
            "train-rm",
            f"model={work['base']}",
            f"data={work['data']}",
            *TINY_DATA,
            f"output_dir={work['rm']}",
            "optim.max_steps=1",
        ]
    )
    assert code == 2 and "overwrite=true" in capsys.readouterr().err


# ---------------------------------------------------------------- iopo eval


def _distinct_items(out: Path, model: Path) -> tuple[int, int]:
    """(distinct pairwise questions over both orders, distinct answers to score) of an eval folder's generations:
    identical questions are asked once (a tiny random model may give two prompts the same answer)."""
    files = sorted((out / "generations").glob("*.jsonl"))
    by_file = {f.stem: _records(f) for f in files}
    model_file = model.name
    base_file = next(k for k in by_file if k != model_file)
    pairs = set()
    for m, b in zip(by_file[model_file], by_file[base_file], strict=True):
        prompt = json.dumps(m["prompt"])
        pairs |= {(prompt, m["answer"], b["answer"]), (prompt, b["answer"], m["answer"])}
    answers = {(json.dumps(r["prompt"]), r["answer"]) for recs in by_file.values() for r in recs}
    return len(pairs), len(answers)


def _tables(result: dict) -> dict:
    """The judged tables of an eval.json without the per-invocation request counts."""
    out = {}
    for judge, entry in result["judges"].items():
        for model, tables in entry["models"].items():
            for name in ("table1", "table2"):
                if name in tables:
                    out[judge, model, name] = {k: v for k, v in tables[name].items() if k != "requests"}
    return out


def _eval_args(work, out, *extra):
    return [
        "eval",
        f"{work['other']}",
        f"baseline={work['base']}",
        f"data={work['data']}",
        *TINY_DATA,
        f"output_dir={out}",
        "generation.max_new_tokens=8",
        "generation.n=2",
        "progress_bar=false",
        "bootstrap=200",
        "judges.rm.type=reward_model",
        f"judges.rm.model={work['rm'] / 'final'}",
        "judges.rm.tie_margin=0.01",
        "judges.loc.type=local",
        f"judges.loc.model={work['base']}",
        "judges.rm.check_pairs=0",  # the judge check has its own test: these count the answers' judgments
        "judges.loc.check_pairs=0",
        *extra,
    ]


def test_eval_end_to_end_then_repeated_eval_asks_no_judge(work, tmp_path, capsys):
    out = tmp_path / "ev"
    assert iopo_main(_eval_args(work, out)) == 0
    printed = capsys.readouterr().out
    assert "Table 1" in printed and "margin reward" in printed and "Judge ledger" in printed
    result = json.loads((out / "eval.json").read_text())
    label = Path(work["other"]).name
    metrics = result["metrics"][label]
    assert metrics["n_pairs"] == 6 and len(metrics["margins"]) == 6
    for judge in ("rm", "loc"):
        table = result["judges"][judge]["models"][label]["table1"]
        assert table["n"] + table["invalid"] == 12  # 6 prompts x 2 answers
        assert table["win"] + table["tie"] + table["lose"] == pytest.approx(1.0)
        for outcome in ("win", "tie", "lose"):
            low, high = table["ci"][outcome]
            assert low <= table[outcome] <= high
    # The local judge saw each pair in both orders, the RM scored each answer; identical questions asked once.
    n_pairwise, n_answers = _distinct_items(out, Path(work["other"]))
    assert 12 < n_pairwise <= 24 and 12 < n_answers <= 24
    ledger = result["ledger"]["this_run"]
    assert ledger["loc"]["requests"] == n_pairwise and ledger["rm"]["requests"] == n_answers
    with sqlite3.connect(out / "store.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0] == n_pairwise + n_answers
        assert db.execute("SELECT COUNT(*) FROM generations").fetchone()[0] == 24
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert len(list((out / "generations").glob("*.jsonl"))) == 2

    # Again: every answer and judgment is reused; no judge is asked anything, the tables are the same.
    assert iopo_main(_eval_args(work, out)) == 0
    again = json.loads((out / "eval.json").read_text())
    assert again["ledger"]["this_run"] == {}
    assert all(g["answers"] == 0 for g in again["generations"].values())
    assert _tables(again) == _tables(result)
    with sqlite3.connect(out / "store.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0] == n_pairwise + n_answers

    # A wider tie margin re-reads the stored rewards: still no request, more ties.
    assert iopo_main(_eval_args(work, out, "judges.rm.tie_margin=1000")) == 0
    wide = json.loads((out / "eval.json").read_text())
    assert wide["ledger"]["this_run"] == {} and wide["judges"]["rm"]["models"][label]["table1"]["tie"] == 1.0


def test_eval_of_a_run_folder_takes_its_data_and_starting_model(work, tmp_path):
    from iopo.commands.train import train

    from tiny import run_overrides

    cfg = load_config(
        None, run_overrides(work["base"], work["data"], tmp_path / "run", "iopo.n_iter=1", "eval_steps=1")
    )
    trained = train(cfg)
    out = tmp_path / "ev"
    code = iopo_main(
        [
            "eval",
            str(tmp_path / "run"),
            f"output_dir={out}",
            "generation.max_new_tokens=4",
            "progress_bar=false",
            "bootstrap=50",
        ]
    )
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["n_pairs"] == trained["n_pairs"] == 4  # the run's own test split (data.test_size=4)
    assert result["beta"] == 0.5  # the run's loss.beta
    # Standalone metrics equal the end-of-training ones: same split, same reference (the starting model).
    assert result["metrics"]["run"]["margin_reward"] == pytest.approx(trained["margin_reward"], abs=1e-5)
    assert result["metrics"]["run"]["pairwise_accuracy"] == trained["pairwise_accuracy"]
    # ... and their log-probs were read from the training run, not computed again: the exported policy's and the
    # starting model's, keyed by the weights the eval loaded (the same fingerprint as the trained ones)
    kept = sorted((tmp_path / "run" / "logps").glob("*.pt"))
    assert len(kept) == 2
    assert result["metrics"]["run"]["logps_source"] in map(str, kept)
    assert result["baseline_logps_source"] in map(str, kept)
    assert result["metrics"]["run"]["logps_source"] != result["baseline_logps_source"]

    # Computed afresh (the run's kept files gone, a new eval folder): the same numbers, to float rounding; a
    # repeated eval in that folder reads its own.
    for path in kept:
        path.unlink()
    args = [
        "eval",
        str(tmp_path / "run"),
        "generation.max_new_tokens=4",
        "progress_bar=false",
        "bootstrap=50",
    ]
    assert iopo_main([*args, f"output_dir={tmp_path / 'ev2'}"]) == 0
    fresh = json.loads((tmp_path / "ev2" / "eval.json").read_text())
    assert fresh["metrics"]["run"]["logps_source"] == fresh["baseline_logps_source"] == "computed"
    assert fresh["metrics"]["run"]["margins"] == pytest.approx(result["metrics"]["run"]["margins"], abs=1e-4)
    assert iopo_main([*args, f"output_dir={tmp_path / 'ev2'}"]) == 0
    again = json.loads((tmp_path / "ev2" / "eval.json").read_text())
    assert again["metrics"]["run"]["logps_source"].startswith(str(tmp_path / "ev2" / "logps"))
    assert again["metrics"]["run"]["margins"] == fresh["metrics"]["run"]["margins"]


def test_eval_errors_are_one_line(work, tmp_path, capsys):
    assert iopo_main(["eval", f"output_dir={tmp_path / 'x'}"]) == 2
    assert "name at least one model" in capsys.readouterr().err
    assert iopo_main(["eval", str(tmp_path / "missing-folder"), f"output_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such folder" in err
    assert iopo_main(["eval", str(work["other"]), "judges.j.type=openai"]) == 2
    assert "needs base_url" in capsys.readouterr().err


# ---------------------------------------------------------------- plots and report


def test_plot_and_report_from_run_and_eval_folders(work, tmp_path):
    from iopo.commands.train import train
    from iopo.report.markdown import write_report
    from iopo.report.plots import make_plots

    from tiny import eval_records, run_overrides

    runs = []
    for method in ("iopo", "dpo"):
        cfg = load_config(
            None,
            run_overrides(
                work["base"],
                work["data"],
                tmp_path / method,
                f"method={method}",
                "optim.max_steps=4",
                "iopo.n_iter=2",
                "eval_steps=1",
            ),
        )
        train(cfg)
        assert [r["step"] for r in eval_records(cfg.run_dir)] == [1, 2, 3, 4]  # eval_steps=1 and the end
        runs.append(str(cfg.run_dir))
    out = tmp_path / "ev"
    assert iopo_main(_eval_args(work, out)) == 0
    made = make_plots([*runs, str(out), str(work["rm"])], tmp_path / "plots")
    assert set(made) == {
        "margins_density.png",
        "margins_count.png",
        "curves.png",
        "win_tie_lose.png",
        "training.png",
    }
    assert made["curves.png"]["series"] == ["iopo", "dpo"]
    assert made["margins_density.png"]["series"] == ["iopo", "dpo", Path(work["other"]).name]  # no RM margins
    label = Path(work["other"]).name
    assert made["win_tie_lose.png"]["series"] == [f"{label}|rm|table1", f"{label}|loc|table1"]
    assert (
        "iopo protagonist" in made["training.png"]["series"]
        and "dpo policy" in made["training.png"]["series"]
    )
    from PIL import Image

    for name in made:
        with Image.open(tmp_path / "plots" / name) as image:
            assert image.size[0] >= 700 and image.size[1] >= 300
    report = write_report([*runs, str(out), str(work["rm"])], tmp_path / "r" / "report.md")
    text = report.read_text()
    for needle in (
        "## Training runs",
        "## Reward models",
        "### Table 1",
        "### Judge ledger",
        "![curves.png]",
    ):
        assert needle in text
    for link in (line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")):
        assert (report.parent / link).is_file()


# ---------------------------------------------------------------- an OpenAI-compatible judge's faults


class _Stub(BaseHTTPRequestHandler):
    plan: list = []  # one entry per request: an int status, "garbage", "sleep", "500 once another is in flight" or a reply
    seen: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"body": body, "auth": self.headers.get("Authorization")})
        action = type(self).plan.pop(0) if type(self).plan else '{"winner": "A"}'
        if action == "sleep":
            import time

            time.sleep(1.5)
            action = '{"winner": "A"}'
        if action == "500 once another is in flight":  # both requests sent, however loaded the machine is
            import time

            deadline = time.time() + 10
            while len(type(self).seen) < 2 and time.time() < deadline:
                time.sleep(0.01)
            action = 500
        if isinstance(action, int):
            self.send_response(action)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "stub failure"}}')
            return
        reply = (
            b"not json at all"
            if action == "garbage"
            else json.dumps(
                {
                    "choices": [{"message": {"content": action}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 5},
                }
            ).encode()
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    _Stub.plan, _Stub.seen = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _openai_judge(url, **extra):
    from iopo.eval.judges.openai import OpenAIJudge

    options = {"type": "openai", "base_url": url, "max_retries": 2, "timeout_s": 5, "concurrency": 1, **extra}
    return OpenAIJudge("llm", JudgeConfig(**options))


def test_openai_judge_retries_5xx_and_429_and_counts_them(stub):
    _Stub.plan = [500, 429, '{"winner": "B"}']
    judge = _openai_judge(stub, price_per_1k_prompt_tokens=0.0174, price_per_1k_completion_tokens=0.0174)
    [(index, result, spent)] = list(judge.pairwise([("Q?", "a", "b")]))
    assert result == {"winner": "B", "valid": True, "raw": '{"winner": "B"}'}
    assert spent["requests"] == 3 and spent["prompt_tokens"] == 100
    assert spent["cost"] == pytest.approx(105 / 1000 * 0.0174)
    sent = _Stub.seen[-1]["body"]
    assert sent["temperature"] == 0.0 and sent["response_format"]["type"] == "json_schema"


def test_openai_judge_unparseable_reply_is_invalid_not_a_tie(stub):
    _Stub.plan = ["I think both are fine", "7"]
    judge = _openai_judge(stub)
    [(_, verdict, _)] = list(judge.pairwise([("Q?", "a", "b")]))
    [(_, score, _)] = list(judge.score([("Q?", "a")]))
    assert verdict["winner"] is None and verdict["valid"] is False
    assert score["score"] is None and score["valid"] is False


def test_openai_judge_errors_name_the_url(stub, tmp_path, monkeypatch):
    from iopo.io.openai_client import ServerError

    _Stub.plan = ["garbage", "garbage", "garbage"]  # garbled replies are retried, then said
    with pytest.raises(ServerError, match=r"not JSON \(after 3 attempts\)"):
        list(_openai_judge(stub).pairwise([("Q?", "a", "b")]))
    _Stub.plan = ["garbage", '{"winner": "B"}']
    [(_, result, spent)] = list(_openai_judge(stub).pairwise([("Q?", "a", "b")]))
    assert result["winner"] == "B" and spent["requests"] == 2
    _Stub.plan = [500, 500, 500]
    with pytest.raises(ServerError, match=r"HTTP 500.*after 3 attempts"):
        list(_openai_judge(stub).pairwise([("Q?", "a", "b")]))
    _Stub.plan = ["sleep", "sleep"]
    with pytest.raises(ServerError, match="no reply within"):
        list(_openai_judge(stub, timeout_s=0.5, max_retries=1).pairwise([("Q?", "a", "b")]))
    _Stub.plan = [400]  # a client error is not retried
    with pytest.raises(ServerError, match="HTTP 400"):
        list(_openai_judge(stub, json_schema="off").pairwise([("Q?", "a", "b")]))
    # Nobody listening: one line naming the URL, exit status 1, no traceback.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(ServerError, match=f"{dead}/chat/completions: cannot connect"):
        list(_openai_judge(dead, max_retries=0).pairwise([("Q?", "a", "b")]))


def test_api_key_is_sent_but_never_stored(stub, tmp_path, monkeypatch, work):
    monkeypatch.setenv("STUB_KEY", "sk-secret-123")
    judge = _openai_judge(stub, api_key_env="STUB_KEY")
    list(judge.pairwise([("Q?", "a", "b")]))
    assert _Stub.seen[-1]["auth"] == "Bearer sk-secret-123"
    monkeypatch.delenv("STUB_KEY")
    from iopo.io.openai_client import ServerError

    with pytest.raises(ServerError, match="STUB_KEY") as caught:
        list(_openai_judge(stub, api_key_env="STUB_KEY").pairwise([("Q?", "a", "b")]))
    assert "sk-secret" not in str(caught.value)


def test_a_server_without_json_schema_falls_back_to_parsing(stub):
    _Stub.plan = [400, "A"]  # refuses response_format, then answers in free text
    judge = _openai_judge(stub)
    [(_, result, spent)] = list(judge.pairwise([("Q?", "a", "b")]))
    assert result["winner"] == "A" and spent["requests"] == 2
    assert "response_format" not in _Stub.seen[-1]["body"]


def test_eval_killed_mid_judging_resumes_without_paying_twice(work, tmp_path, stub, capsys):
    """The stub fails for good after some verdicts: the finished ones are stored; the rerun asks only the rest."""
    out = tmp_path / "ev"
    base = [
        "eval",
        str(work["other"]),
        f"baseline={work['base']}",
        f"data={work['data']}",
        *TINY_DATA,
        f"output_dir={out}",
        "generation.max_new_tokens=4",
        "progress_bar=false",
        "bootstrap=50",
        "judges.llm.type=openai",
        f"judges.llm.base_url={stub}",
        "judges.llm.max_retries=0",
        "judges.llm.concurrency=1",
        "judges.llm.modes=[pairwise]",
        "judges.llm.check_pairs=0",  # this test counts the answers' judgments
    ]
    _Stub.plan = ['{"winner": "A"}'] * 5 + [500]
    assert iopo_main(base) == 1
    assert "HTTP 500" in capsys.readouterr().err
    with sqlite3.connect(out / "store.sqlite") as db:
        stored = db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]
    assert stored == 5 and len(_Stub.seen) == 6  # the 5 before the failure; nothing asked after it
    before = len(_Stub.seen)
    _Stub.plan = []
    assert iopo_main(base) == 0
    n_pairwise, _ = _distinct_items(out, Path(work["other"]))
    assert (
        len(_Stub.seen) - before == n_pairwise - stored
    )  # 6 prompts x 2 orders (distinct), the rest paid for
    result = json.loads((out / "eval.json").read_text())
    table = result["judges"]["llm"]["models"][Path(work["other"]).name]["table1"]
    # The stub always says "A": both orders disagree on every pair, so every pair is a tie (MT-Bench's rule).
    assert table["tie"] == 1.0 and table["order_disagreement"] == 1.0 and table["first_position_share"] == 1.0
    assert (
        result["ledger"]["all_runs"]["llm"]["requests"] == n_pairwise + 1
    )  # every verdict + the failed request


def test_models_resolve_from_runs_checkpoints_and_adapters(work, tmp_path):
    """A LoRA run exported as an adapter, its checkpoint, and the adapter folder give the same greedy answers."""
    from iopo.commands.train import train
    from iopo.io.models import load_inference_model, model_fingerprint, resolve_model

    from tiny import run_overrides

    cfg = load_config(
        None,
        run_overrides(
            work["base"],
            work["data"],
            tmp_path / "lora",
            "model.lora=true",
            "model.lora_r=4",
            "merge_lora=false",
            "iopo.n_iter=1",
        ),
    )
    train(cfg)
    run = resolve_model(str(cfg.run_dir))
    checkpoint = resolve_model(str(next((cfg.run_dir / "checkpoints").iterdir())))
    adapter = resolve_model(f"mine={cfg.run_dir / 'final' / 'protagonist'}")
    assert run.adapter_base and checkpoint.adapter_base and adapter.adapter_base  # all three are adapters
    assert adapter.label == "mine" and run.run_config["method"] == "iopo"
    fingerprints = {model_fingerprint(load_inference_model(s)[0]) for s in (run, checkpoint, adapter)}
    assert len(fingerprints) == 1
    base = model_fingerprint(load_inference_model(resolve_model(str(work["base"])))[0])
    assert base not in fingerprints  # the adapter was merged: not the base's weights

    outputs = {}
    for name, spec in (("run", cfg.run_dir), ("checkpoint", next((cfg.run_dir / "checkpoints").iterdir()))):
        out = tmp_path / f"{name}.jsonl"
        code = iopo_main(
            [
                "generate",
                f"model={spec}",
                f"data={work['data']}",
                *TINY_DATA,
                f"output={out}",
                "generation.temperature=0",
                "generation.max_new_tokens=6",
                "progress_bar=false",
            ]
        )
        assert code == 0
        outputs[name] = {r["prompt_id"]: r["answer"] for r in _records(out)}
    assert outputs["run"] == outputs["checkpoint"]


def test_eval_on_multi_turn_chat_prompts(work, tmp_path):
    """Chat-message prompts (hh-style, several turns) go through the chat template in generation, the reward model
    and the local judge; nothing is dropped."""
    chat = tmp_path / "chat.jsonl"
    with chat.open("w") as f:
        for i in range(12):
            history = [
                {"role": "user", "content": f"Hello, question {i}?"},
                {"role": "assistant", "content": "Hi! What would you like to know?"},
                {"role": "user", "content": f"Tell me about the sea, part {i}."},
            ]
            f.write(
                json.dumps(
                    {
                        "prompt": history,
                        "chosen": [{"role": "assistant", "content": "Waves roll in and out."}],
                        "rejected": [{"role": "assistant", "content": "No."}],
                    }
                )
                + "\n"
            )
    out = tmp_path / "ev"
    args = [
        "eval",
        str(work["other"]),
        f"baseline={work['base']}",
        f"data={chat}",
        "data.max_length=96",
        "data.max_prompt_length=64",
        "data.test_size=4",
        f"output_dir={out}",
        "generation.max_new_tokens=5",
        "progress_bar=false",
        "bootstrap=50",
        "judges.rm.type=reward_model",
        f"judges.rm.model={work['rm'] / 'final'}",
        "judges.loc.type=local",
        f"judges.loc.model={work['base']}",
    ]
    assert iopo_main(args) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["n_pairs"] == 4 and result["metrics"]["other"]["n_pairs"] == 4
    records = _records(out / "generations" / "other.jsonl")
    assert all(isinstance(r["prompt"], list) and len(r["prompt"]) == 3 for r in records)
    assert all(r["prompt_tokens"] > 20 for r in records)  # the rendered template, not just the last message
    for judge in ("rm", "loc"):
        assert result["judges"][judge]["models"]["other"]["table1"]["n"] == 4


def test_eval_writes_only_into_an_empty_or_its_own_folder(work, tmp_path, capsys):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: settings\n")
    assert iopo_main(_eval_args(work, mine)) == 2
    assert "not an iopo run folder" in capsys.readouterr().err
    assert (mine / "config.yaml").read_text() == "my: settings\n" and not (mine / "eval.json").exists()


def test_answers_in_flight_when_another_request_fails_are_still_handed_on(stub):
    """Two requests at once: one fails for good, the other is being answered. The answer is paid for, so it is
    handed on (and stored by the runner) before the failure is raised; a job not yet sent is never sent."""
    from iopo.io.openai_client import ServerError

    _Stub.plan = ["500 once another is in flight", "sleep"]
    judge = _openai_judge(stub, max_retries=0, concurrency=2)
    got = []
    with pytest.raises(ServerError, match="HTTP 500"):
        for index, result, _ in judge.pairwise([("Q1?", "a", "b"), ("Q2?", "a", "b"), ("Q3?", "a", "b")]):
            got.append((index, result["winner"]))
    assert len(got) == 1 and got[0][1] == "A" and len(_Stub.seen) == 2


def test_a_request_allowance_caps_requests_retries_included(stub):
    """A budget of 3 requests: the first judgment takes 2 (a 500, then the answer), the second's first attempt is
    the third request and fails, and its retry is never sent: BudgetSpent, 3 requests in all."""
    from iopo.io.openai_client import BudgetSpent

    _Stub.plan = [500, '{"winner": "A"}', 500]
    judge = _openai_judge(stub, max_retries=4, concurrency=1)
    judge.limit_requests(3)
    got = []
    with pytest.raises(BudgetSpent, match="budget is spent") as caught:
        for _, result, spent in judge.pairwise([("Q1?", "a", "b"), ("Q2?", "a", "b")]):
            got.append((result["winner"], spent["requests"]))
    assert got == [("A", 2)] and len(_Stub.seen) == 3 and caught.value.attempts == 1
    judge.limit_requests(None)
    assert [r["winner"] for _, r, _ in judge.pairwise([("Q3?", "a", "b")])] == ["A"]


def test_eval_takes_the_training_data_settings_and_reports_its_rejects(work, tmp_path, capsys):
    """A file with one unusable row (chosen equal to rejected, as in the public UltraFeedback sample): without
    data.skip_invalid the eval stops in one line naming the file, line and field; with it, the row is set aside
    into the eval folder's rejects.jsonl and counted in eval.json, and the data settings of training (test size,
    sample limit) apply."""
    rows = [json.loads(x) for x in work["data"].read_text().splitlines()]
    rows[3]["rejected"] = rows[3]["chosen"]
    data = tmp_path / "with_a_bad_row.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", str(work["base"]), f"data={data}", "generation.max_new_tokens=4", "progress_bar=false"]
    assert iopo_main([*args, f"output_dir={tmp_path / 'stop'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{data}" in err[0] and "line 4" in err[0], err
    more = ["data.skip_invalid=true", "data.test_size=4", "data.max_eval_samples=3", "bootstrap=20"]
    assert iopo_main([*args, *more, f"output_dir={tmp_path / 'ev'}"]) == 0
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    rejects = [json.loads(x) for x in (tmp_path / "ev" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and "line 4" in json.dumps(rejects[0])
    assert result["data_report"]["rejected"] == 1
    assert result["data_report"]["rejects_file"] == str(tmp_path / "ev" / "rejects.jsonl")
    assert result["n_pairs"] == 3  # the test split's sample limit
