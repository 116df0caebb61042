"""The gold-reward testbed (experiments/gold.py): its prompts, annotators and frontier arithmetic by hand, and the
whole pipeline on a tiny random model (--smoke: samples, pairs, runs, every checkpoint scored, the results)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

import gold  # noqa: E402
import gold_analysis  # noqa: E402
import suite  # noqa: E402

pytest.importorskip("vaderSentiment")
SPEC = gold.load_spec(REPO / "experiments" / "gold.yaml", smoke=False)


def test_gold_reward_is_vader_compound():
    assert gold.gold_reward("I loved it, wonderful and great!") > 0.8
    assert gold.gold_reward("Terrible, awful, I hated it.") < -0.8
    assert gold.gold_reward("The box is on the table.") == 0.0


def test_held_out_prompts_name_no_training_subject():
    prompts = gold.make_prompts(SPEC)
    assert len(prompts["train"]) == SPEC["prompts"]["train_prompts"]
    assert len(prompts["test"]) == SPEC["prompts"]["test_prompts"]
    test_subjects = {p["subject"] for p in prompts["test"]}
    assert len(test_subjects) == SPEC["prompts"]["test_subjects"]
    assert not test_subjects & {p["subject"] for p in prompts["train"]}
    assert all(p["subject"] in p["prompt"] for p in prompts["train"] + prompts["test"])
    assert gold.make_prompts(SPEC) == prompts  # the same every time: seeded


def _records():
    texts = [
        "great, I loved it",
        "awful and sad",
        "ok",
        "a very long and wonderful happy experience",
        "x",
        "x",
    ]
    return [
        {"prompt_id": f"p{i // 2}", "prompt": f"q{i // 2}", "sample": i % 2, "answer": t}
        for i, t in enumerate(texts)
    ]


def test_annotators_label_by_gold_length_and_flips():
    rows, report = gold.label_pairs(_records(), {"temperature": 1e-6}, seed="t")
    # p2's two answers are equal: no pair. The gold annotator at a tiny temperature picks the higher VADER score.
    assert report["pairs"] == 2 and report["equal_continuations_skipped"] == 1
    assert [r["chosen"] for r in rows] == ["great, I loved it", "a very long and wonderful happy experience"]
    assert report["agree_with_gold"] == 1.0
    rows, report = gold.label_pairs(_records(), {"longer": True}, seed="t")
    assert [r["chosen"] for r in rows] == ["great, I loved it", "a very long and wonderful happy experience"]
    assert report["chosen_longer"] == 1.0
    rows, report = gold.label_pairs(_records(), {"temperature": 1e-6, "flip": 1.0}, seed="t")
    assert report["agree_with_gold"] == 0.0  # every label swapped
    # A Bradley-Terry annotator at temperature T: P(a > b) = sigmoid((r_a - r_b) / T); over many draws the share
    # of "a" labels matches it.
    many = [
        {"prompt_id": f"p{k}", "prompt": "q", "sample": j, "answer": a}
        for k in range(2000)
        for j, a in enumerate(["good", "bad"])
    ]
    rows, _ = gold.label_pairs(many, {"temperature": 1.0}, seed="bt")
    gap = gold.gold_reward("good") - gold.gold_reward("bad")
    share = np.mean([r["chosen"] == "good" for r in rows])
    assert share == pytest.approx(1 / (1 + np.exp(-gap)), abs=0.03)


def test_frontier_reading_is_monotone_and_matched_contrast_of_a_method_with_itself_is_zero():
    kl, g = np.array([0.0, 3.0, 7.0, 8.0]), np.array([0.1, 0.5, 0.7, 0.6])
    assert gold_analysis._gold_at(kl, g, 7.5) == pytest.approx(0.7)  # the best reached at or below 7.5
    assert gold_analysis._gold_at(kl, g, 1.5) == pytest.approx(0.3)
    assert np.isnan(gold_analysis._gold_at(kl, g, 9.0))  # never extrapolated
    rng = np.random.default_rng(0)
    prompts = [f"p{i}" for i in range(6)]

    def scores(shift):
        return {
            p: {"gold": list(rng.normal(shift, 0.1, 2)), "kl": list(rng.normal(shift * 10, 1, 2))}
            for p in prompts
        }

    start = {p: {"gold": [0.0, 0.0], "kl": [0.0, 0.0]} for p in prompts}
    a = {8: [scores(0.3), scores(0.3)], 16: [scores(0.6), scores(0.6)]}
    same = gold_analysis.matched_contrast(start, a, a, prompts)
    assert same["matched"] == 0.0 and same["matched_ci"] == [0.0, 0.0] and same["last_gold"] == 0.0
    # b reaches the same KL with less gold: a - b > 0 at the matched KL, a's frontier read where both reach.
    b = {
        s: [{p: {"gold": [x - 0.2 for x in v[p]["gold"]], "kl": v[p]["kl"]} for p in v} for v in runs]
        for s, runs in a.items()
    }
    diff = gold_analysis.matched_contrast(start, a, b, prompts)
    assert diff["matched"] == pytest.approx(0.2) and diff["matched_ci"][0] > 0
    assert diff["matched_per_seed"] == pytest.approx([0.2, 0.2]) and diff["matched_seed_t"] == pytest.approx(
        [0.2, 0.2]
    )


def test_seed_by_seed_contrast_reads_each_seed_at_its_own_matched_kl():
    """By hand, one prompt, one sample: seed 1 of a reaches KL 4 with gold 0.5, of b KL 2 with gold 0.4 (its frontier
    at KL 2: a's 0.25 interpolated -> -0.15); seed 2 of a reaches KL 2 with gold 0.6, of b KL 4 with gold 0.2 (at
    KL 2: b's 0.1 -> +0.5). The t interval over the two: mean 0.175, half-width 12.706 * sd / sqrt(2)."""
    start = {"p": {"gold": [0.0], "kl": [0.0]}}

    def at(gold, kl):
        return {"p": {"gold": [gold], "kl": [kl]}}

    a = {8: [at(0.5, 4.0), at(0.6, 2.0)]}
    b = {8: [at(0.4, 2.0), at(0.2, 4.0)]}
    c = gold_analysis.matched_contrast(start, a, b, ["p"])
    assert c["matched_per_seed"] == pytest.approx([-0.15, 0.5])
    half = 12.706 * np.std([-0.15, 0.5], ddof=1) / np.sqrt(2)
    assert c["matched_seed_t"] == pytest.approx([0.175 - half, 0.175 + half], abs=1e-3)
    # the pooled reading differs: mean curves a (KL 3, gold 0.55) and b (KL 3, gold 0.3) -> +0.25 at KL 3
    assert c["matched"] == pytest.approx(0.25) and c["matched_kl"] == pytest.approx(3.0)
    res = {"contrasts": {"gold": {"a - dpo": {**c, "seeds_planned": 2}}}}
    assert "| gold | a - dpo | 2 | +0.250 [" in gold_analysis.contrast_markdown(res)
    assert f"| +0.175 [{0.175 - half:+.3f}, {0.175 + half:+.3f}] | 3.00 |" in gold_analysis.contrast_markdown(
        res
    )


def test_results_count_a_seed_once_its_run_is_finished_and_say_how_many_of_the_planned(tmp_path):
    """Seeds come a few runs at a time (the power tables): a method is reported on its finished seeds (a record and
    every listed checkpoint scored), says "2 of 3" where fewer than planned are, and a half-scored run counts for
    nothing; contrasts pair only the seeds both methods finished."""
    rng = np.random.default_rng(1)
    prompts = ["p0", "p1", "p2", "p3"]
    results = tmp_path / "results"
    runs = [
        r for r in gold.train_runs(SPEC, tmp_path / "work", None, {}, ["core"]) if r.key.startswith("gold/")
    ]
    assert sorted(r.key for r in runs) == [f"gold/seed-{k}/{m}" for k in (1, 2, 3) for m in ("dpo", "iopo")]

    def write(key, step, shift):
        per_prompt = {
            p: {
                "gold": list(rng.normal(shift, 0.1, 2)),
                "kl": list(rng.normal(shift * 10, 1, 2)),
                "chars": [90, 95],
            }
            for p in prompts
        }
        folder = results / "scores" / key
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"step-{step}.json").write_text(json.dumps({"seconds": 1.0, "per_prompt": per_prompt}))
        return per_prompt

    start = {p: {"gold": [0.0, 0.0], "kl": [0.0, 0.0], "chars": [90, 90]} for p in prompts}
    (results / "scores").mkdir(parents=True)
    (results / "scores" / "start.json").write_text(json.dumps({"per_prompt": start}))
    written = {}
    for k in (1, 2, 3):
        for method, shift in (("dpo", 0.3), ("iopo", 0.5)):
            key = f"gold/seed-{k}/{method}"
            if (k, method) == (3, "iopo"):  # trained, scored at step 8 only, no record: not counted
                write(key, 8, shift)
                continue
            written[key] = {step: write(key, step, shift * step / 16) for step in (8, 16)}
            record = {"command": None, "seconds": 10.0, "cpu_seconds": 20.0, "checkpoints": [8, 16]}
            (results / "scores" / key / "run.json").write_text(json.dumps(record))
    res = gold_analysis.gold_results(SPEC, results, runs)
    dpo, iopo = res["frontiers"]["gold"]["dpo"], res["frontiers"]["gold"]["iopo"]
    assert [p["seeds"] for p in dpo["points"]] == [1, 3, 3] and dpo["seeds_planned"] == 3
    assert [p["seeds"] for p in iopo["points"]] == [1, 2, 2] and iopo["seeds_planned"] == 3
    # iopo's frontier is the mean over its two finished seeds, not the half-scored third
    by_seed = [written[f"gold/seed-{k}/iopo"][16] for k in (1, 2)]
    assert iopo["points"][2]["gold"] == pytest.approx(
        np.mean([np.mean(s[p]["gold"]) for s in by_seed for p in prompts])
    )
    contrast = res["contrasts"]["gold"]["iopo - dpo"]
    pair = {f"gold/seed-{k}/{m}": written[f"gold/seed-{k}/{m}"] for k in (1, 2) for m in ("dpo", "iopo")}
    expected = gold_analysis.matched_contrast(
        start,
        {s: [pair[f"gold/seed-{k}/iopo"][s] for k in (1, 2)] for s in (8, 16)},
        {s: [pair[f"gold/seed-{k}/dpo"][s] for k in (1, 2)] for s in (8, 16)},
        sorted(prompts),
        family=1,
    )
    assert contrast["seeds"] == [2, 2] and contrast["matched"] == pytest.approx(expected["matched"])
    assert contrast["matched_ci"] == pytest.approx(expected["matched_ci"])
    assert "| gold | iopo - dpo | 2 of 3 |" in gold_analysis.contrast_markdown(res)
    table = gold_analysis.frontier_markdown(res)
    assert "| gold | iopo | 16 | 2 of 3 |" in table and "| gold | dpo | 16 | 3 |" in table


