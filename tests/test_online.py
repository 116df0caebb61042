"""`iopo online` on tiny models: the rounds' files and manifests, pair selection by a judge, the three methods, the
ledger and budget, and resumption after kills between and inside stages (same weights, no judgment paid twice)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from iopo.cli import main as iopo_main
from iopo.commands.online import online
from iopo.commands.train import train
from iopo.config import ConfigError, OnlineConfig, load_config
from iopo.engine import fit as fit_module
from iopo.online import driver as online_driver
from iopo.online.stages import STAGES

from tiny import kill_9_when

TINY = [
    "data.max_length=64",
    "data.max_prompt_length=32",
    "data.test_size=6",
    "optim.batch_size=2",
    "optim.learning_rate=1e-2",
    "optim.warmup_ratio=0",
    "optim.lr_scheduler=constant",
    "loss.beta=0.5",
    "progress_bar=false",
    "tensorboard=false",
    "eval_batch_size=4",
    "generation.max_new_tokens=8",
    "generation.batch_size=4",
    "bootstrap=50",
]


def online_cfg(work, out, *extra, method="iter_dpo"):
    return load_config(None, [f"method={method}", *_cli_args(work, out, *extra)], OnlineConfig)


def policy_weights(run: Path) -> dict:
    folder = max(run.glob("round_*/checkpoint"), key=lambda p: int(p.parent.name.split("_")[1]))
    name = "protagonist" if (folder / "protagonist").is_dir() else "policy"
    return load_file(folder / name / "model.safetensors")


def ledger_requests(run: Path) -> int:
    with sqlite3.connect(run / "store.sqlite") as db:
        return db.execute("SELECT COALESCE(SUM(requests), 0) FROM ledger").fetchone()[0]


def test_iter_dpo_rounds_leave_their_files_and_a_manifest(work, tmp_path, capsys):
    out = tmp_path / "run"
    summary = online(online_cfg(work, out))
    assert summary["status"] == "done" and [r["round"] for r in summary["rounds"]] == [1, 2]
    for k in (1, 2):
        folder = out / f"round_{k}"
        for name in ("prompts.jsonl", "generations.jsonl", "judgments.jsonl", "pairs.jsonl", "scores.json"):
            assert (folder / name).is_file(), name
        manifest = json.loads((folder / "manifest.json").read_text())
        assert list(manifest["stages"]) == ["prompts", "generate", "judge", "pairs", "train", "score"]
        assert all(s["done"] and s["seconds"] >= 0 for s in manifest["stages"].values())
        assert manifest["reference"] == "initial" and manifest["judge"]["type"] == "reward_model"
        assert manifest["seeds"]["generation"] == k and len(manifest["policy_fingerprint_at_start"]) == 16
        # every test pair's margin is kept (paired comparisons between runs); their mean is the margin reward
        scores = json.loads((folder / "scores.json").read_text())
        assert len(scores["margins"]) == 6
        assert sum(scores["margins"]) / 6 == pytest.approx(scores["margin_reward"], abs=1e-5)
        assert sum(m > 0 for m in scores["margins"]) / 6 == pytest.approx(scores["pairwise_accuracy"])
        prompts = [json.loads(x) for x in (folder / "prompts.jsonl").read_text().splitlines()]
        assert len(prompts) == 6
        answers = [json.loads(x) for x in (folder / "generations.jsonl").read_text().splitlines()]
        assert len(answers) == 12  # n=2 answers per prompt
        # one reward-model score per answer; pairs: best vs worst, top half of the separated ones by score gap
        judged = [json.loads(x) for x in (folder / "judgments.jsonl").read_text().splitlines()]
        assert len(judged) == 12 and all(j["kind"] == "score" for j in judged)
        pairs = [json.loads(x) for x in (folder / "pairs.jsonl").read_text().splitlines()]
        stage = manifest["stages"]["pairs"]
        assert stage["kept"] == len(pairs) == -(-stage["separated"] // 2)
        for pair in pairs:
            scores = {
                j["answer"]: j["result"]["score"]
                for j in judged
                if prompts[j["prompt"]]["prompt_id"] == pair["prompt_id"]
            }
            texts = {a["answer"]: a["sample"] for a in answers if a["prompt_id"] == pair["prompt_id"]}
            assert scores[texts[pair["chosen"]]] - scores[texts[pair["rejected"]]] == pytest.approx(
                pair["confidence"]
            )
            assert pair["confidence"] > 0
        gaps = [p["confidence"] for p in pairs]
        assert gaps == sorted(gaps, reverse=True)
        assert manifest["stages"]["train"]["steps"] == (2 if pairs else 0)
    # no prompt is used twice across rounds
    first, second = (
        [json.loads(x)["prompt_id"] for x in (out / f"round_{k}/prompts.jsonl").read_text().splitlines()]
        for k in (1, 2)
    )
    assert not set(first) & set(second)
    # only the newest checkpoint is kept (keep_checkpoints=1), the export loads
    assert not (out / "round_1" / "checkpoint").exists() and (out / "round_2" / "checkpoint").is_dir()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")
    # the ledger: annotation = one request per distinct answer, per round; scoring is counted apart
    rounds = summary["rounds"]
    assert all(r["annotation"]["requests"] >= 1 for r in rounds)
    assert (
        ledger_requests(out)
        == summary["totals"]["annotation"]["requests"] + summary["totals"]["scoring"]["requests"]
    )
    assert all(r["scores"]["judged"]["n"] == 4 for r in rounds)
    saved = json.loads((out / "online.json").read_text())
    assert saved["status"] == "done" and saved["rounds"][1]["scores"]["step"] == 4
    assert "margins" not in saved["rounds"][1]["scores"]  # the summary stays small: they are in scores.json
    printed = capsys.readouterr().out
    assert "Online iter_dpo: done" in printed


@pytest.mark.parametrize("method", ["iopo", "dpo"])
def test_iopo_and_dpo_rounds_train_on_human_pairs_with_no_judge_calls(work, tmp_path, method):
    out = tmp_path / method
    summary = online(online_cfg(work, out, method=method))
    assert summary["totals"]["annotation"]["requests"] == 0
    assert summary["totals"]["scoring"]["requests"] > 0  # the win rate against the starting policy is judged
    for k in (1, 2):
        manifest = json.loads((out / f"round_{k}/manifest.json").read_text())
        assert list(manifest["stages"]) == ["train", "score"]
        assert manifest["stages"]["train"]["steps"] == 2 and manifest["stages"]["train"]["pairs"] == 30
    # the same steps as an offline run of 4 steps over the human pairs: the rounds change nothing of the math
    train_args = [
        f"method={method}",
        f"model={work['base']}",
        f"data={work['data']}",
        f"output_dir={tmp_path / 'offline'}",
        "optim.max_steps=4",
        "iopo.n_iter=2",
        *[a for a in TINY if not a.startswith(("generation.", "bootstrap"))],
    ]
    train(load_config(None, train_args))
    offline = load_file(tmp_path / "offline" / "final" / "model.safetensors")
    rounds = policy_weights(out)
    for key in offline:
        torch.testing.assert_close(rounds[key], offline[key], atol=1e-6, rtol=1e-5)


def test_reference_previous_round_moves_the_reference(work, tmp_path):
    a = online(online_cfg(work, tmp_path / "a", "keep_ratio=1"))
    b = online(online_cfg(work, tmp_path / "b", "keep_ratio=1", "reference=previous_round"))
    manifest = json.loads((tmp_path / "b" / "round_2" / "manifest.json").read_text())
    assert manifest["reference"] == "previous_round"
    # round 1 is the same either way (the reference is the starting model at first); round 2 differs
    assert a["rounds"][0]["scores"]["margin_reward"] == pytest.approx(
        b["rounds"][0]["scores"]["margin_reward"]
    )
    assert a["rounds"][1]["scores"]["margin_reward"] != pytest.approx(
        b["rounds"][1]["scores"]["margin_reward"]
    )


class Killed(BaseException):
    """A kill at a chosen point (a BaseException, as KeyboardInterrupt is: nothing catches it on the way)."""


def kill_at(monkeypatch, owner, name, nth=None, round_k=None):
    """Make owner.name (owner[name] for the STAGES table) raise Killed on its nth call (a stage: when called for
    round round_k)."""
    real = owner[name] if isinstance(owner, dict) else getattr(owner, name)
    calls = {"n": 0}
    if name == "score" and not isinstance(
        owner, dict
    ):  # a judge's generator: die after the (nth - 1)th judgment is stored

        def wrapper(self, items):
            for item in real(self, items):
                calls["n"] += 1
                if calls["n"] == nth:
                    raise Killed
                yield item

    elif round_k is not None:

        def wrapper(self, k, folder, manifest):
            if k == round_k:
                raise Killed
            return real(self, k, folder, manifest)

    else:

        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == nth:
                raise Killed
            return real(*args, **kwargs)

    if isinstance(owner, dict):
        monkeypatch.setitem(owner, name, wrapper)
    else:
        monkeypatch.setattr(owner, name, wrapper)


def test_kills_between_and_inside_stages_resume_to_the_same_weights(work, tmp_path, monkeypatch):
    from iopo.eval.generate import JsonlSink
    from iopo.eval.judges.reward_model import RewardModelJudge

    straight = tmp_path / "straight"
    expected = online(online_cfg(work, straight, "keep_ratio=1"))
    assert all(r["trained_pairs"] for r in expected["rounds"])  # both rounds train
    out = tmp_path / "killed"
    cfg = online_cfg(work, out, "keep_ratio=1")
    kills = [
        (STAGES, "pairs", None, 1),  # between stages: round 1 judged, no pairs yet
        (
            JsonlSink,
            "__call__",
            2,
            None,
        ),  # inside generation: round 2's first batch (call 1: round 1's scoring)
        (RewardModelJudge, "score", 3, None),  # inside judging: round 2's third judgment
        (fit_module, "train_step", 2, None),  # inside training: round 2's second optimizer step
        (STAGES, "score", None, 2),  # between stages: round 2 trained, not scored
    ]
    for owner, name, nth, round_k in kills:
        kill_at(monkeypatch, owner, name, nth, round_k)
        with pytest.raises(Killed):
            online(cfg)
        monkeypatch.undo()
    summary = online(cfg)
    assert summary["status"] == "done"
    a, b = policy_weights(straight), policy_weights(out)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    assert ledger_requests(out) == ledger_requests(straight)  # no judgment was paid twice
    for mine, theirs in zip(summary["rounds"], expected["rounds"], strict=True):
        assert mine["scores"] == theirs["scores"] and mine["annotation"] == {
            **theirs["annotation"],
            "seconds": mine["annotation"]["seconds"],
        }


def test_a_budget_stops_at_a_stage_boundary_and_a_bigger_one_continues(work, tmp_path):
    out = tmp_path / "budget"
    summary = online(online_cfg(work, out, "max_judge_requests=20", "score_prompts=0"))
    assert summary["status"].startswith("stopped:") and "max_judge_requests=20" in summary["status"]
    assert ledger_requests(out) <= 20
    manifest = json.loads((out / "round_2" / "manifest.json").read_text())
    assert "judge" not in manifest["stages"] and manifest["stages"]["generate"]["done"]
    summary = online(online_cfg(work, out, "max_judge_requests=100", "score_prompts=0"))
    assert summary["status"] == "done" and ledger_requests(out) == 24


def test_online_settings_errors_are_one_line(work, tmp_path, capsys):
    with pytest.raises(ConfigError, match="needs a judge"):
        load_config(None, ["method=iter_dpo"], OnlineConfig)
    with pytest.raises(ConfigError, match="max_steps is not used"):
        online_cfg(work, tmp_path / "x", "optim.max_steps=3")
    args = ["online", f"model={work['base']}", f"data={work['data']}", f"output_dir={tmp_path / 'p'}", *TINY]
    args += ["judge.type=reward_model", f"judge.model={work['rm']}", "rounds=10", "prompts_per_round=6"]
    assert iopo_main(args) == 2
    assert "prompt pool" in capsys.readouterr().err
    out = tmp_path / "changed"
    online(online_cfg(work, out, "rounds=1", "score_prompts=0"))
    with pytest.raises(ConfigError, match=r"other settings \(keep_ratio \(was 0.5, now 0.9\)\)"):
        online(online_cfg(work, out, "rounds=1", "score_prompts=0", "keep_ratio=0.9"))


def test_report_and_plots_put_the_methods_side_by_side(work, tmp_path):
    runs = {}
    for method in ("iter_dpo", "iopo"):
        runs[method] = tmp_path / method
        online(online_cfg(work, runs[method], method=method))
    report = tmp_path / "report.md"
    assert iopo_main(["report", str(runs["iter_dpo"]), str(runs["iopo"]), f"output={report}"]) == 0
    text = report.read_text()
    assert "## Online rounds (`iopo online`)" in text
    rows = {
        line.split("|")[1].strip(): line
        for line in text.splitlines()
        if line.startswith("| iter_dpo |") or line.startswith("| iopo |")
    }
    assert set(rows) == {"iter_dpo", "iopo"}
    for method, folder in runs.items():
        summary = json.loads((folder / "online.json").read_text())
        cells = [c.strip() for c in rows[method].split("|")[1:-1]]
        last = summary["rounds"][-1]["scores"]
        assert cells[1] == "2/2" and cells[2] == str(last["step"])
        assert cells[3] == f"{last['margin_reward']:.4f}" and cells[4] == f"{last['pairwise_accuracy']:.4f}"
        assert cells[8] == str(summary["totals"]["annotation"]["requests"])
    assert rows["iopo"].split("|")[9].strip() == "0"  # IOPO bought no annotation
    assert "### iter_dpo round by round" in text and "### iopo round by round" in text
    plots = json.loads((tmp_path / "report_files" / "plots.json").read_text())
    assert plots["online_rounds.png"]["series"] == ["iter_dpo", "iopo"]
    assert plots["online_cost.png"]["series"] == ["iter_dpo", "iopo"]
    from iopo.report.plots import online_points

    summary = json.loads((runs["iter_dpo"] / "online.json").read_text())
    points = online_points(summary, "pairwise_accuracy")
    spent = [r["annotation"]["requests"] for r in summary["rounds"]]
    assert [p[1] for p in points] == [spent[0], spent[0] + spent[1]]  # x = cumulative annotation requests


@pytest.mark.parametrize("method", ["iter_dpo", "iopo"])
def test_lora_rounds_generate_with_the_policy_adapter_and_export_merged(work, tmp_path, method):
    out = tmp_path / method
    summary = online(
        online_cfg(work, out, "model.lora=true", "model.lora_r=4", "keep_ratio=1", method=method)
    )
    assert summary["status"] == "done"
    fingerprints = [
        json.loads((out / f"round_{k}" / "manifest.json").read_text())["policy_fingerprint_at_start"]
        for k in (1, 2)
    ]
    assert fingerprints[0] != fingerprints[1]  # round 1 moved the adapter the round 2 answers came from
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "final")
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_kill_9_at_a_random_moment_then_the_same_command_finishes_the_same(work, tmp_path):
    """A real SIGKILL while round 2 runs (whatever it is doing then): the rerun ends with the uninterrupted weights."""
    import signal

    straight = tmp_path / "straight"
    online(online_cfg(work, straight, "keep_ratio=1"))
    out = tmp_path / "killed"
    args = _cli_args(work, out, "keep_ratio=1")
    code = kill_9_when(["online", *args], lambda: (out / "round_1" / "checkpoint").is_dir())
    assert code == -signal.SIGKILL, "the run ended before the kill"
    assert (
        not (out / "online.json").is_file()
        or json.loads((out / "online.json").read_text())["status"] != "done"
    )
    assert iopo_main(["online", *args]) == 0
    a, b = policy_weights(straight), policy_weights(out)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    assert ledger_requests(out) == ledger_requests(straight)


def _cli_args(work, out, *extra) -> list[str]:
    return [
        f"model={work['base']}",
        f"data={work['data']}",
        f"output_dir={out}",
        "rounds=2",
        "steps_per_round=2",
        "prompts_per_round=6",
        "score_prompts=4",
        "keep_ratio=0.5",
        "judge.type=reward_model",
        f"judge.model={work['rm']}",
        *TINY,
        *extra,
    ]


def test_a_kill_after_older_checkpoints_are_pruned_resumes(work, tmp_path, monkeypatch):
    """Three rounds keeping one round's checkpoint: killed in round 3, after round 1's checkpoint was pruned, the
    run resumes from round 2's and ends with the uninterrupted run's weights (found by the judge soak)."""
    straight = tmp_path / "straight"
    online(online_cfg(work, straight, "rounds=3", "prompts_per_round=4", "score_prompts=0", "keep_ratio=1"))
    out = tmp_path / "killed"
    cfg = online_cfg(work, out, "rounds=3", "prompts_per_round=4", "score_prompts=0", "keep_ratio=1")
    kill_at(monkeypatch, STAGES, "judge", None, 3)
    with pytest.raises(Killed):
        online(cfg)
    monkeypatch.undo()
    assert not (out / "round_1" / "checkpoint").exists() and (out / "round_2" / "checkpoint").is_dir()
    assert online(cfg)["status"] == "done"
    a, b = policy_weights(straight), policy_weights(out)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


def test_the_vllm_engine_without_vllm_is_one_line(work, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    args = ["online", *_cli_args(work, tmp_path / "v", "generation.engine=vllm")]
    assert iopo_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "iopo: error: generation.engine=vllm needs vLLM (a CUDA machine): pip install 'iopo[vllm]', or use engine=hf"
    ]
    assert not (tmp_path / "v").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="engine=vllm takes full weights"):
        online_cfg(work, tmp_path / "w", "generation.engine=vllm", "model.lora=true")
    with pytest.raises(ConfigError, match="generation.dtype applies to engine=hf"):
        online_cfg(work, tmp_path / "w", "generation.engine=vllm", "generation.dtype=bfloat16")


class LengthJudge:
    """A pairwise judge with a local judge's result fields whose P(A) follows the answers' lengths (and, a little,
    the position, so the two orders sometimes disagree): a random tiny model's verdicts hardly depend on content."""

    name, judge_id, modes = "annotator", "length-judge", ["pairwise"]

    def pairwise(self, items):
        import math

        for i, (_, a, b) in enumerate(items):
            p = 1 / (1 + math.exp(-(len(a) - len(b)) / 4 - 0.3))
            winner = "A" if p > 0.5 else "B" if p < 0.5 else "tie"
            yield i, {"winner": winner, "valid": True, "p_a": p}, {"requests": 1}

    def close(self):
        pass


