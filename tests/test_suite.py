"""The evidence suite (experiments/suite.py): its statistics by hand, its splits, and the whole pipeline on a tiny
random model (--smoke: every kind of run, its results, its resumption, its refusal of changed settings)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from iopo.io.llama_server import find_llama_server

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

import analysis  # noqa: E402
import suite  # noqa: E402


def test_two_level_bootstrap_degenerate_and_spread():
    ones = [np.ones(50), np.ones(40)]
    assert analysis.two_level_bootstrap(ones, analysis._mean) == [1.0, 1.0]
    # seeds that disagree: the interval spans both seeds' values; one seed alone gives a tight interval
    apart = [np.zeros(100), np.ones(100)]
    low, high = analysis.two_level_bootstrap(apart, analysis._mean)
    assert low == 0.0 and high == 1.0
    low, high = analysis.two_level_bootstrap([np.r_[np.zeros(50), np.ones(50)]], analysis._mean)
    assert 0.35 < low < 0.5 < high < 0.65


def test_prompt_bootstrap_draws_whole_prompts_once_for_every_seed():
    # Two prompts of 10 pairs each, every pair of the first right (1), every pair of the second wrong (0).
    values = np.r_[np.ones(10), np.zeros(10)]
    groups = np.r_[np.zeros(10, int), np.ones(10, int)]
    draws = analysis.bootstrap_draws([values, values, values], analysis._mean, groups=groups)
    assert set(np.round(draws, 6)) <= {0.0, 0.5, 1.0}  # a prompt's pairs come and go together, in every seed
    assert analysis.two_level_bootstrap([values] * 3, analysis._mean, groups=groups) == [0.0, 1.0]
    low, high = analysis.two_level_bootstrap([values] * 3, analysis._mean)  # pairs drawn alone: far narrower
    assert 0.3 < low < 0.5 < high < 0.7
    # The Bonferroni interval of a family of 10 cells is wider than the 95% one.
    noisy = np.random.default_rng(0).normal(0.1, 1, 60)
    one = analysis.two_level_bootstrap([noisy[:30], noisy[30:]], analysis._mean)
    family = analysis.family_interval([noisy[:30], noisy[30:]], analysis._mean, 10)
    assert family[0] < one[0] and family[1] > one[1]
    with pytest.raises(ValueError, match="prompt groups"):
        analysis.bootstrap_draws([values[:5]], analysis._mean, groups=groups)


def test_paired_difference_on_the_same_pairs():
    a = [{"margins": np.array([0.3, -0.1, 0.2, 0.5])}]
    b = [{"margins": np.array([0.1, -0.2, -0.1, 0.4])}]
    diff = analysis.paired_difference(a, b)
    assert diff["margin_reward"] == pytest.approx(np.mean([0.2, 0.1, 0.3, 0.1]))
    assert diff["pairwise_accuracy"] == pytest.approx(0.25)  # pair 3 turned right, nothing turned wrong
    assert diff["margin_reward_ci"][0] > 0  # every pair moved up
    same = analysis.paired_difference(a, a)
    assert same["margin_reward"] == 0 and same["margin_reward_ci"] == [0.0, 0.0]


def test_change_difference_is_a_difference_of_paired_changes():
    iopo_clean, iopo_flip = (
        [{"margins": np.array([0.4, 0.2, -0.1])}],
        [{"margins": np.array([0.3, -0.1, -0.2])}],
    )
    dpo_clean, dpo_flip = [{"margins": np.array([0.5, 0.1, 0.2])}], [{"margins": np.array([0.1, -0.2, -0.3])}]
    d = analysis.change_difference(iopo_flip, iopo_clean, dpo_flip, dpo_clean)
    # iopo changed by [-0.1, -0.3, -0.1], dpo by [-0.4, -0.3, -0.5]: iopo lost 0.4 / 3 less margin per pair
    assert d["margin_reward"] == pytest.approx(np.mean([0.3, 0.0, 0.4]))
    # right answers: iopo [1, 1, 0] -> [1, 0, 0] (-1 right), dpo [1, 1, 1] -> [1, 0, 0] (-2 right)
    assert d["pairwise_accuracy"] == pytest.approx(1 / 3)
    assert analysis.change_difference(dpo_flip, dpo_clean, dpo_flip, dpo_clean)["margin_reward_ci"] == [
        0.0,
        0.0,
    ]


def test_online_compare_pairs_the_last_round_of_each_seed(tmp_path):
    def run(name, seed, rounds):  # rounds: per round (margins, RM win rate vs start)
        folder = tmp_path / name / f"seed-{seed}"
        for k, (margins, win) in enumerate(rounds, 1):
            (folder / f"round_{k}").mkdir(parents=True)
            (folder / f"round_{k}" / "scores.json").write_text(
                json.dumps({"round": k, "margins": margins, "judged": {"win": win}})
            )
        return folder

    early = ([9.0, 9.0], 1.0)  # round 1 must not count: only the last round is compared
    folders = {
        "iter_dpo": [
            run("iter_dpo", 1, [early, ([0.1, -0.2], 0.5)]),
            run("iter_dpo", 2, [early, ([0.0, 0.1], 0.4)]),
        ],
        "iopo": [run("iopo", 1, [early, ([0.3, 0.2], 0.6)]), run("iopo", 2, [early, ([0.1, -0.1], 0.6)])],
    }
    compare = analysis.online_compare(folders)
    assert set(compare) == {"minus iter_dpo"}  # no DPO runs: that baseline is left out
    row = compare["minus iter_dpo"]["iopo"]
    assert row["round"] == 2 and row["seeds"] == 2
    assert row["margin_reward"] == pytest.approx(np.mean([0.2, 0.4, 0.1, -0.2]))
    # right (> 0) per pair, iopo minus iter_dpo: seed 1 [1, 1] - [1, 0]; seed 2 [1, 0] - [0, 1] (a 0.0 is not right)
    assert row["pairwise_accuracy"] == pytest.approx(np.mean([0, 1, 1, -1]))
    assert row["win_rate"]["mean"] == pytest.approx(0.15) and row["win_rate"]["n"] == 2
    # a non-finite margin is an error, not a result
    (folders["iopo"][0] / "round_2" / "scores.json").write_text(
        json.dumps({"round": 2, "margins": [float("nan"), 0.1], "judged": {"win": 0.5}})
    )
    with pytest.raises(ValueError, match="not finite"):
        analysis.online_compare(folders)


def test_prompt_shares_weigh_prompts_equally():
    shares = analysis._prompt_shares([["win", "lose"], ["tie"], ["invalid"], ["win", "win", "win", "bad"]])
    assert shares.tolist() == [[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.75, 0.0, 0.0]]


def test_compute_counts_planned_runs_per_table_and_the_rest_apart(tmp_path):
    for key, seconds, cpu in (
        ("sweep/dpo/lr-0.001/seed-1", 100.0, 190.0),
        ("sweep/dpo/lr-0.0001/seed-1", 50.0, 95.0),  # a rate since dropped from the grid
        ("offline/seed-1/dpo", 120.0, 230.0),
        ("rm/pku", 30.0, None),  # recorded before CPU time was
    ):
        (tmp_path / "_suite" / key).mkdir(parents=True)
        record = {"seconds": seconds} | ({"cpu_seconds": cpu} if cpu else {})
        (tmp_path / "_suite" / key / "done.json").write_text(json.dumps(record))
    planned = {"sweep/dpo/lr-0.001/seed-1", "offline/seed-1/dpo", "rm/pku", "offline/seed-2/dpo"}
    found = analysis._seconds(tmp_path, planned)
    assert analysis._wall(found) == {"sweep": 100.0, "offline": 120.0, "rm": 30.0}
    assert found["cpu"] == {"sweep": 190.0, "offline": 230.0}
    assert found["outside_plan"] == {"runs": 1, "seconds": 50.0, "cpu_seconds": 95.0}
    assert analysis._wall(analysis._seconds(tmp_path))["sweep"] == 150.0  # no plan: every run counts


def test_same_command_reads_settings_not_their_order():
    recorded = ["train", "method=dpo", "loss.beta=0.1", "judge.function=experiments/gold.py:gold_judge"]
    assert suite.same_command(
        recorded, ["train", "judge.function=experiments/gold.py:gold_judge", "loss.beta=0.1", "method=dpo"]
    )
    assert not suite.same_command(recorded, ["online", *recorded[1:]])  # another subcommand
    assert not suite.same_command(
        recorded, ["train", "method=dpo", "loss.beta=0.2", recorded[3]]
    )  # another value
    assert not suite.same_command(recorded, recorded[:3])  # a setting dropped
    assert not suite.same_command(recorded, [*recorded, "seed=2"])  # a setting added
    # a key given twice means what iopo reads: the later value
    assert suite.same_command(["train", "loss.beta=0.2"], ["train", "loss.beta=0.1", "loss.beta=0.2"])
    assert not suite.same_command(["train", "loss.beta=0.1"], ["train", "loss.beta=0.1", "loss.beta=0.2"])
    assert not suite.same_command([], [])


def test_prepare_data_splits_by_prompt_without_duplicates(tmp_path):
    ds = {
        "path": "experiments/data/pku-saferlhf/pku_seferlhf_realign_dpo_5k.json",
        "columns": {"chosen": "response.0", "rejected": "response.1"},
        "test": 40,
        "validation": 30,
    }
    report = suite.prepare_data("pku", ds, tmp_path)
    assert report["rows"] == 5135 and report["duplicates_dropped"] == 1545
    rows = {
        split: [json.loads(x) for x in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        for split in ("train", "validation", "test")
    }
    assert len(rows["test"]) == 40 and len(rows["validation"]) == 30
    assert sum(len(r) for r in rows.values()) == 5135 - 1545
    prompts = {split: {r["prompt"] for r in found} for split, found in rows.items()}
    assert not prompts["test"] & prompts["train"] and not prompts["test"] & prompts["validation"]
    assert not prompts["validation"] & prompts["train"]
    assert suite.prepare_data("pku", ds, tmp_path) == json.loads(
        (tmp_path / "splits.json").read_text()
    )  # reused


def _suite(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "experiments" / "suite.py"), *args],
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )


@pytest.mark.slow
def test_smoke_suite_runs_every_table_resumes_and_reports(tiny_model_dir, tmp_path):
    work, results, docs = tmp_path / "runs", tmp_path / "results", tmp_path / "results.md"
    docs.write_text(
        "# Results\n\nprose kept\n<!-- suite:offline -->\nold table\n<!-- /suite:offline -->\nend\n"
    )
    args = [
        "--smoke",
        "--model",
        str(tiny_model_dir),
        "--work-dir",
        str(work),
        "--results-dir",
        str(results),
        "--docs",
        str(docs),
    ]
    llm = find_llama_server() is not None
    if not llm:
        args.append("--no-llm-judge")
    first = _suite(*args)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]

    offline = json.loads((results / "offline.json").read_text())
    methods = offline["conditions"]["clean"]["methods"]
    assert set(methods) == {"sft", "dpo", "iopo", "iopo_equal_compute", "iopo_reversed"}
    for row in methods.values():
        assert row["seeds"] == 2 and row["pairs"] == 8
        low, high = row["pairwise_accuracy_ci"]
        assert low <= row["pairwise_accuracy"] <= high
        assert len(row["curve"]) >= 2  # eval_steps=1: test-split points over training
    # budgets: IOPO at equal policy steps runs both players' steps, at equal compute the baselines' count
    steps = {
        m: yaml.safe_load((work / f"offline/seed-1/{m}/config.yaml").read_text())["optim"]["max_steps"]
        for m in methods
    }
    assert steps == {"sft": 2, "dpo": 2, "iopo": 4, "iopo_equal_compute": 2, "iopo_reversed": 2}
    chosen = json.loads((results / "sweep.json").read_text())["choice"]
    assert (
        yaml.safe_load((work / "offline/seed-2/dpo/config.yaml").read_text())["optim"]["learning_rate"]
        == chosen["dpo"]
    )
    weights = methods["iopo"]["is_weights"]
    assert weights["protagonist"]["steps_logged"] == 4 and weights["adversary"]["steps_logged"] == 4
    assert "minus_dpo" in methods["iopo"] and "minus_dpo" not in methods["dpo"]
    # the ablation of our reading is set against IOPO at the same compute, not against IOPO at equal policy steps
    assert "minus_reading_base" in methods["iopo_reversed"] and "minus_reading_base" not in methods["iopo"]

    judged = offline["judged"]
    assert set(judged["vs sft"]["rm"]) == {"dpo", "iopo", "iopo_equal_compute", "iopo_reversed"}
    assert set(judged["vs dpo"]["rm"]) == {"sft", "iopo", "iopo_equal_compute", "iopo_reversed"}
    for row in judged["vs sft"]["rm"].values():
        assert row["seeds"] == 2 and row["win"] + row["tie"] + row["lose"] == pytest.approx(1.0)
    if llm:
        assert set(judged["vs sft"]["llm"]) == {"iopo"}
    # the answers were generated once: the second baseline's folder reused them (same files)
    first_answers = (work / "offline-eval/seed-1/rm-vs-sft/generations/iopo.jsonl").read_text()
    assert (work / "offline-eval/seed-1/rm-vs-dpo/generations/iopo.jsonl").read_text() == first_answers

    bias = json.loads((results / "bias.json").read_text())
    assert set(bias["conditions"]) == {"flip30", "longer"}
    flipped = yaml.safe_load((work / "bias/flip30/seed-1/dpo/config.yaml").read_text())["data"]
    assert flipped["flip_labels"] == 0.3 and flipped["test_path"].endswith("test.jsonl")
    # each method's change from its clean offline runs (same seeds and test pairs), and IOPO's change minus DPO's
    change = bias["change_from_clean"]
    assert set(change) == {"flip30", "longer"} and set(change["flip30"]) == {"dpo", "iopo"}
    assert (
        "minus_dpo_change" in change["flip30"]["iopo"] and "minus_dpo_change" not in change["flip30"]["dpo"]
    )
    flip = bias["conditions"]["flip30"]["methods"]["dpo"]["margin_reward"]
    clean = offline["conditions"]["clean"]["methods"]["dpo"]["margin_reward"]
    assert change["flip30"]["dpo"]["minus_clean"]["margin_reward"] == pytest.approx(flip - clean)

    online = json.loads((results / "online.json").read_text())
    assert set(online) == {"iter_dpo", "iopo"}
    assert (
        online["iter_dpo"]["annotation_requests_per_run"] > 0 == online["iopo"]["annotation_requests_per_run"]
    )
    assert set(online["iopo"]["rounds"]) == {"1", "2"}
    # after the last round, IOPO minus Iter-DPO on the same seeds and test pairs, from each run's per-pair margins
    compare = json.loads((results / "online_compare.json").read_text())["minus iter_dpo"]["iopo"]
    assert compare["round"] == 2 and compare["seeds"] == 2
    last = {
        m: [json.loads((work / f"online/seed-{s}/{m}/round_2/scores.json").read_text()) for s in (1, 2)]
        for m in ("iopo", "iter_dpo")
    }
    assert compare["margin_reward"] == pytest.approx(
        np.mean(
            [
                np.mean(a["margins"]) - np.mean(b["margins"])
                for a, b in zip(last["iopo"], last["iter_dpo"], strict=True)
            ]
        )
    )
    lo, hi = compare["pairwise_accuracy_ci"]
    assert lo <= compare["pairwise_accuracy"] <= hi
    wins = [
        a["judged"]["win"] - b["judged"]["win"] for a, b in zip(last["iopo"], last["iter_dpo"], strict=True)
    ]
    assert compare["win_rate"]["mean"] == pytest.approx(np.mean(wins)) and compare["win_rate"]["n"] == 2

    text = docs.read_text()
    assert text.startswith("# Results\n\nprose kept\n") and text.rstrip().endswith("<!-- /suite:compute -->")
    assert "old table" not in text and "| iopo_equal_compute |" in text and "<!-- suite:online -->" in text
    assert "| minus iter_dpo | iopo | 2 |" in text
    readings = text.split("<!-- suite:readings -->")[1].split("<!-- /suite:readings -->")[0]
    assert "| iopo_reversed |" in readings and "| iopo_equal_compute |" in readings
    compute = json.loads((results / "compute.json").read_text())
    assert set(compute["cpu"]) == set(compute) - {"cpu", "outside_plan"}
    assert all(v > 0 for v in compute["cpu"].values()) and compute["outside_plan"]["runs"] == 0
    assert "CPU time of the runs" in text
    for png in ("margins.png", "curves.png", "is_weights.png", "bias.png", "online.png"):
        assert (results / png).stat().st_size > 5000, png

    # run again: every run is done, nothing is trained, the results are the same
    second = _suite(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "iopo train ..." not in second.stdout and "0.0 min of runs this time" in second.stdout
    assert json.loads((results / "offline.json").read_text()) == offline

    # a finished run whose settings changed stops the suite, naming it; nothing is deleted
    spec = yaml.safe_load((REPO / "experiments" / "suite.yaml").read_text())
    spec["smoke"]["steps"] = 3
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(spec))
    changed = _suite(*args, "--spec", str(tmp_path / "changed.yaml"))
    assert changed.returncode == 1
    assert "sweep/sft/lr-0.001/seed-1 finished with other settings" in changed.stderr
    assert (work / "sweep/sft/lr-0.001/seed-1/final").is_dir()


def test_regrade_rebuilds_the_splits_and_widens_the_committed_intervals(tmp_path, monkeypatch):
    """--regrade from the committed files: the rebuilt PKU test split matches data.json's checksum (36 prompts),
    the estimates equal the committed ones, and drawing whole prompts widens the intervals."""
    results = REPO / "experiments" / "results"
    monkeypatch.setattr(analysis, "N_BOOT", 300)
    shutil.copytree(results, tmp_path / "results", ignore=shutil.ignore_patterns("gold", "*.png"))
    spec = suite.load_spec(REPO / "experiments" / "suite.yaml", smoke=False)
    out = analysis.regrade(suite.Suite(spec, tmp_path / "work", None, llm=False), tmp_path / "results")
    assert out["prompts"]["pku"] == 36
    committed = json.loads((results / "offline.json").read_text())["conditions"]["clean"]["methods"]
    rows = out["tables"]["offline"]["clean"]
    widths = []
    for method, row in rows.items():
        assert row["pairwise_accuracy"] == pytest.approx(committed[method]["pairwise_accuracy"])
        if "minus_dpo" in row:
            assert row["minus_dpo"]["margin_reward"] == pytest.approx(
                committed[method]["minus_dpo"]["margin_reward"]
            )
            new, old = (
                row["minus_dpo"]["margin_reward_ci"],
                committed[method]["minus_dpo"]["margin_reward_ci"],
            )
            widths.append((new[1] - new[0]) / (old[1] - old[0]))
    assert np.median(widths) > 1.3
    # the length metric of the bias table: DPO's shift toward the longer answer under the length-biased annotator
    longer = out["length_preference"]["by_condition"]["longer"]
    assert longer["dpo"]["shift_from_clean"] > longer["iopo_equal_compute"]["shift_from_clean"] > 0
    assert (tmp_path / "results" / "regraded.json").is_file()