def test_a_diagnostic_method_is_drawn_and_tabled_but_is_no_contrast_and_not_in_the_family(tmp_path):
    """`diagnostic: true` (gold.yaml's DPO at half the beta): its runs train with its own settings and without the
    flag, its frontier is reported, and it adds no "- dpo" contrast, so the Bonferroni family counts only the
    contrasts read (here IOPO's alone: family 1)."""
    spec = {
        **SPEC,
        "tables": {
            "t": {"annotators": ["flip30"], "methods": ["dpo", "iopo", "dpo_beta05"], "seeds": [1, 2]}
        },
    }
    assert spec["methods"]["dpo_beta05"]["diagnostic"] is True
    runs = gold.train_runs(spec, tmp_path / "work", None, {}, ["t"])
    half = next(r for r in runs if r.key == "flip30/seed-1/dpo_beta05")
    assert half.settings["loss.beta"] == 0.05 and "diagnostic" not in half.settings
    assert next(r for r in runs if r.key == "flip30/seed-1/dpo").settings["loss.beta"] == 0.1
    results = tmp_path / "results"
    prompts = ["p0", "p1", "p2"]
    scores = results / "scores"
    scores.mkdir(parents=True)
    start = {p: {"gold": [0.0], "kl": [0.0], "chars": [90]} for p in prompts}
    (scores / "start.json").write_text(json.dumps({"per_prompt": start}))
    for run in runs:
        method = run.key.rsplit("/", 1)[1]
        shift = {"dpo": 0.2, "iopo": 0.3, "dpo_beta05": 0.4}[method]
        (scores / run.key).mkdir(parents=True)
        for step in (8, 16, 24, 32):
            point = {
                p: {"gold": [shift * step / 32 + i / 100], "kl": [step / 4], "chars": [90]}
                for i, p in enumerate(prompts)
            }
            (scores / run.key / f"step-{step}.json").write_text(
                json.dumps({"seconds": 1.0, "per_prompt": point})
            )
        record = {"command": None, "seconds": 1.0, "cpu_seconds": 1.0, "checkpoints": [8, 16, 24, 32]}
        (scores / run.key / "run.json").write_text(json.dumps(record))
    res = gold_analysis.gold_results(spec, results, runs)
    assert set(res["frontiers"]["flip30"]) == {"dpo", "iopo", "dpo_beta05"}
    assert res["frontiers"]["flip30"]["dpo_beta05"]["points"][-1]["gold"] == pytest.approx(0.41)
    assert (
        res["frontiers"]["flip30"]["dpo_beta05"]["diagnostic"]
        and not res["frontiers"]["flip30"]["dpo"]["diagnostic"]
    )
    assert list(res["contrasts"]["flip30"]) == ["iopo - dpo"]
    iopo = res["contrasts"]["flip30"]["iopo - dpo"]
    assert iopo["family"] == 1 and iopo["matched"] == pytest.approx(0.1)
    assert "dpo_beta05" not in gold_analysis.contrast_markdown(res)
    assert "| flip30 | dpo_beta05 | 32 | 2 |" in gold_analysis.frontier_markdown(res)