def test_pairwise_annotation_keeps_pairs_both_orders_agree_on_ranked_by_confidence(
    work, tmp_path, monkeypatch
):
    """A pairwise judge over every pair of 3 answers, both orders: a pair is kept only when the orders agree, the
    most confident one per prompt, and the kept ones are ranked by the mean probability margin."""
    monkeypatch.setattr(online_driver, "build_judge", lambda *args: LengthJudge())
    out = tmp_path / "pw"
    args = ["judge.type=local", f"judge.model={work['base']}", "judge.tie_margin=0.0001", "generation.n=3"]
    online(online_cfg(work, out, *args, "rounds=1", "keep_ratio=1", "score_prompts=0"))
    folder = out / "round_1"
    answers = [json.loads(x) for x in (folder / "generations.jsonl").read_text().splitlines()]
    prompts = [json.loads(x) for x in (folder / "prompts.jsonl").read_text().splitlines()]
    judged = [json.loads(x) for x in (folder / "judgments.jsonl").read_text().splitlines()]
    assert len(judged) == 6 * 3 * 2 and {j["kind"] for j in judged} == {"pairwise"}
    verdicts = {(j["prompt"], j["answer"], j["other"]): j["result"] for j in judged}
    expected, disagreed = [], 0
    for p, prompt in enumerate(prompts):
        text = {a["sample"]: a["answer"] for a in answers if a["prompt_id"] == prompt["prompt_id"]}
        best = None
        for i, j in ((0, 1), (0, 2), (1, 2)):
            first, second = verdicts[p, i, j], verdicts[p, j, i]
            if first["winner"] == "A" and second["winner"] == "B":
                better, worse = i, j
            elif first["winner"] == "B" and second["winner"] == "A":
                better, worse = j, i
            else:
                disagreed += 1
                continue  # a tie or the orders disagree: not separated
            if text[better] == text[worse]:
                continue
            confidence = (abs(first["p_a"] - 0.5) + abs(second["p_a"] - 0.5)) * 2 / 2
            if best is None or confidence > best[0]:
                best = (confidence, text[better], text[worse])
        if best:
            expected.append(best)
    pairs = [json.loads(x) for x in (folder / "pairs.jsonl").read_text().splitlines()]
    assert expected and disagreed  # some pairs are separated, some not: both branches are exercised
    assert sorted((round(c, 6), w, r) for c, w, r in expected) == sorted(
        (round(p["confidence"], 6), p["chosen"], p["rejected"]) for p in pairs
    )
    assert [p["confidence"] for p in pairs] == sorted((p["confidence"] for p in pairs), reverse=True)
