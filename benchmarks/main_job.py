"""The main job's timeline: `iopo train` (configs/quickstart.yaml), `iopo train-rm` (configs/rm.yaml), `iopo eval`
(configs/eval.yaml, the reward-model judge) and `iopo report`, as scripts/quickstart.sh runs them, each timed, then
the same again (the repeat: nothing left to train, the reward model kept, every answer, judgment and log-prob read).

Run: .venv/bin/python benchmarks/main_job.py [--out benchmarks/results/main_job.json]

Everything is written under a temporary folder (the checkout's runs/ and evals/ are not touched). Each command's
wall time is measured around its process, and split into its phases by the marks iopo writes under
IOPO_MEMORY_TRACE (load, the starting model's log-probs, steps, evaluations, checkpoint, export; the reward model's
steps and held-out accuracy; the evaluation's metrics, generation, judge check and judging of each model).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine  # noqa: E402


def timed(cmd: list[str], trace: Path) -> tuple[float, dict]:
    """The command's wall time and its timeline: seconds per phase, from the phase marks iopo writes under
    IOPO_MEMORY_TRACE (each phase lasts until the next mark; the steps of one kind summed), the interpreter's start
    and imports up to the first mark as "start"."""
    trace.unlink(missing_ok=True)
    tick, began = time.perf_counter(), time.time()
    env = {**os.environ, "IOPO_MEMORY_TRACE": str(trace)}
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wall, ended = time.perf_counter() - tick, time.time()
    marks = [json.loads(line) for line in trace.read_text().splitlines()] if trace.is_file() else []
    phases: dict[str, float] = {}
    edges = [(began, "start")] + [(m["t"], _kind(m["phase"])) for m in marks] + [(ended, None)]
    for (t, name), (t_next, _) in itertools.pairwise(edges):
        phases[name] = phases.get(name, 0.0) + t_next - t
    return round(wall, 1), {k: round(v, 1) for k, v in phases.items()}


def _kind(phase: str) -> str:
    """A phase mark's kind: the optimizer steps of every player are "train steps", every mid-run evaluation
    "evaluations during training"."""
    if phase.startswith("train step "):
        return "train steps"
    if phase.startswith("eval at step "):
        return "evaluations during training"
    return phase


def one_pass(work: Path) -> dict:
    iopo = [sys.executable, "-m", "iopo"]
    run, rm, ev = work / "quickstart", work / "rm", work / "eval"
    quiet = ["progress_bar=false"]
    stages, timeline = {}, {}
    trace = work / "phases.jsonl"
    stages["train"], timeline["train"] = timed(
        [*iopo, "train", "--config", "configs/quickstart.yaml", "resume=true", f"output_dir={run}", *quiet],
        trace,
    )
    if not (rm / "final" / "config.json").is_file():
        stages["train-rm"], timeline["train-rm"] = timed(
            [*iopo, "train-rm", "--config", "configs/rm.yaml", f"output_dir={rm}", *quiet], trace
        )
    stages["eval"], timeline["eval"] = timed(
        [
            *iopo,
            "eval",
            "--config",
            "configs/eval.yaml",
            f"models=[{run}]",
            f"judges.rm.model={rm / 'final'}",
            f"output_dir={ev}",
            *quiet,
        ],
        trace,
    )
    stages["report"], timeline["report"] = timed(
        [*iopo, "report", str(run), str(rm), str(ev), f"output={run / 'report.md'}"], trace
    )
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evaluated = json.loads((ev / "eval.json").read_text())
    held = json.loads((rm / "eval.json").read_text())
    check = evaluated["judges"]["rm"].get("check", {})

    def relative(path: str | None) -> str | None:  # no machine path in the committed results
        return None if path is None else "<tmp>/" + str(Path(path).relative_to(work))

    return {
        "stages_s": stages,
        "total_s": round(sum(stages.values()), 1),
        "timeline_s": timeline,
        "train_steps_s": round(sum(r.get("step_seconds", 0.0) for r in steps), 1),
        "eval_timings_s": {k: round(v, 1) for k, v in evaluated["timings"].items()},
        "eval_logps_sources": {
            "baseline": relative(evaluated.get("baseline_logps_source")),
            **{k: relative(m.get("logps_source")) for k, m in evaluated["metrics"].items()},
        },
        "rm_heldout_accuracy": held["pairwise_accuracy"],
        "rm_heldout_pairs": held["n_pairs"],
        "rm_check": {k: check.get(k) for k in ("pairs", "agreement", "agreement_ci", "informative")},
        "table1_rm": {
            k: evaluated["judges"]["rm"]["models"]["quickstart"]["table1"].get(k)
            for k in ("win", "tie", "lose")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/main_job.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        first = one_pass(Path(tmp))
        print(json.dumps(first), flush=True)
        repeat = one_pass(Path(tmp))
        print(json.dumps(repeat), flush=True)
    result = {"machine": machine(), "first_run": first, "repeat": repeat}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