def test_every_planned_run_is_a_valid_iopo_command(tmp_path):
    """Each run of every table of gold.yaml parses as its command's config (a typo fails here, not hours in)."""
    from iopo.config import OnlineConfig, TrainConfig, load_config

    assert all(
        isinstance(name, str) for name in [*SPEC["tables"], *SPEC["methods"], *SPEC["annotators"]]
    )  # no YAML null
    pairs = {name: {"file": "pairs.jsonl"} for name in SPEC["annotators"]}
    runs = gold.train_runs(SPEC, tmp_path, None, pairs, list(SPEC["tables"]))
    assert {r.command for r in runs} == {"train", "online"}
    for run in runs:
        schema = OnlineConfig if run.command == "online" else TrainConfig
        cfg = load_config(None, suite._overrides(run.settings), schema)
        assert cfg.seed == run.settings["seed"]
    online = {r.settings["method"] for r in runs if r.command == "online"}
    assert online == {"iter_dpo", "spin", "xpo", "sppo", "inpo"}


def test_committed_record_stands_for_a_run_only_with_every_checkpoint_scored(tmp_path):
    """A run trained and scored in another checkout (its runs folder gone) is not trained again when its record and
    every score it lists are committed; its record carries its time into the results' compute."""
    work, results = tmp_path / "work", tmp_path / "results"
    (run,) = [r for r in gold.train_runs(SPEC, work, None, {}, ["core"]) if r.key == "gold/seed-1/dpo"]
    scores = results / "scores" / run.key
    assert gold.record_of(results, run) is None  # nothing trained
    # Trained (done.json, as suite.execute writes it) with checkpoints 8 and 16, only step 8 scored: no record yet.
    run.state.mkdir(parents=True)
    done = {"command": run.argv()[3:], "seconds": 120.0, "cpu_seconds": 230.0, "finished": 1.0}
    (run.state / "done.json").write_text(json.dumps(done))
    for step in (8, 16):
        (run.folder / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (run.folder / "checkpoints" / f"step-{step}" / "trainer_state.json").write_text("{}")
    assert [s for s, _ in gold.checkpoints_of(run)] == [8, 16]
    scores.mkdir(parents=True)
    (scores / "step-8.json").write_text(json.dumps({"seconds": 30.0, "per_prompt": {}}))
    gold.write_record(results, run)
    assert not (scores / "run.json").exists()
    (scores / "step-16.json").write_text(json.dumps({"seconds": 31.0, "per_prompt": {}}))
    gold.write_record(results, run)
    record = gold.record_of(results, run)
    assert record["checkpoints"] == [8, 16] and record["command"] == run.argv()[3:]
    cost = gold_analysis.compute(results)
    assert (
        cost["training_runs"] == 1 and cost["training_seconds"] == 120.0 and cost["scoring_seconds"] == 61.0
    )
    # A listed score missing: the record no longer stands; a run trained again forgets its old scores.
    (scores / "step-16.json").unlink()
    assert gold.record_of(results, run) is None
    gold.forget_scores(results, run)
    assert list(scores.iterdir()) == []


def test_every_committed_record_still_matches_its_planned_command():
    """gold.yaml may be reorganised (its online methods share a YAML anchor, which reorders their settings) only
    while every committed run record still reads as the command gold.py would run now: otherwise a fresh checkout
    would refuse the committed runs or ask for hours of --rerun."""
    results = REPO / SPEC["results_dir"]
    runs = gold.train_runs(SPEC, REPO / SPEC["work_dir"], None, {}, list(SPEC["tables"]))
    records = {  # runs recorded with their command (the earliest records hold none and stand as they are)
        r.key: (r, record)
        for r in runs
        if (p := results / "scores" / r.key / "run.json").is_file()
        and (record := json.loads(p.read_text()))["command"] is not None
    }
    assert len(records) >= 29  # the runs recorded with their command before this check was written
    for key, (run, record) in records.items():
        assert suite.same_command(record["command"], run.argv()[3:]), key
    reordered = [k for k, (run, rec) in records.items() if rec["command"] != run.argv()[3:]]
    assert "gold/seed-1/sppo_online" in reordered  # the anchor did reorder: the comparison is what keeps them


@pytest.mark.slow
def test_smoke_testbed_samples_trains_scores_and_reports(tiny_model_dir, tmp_path):
    work, results, docs = tmp_path / "work", tmp_path / "results", tmp_path / "results.md"
    docs.write_text("# Results\n<!-- gold:frontier -->\nold\n<!-- /gold:frontier -->\nprose kept\n")
    args = ["--smoke", "--model", str(tiny_model_dir), "--work-dir", str(work), "--results-dir", str(results)]
    run = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "gold.py"), *args, "--docs", str(docs)],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((work / "pairs" / "report.json").read_text())
    assert set(report) == {"gold", "flip30", "longer", "half_length", "flip50"}
    assert report["longer"]["chosen_longer"] >= 0.5
    scored = sorted(
        p.relative_to(results / "scores").as_posix()
        for p in (results / "scores").rglob("*.json")
        if p.name != "run.json"
    )
    # the start, checkpoints 2 and 4 of each of the four offline runs, and the online run's two rounds (steps 2, 4)
    assert len(scored) == 1 + 5 * 2 and "start.json" in scored and "gold/seed-1/iopo/step-4.json" in scored
    assert "gold/seed-1/iter_dpo_gold/step-4.json" in scored
    manifest = json.loads((work / "runs/gold/seed-1/iter_dpo_gold/round_2/manifest.json").read_text())
    assert manifest["judge"]["type"] == "function" and manifest["stages"]["judge"]["done"]
    one = json.loads((results / "scores" / "gold/seed-1/dpo/step-2.json").read_text())["per_prompt"]
    assert len(one) == 4 and all(len(v["gold"]) == 2 and len(v["kl"]) == 2 for v in one.values())
    start = json.loads((results / "scores" / "start.json").read_text())["per_prompt"]
    assert all(abs(k) < 1e-4 for v in start.values() for k in v["kl"])  # the start's KL to itself
    frontier = json.loads((results / "frontier.json").read_text())
    assert set(frontier["frontiers"]) == {"gold", "longer"} and "iopo - dpo" in frontier["contrasts"]["gold"]
    assert "iter_dpo_gold - dpo" in frontier["contrasts"]["gold"]
    assert [p["step"] for p in frontier["frontiers"]["gold"]["dpo"]["points"]] == [0, 2, 4]
    assert (results / "frontier.png").is_file()
    text = docs.read_text()
    assert "\nold\n" not in text and "| gold | dpo | 2 |" in text and "prose kept" in text
    # Again, one table only: nothing trained or scored anew, and the results still hold the other table's runs.
    again = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "gold.py"), "online", *args, "--docs", ""],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert again.returncode == 0 and "iopo train" not in again.stdout and "KL" not in again.stdout
    frontier = json.loads((results / "frontier.json").read_text())
    assert {"iopo - dpo", "iter_dpo_gold - dpo"} <= set(frontier["contrasts"]["gold"])
    # A fresh checkout: the runs folder is gone, the committed scores and records remain. Nothing is trained or
    # scored again, and the results (contrasts, compute) are the same.
    assert len(list((results / "scores").rglob("run.json"))) == 5
    assert frontier["compute"]["training_runs"] == 5 and frontier["compute"]["training_seconds"] > 0
    shutil.rmtree(work / "runs")  # the runs and their done.json records (runs/_suite)
    listed = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "gold.py"), "--list", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert listed.stdout.count("committed record") == 5, listed.stdout + listed.stderr
    fresh = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "gold.py"), *args, "--docs", ""],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert fresh.returncode == 0 and "iopo train" not in fresh.stdout and "KL" not in fresh.stdout, (
        fresh.stdout
    )
    again = json.loads((results / "frontier.json").read_text())
    assert again["contrasts"] == frontier["contrasts"] and again["compute"] == frontier["compute"]
