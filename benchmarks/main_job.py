"""The main job's timeline: `iopo train` (configs/quickstart.yaml), `iopo train-rm` (configs/rm.yaml), `iopo eval`
(configs/eval.yaml, the reward-model judge) and `iopo report`, as scripts/quickstart.sh runs them, each timed, then
the same again (the repeat: nothing left to train, the reward model kept, every answer, judgment and log-prob read).

Run: .venv/bin/python benchmarks/main_job.py [--out benchmarks/results/main_job.json]

Everything is written under a temporary folder (the checkout's runs/ and evals/ are not touched). Each command's
wall time is measured around its process; the evaluation's own split (log-probs of each model, generation, judging)
comes from its eval.json `timings`, training's from its metrics (steps) and log.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine  # noqa: E402


def timed(cmd: list[str]) -> float:
    tick = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return round(time.perf_counter() - tick, 1)


def one_pass(work: Path) -> dict:
    iopo = [sys.executable, "-m", "iopo"]
    run, rm, ev = work / "quickstart", work / "rm", work / "eval"
    quiet = ["progress_bar=false"]
    stages = {}
    stages["train"] = timed(
        [*iopo, "train", "--config", "configs/quickstart.yaml", "resume=true", f"output_dir={run}", *quiet]
    )
    if not (rm / "final" / "config.json").is_file():
        stages["train-rm"] = timed(
            [*iopo, "train-rm", "--config", "configs/rm.yaml", f"output_dir={rm}", *quiet]
        )
    stages["eval"] = timed(
        [
            *iopo,
            "eval",
            "--config",
            "configs/eval.yaml",
            f"models=[{run}]",
            f"judges.rm.model={rm / 'final'}",
            f"output_dir={ev}",
            *quiet,
        ]
    )
    stages["report"] = timed([*iopo, "report", str(run), str(rm), str(ev), f"output={run / 'report.md'}"])
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evaluated = json.loads((ev / "eval.json").read_text())
    return {
        "stages_s": stages,
        "total_s": round(sum(stages.values()), 1),
        "train_steps_s": round(sum(r.get("step_seconds", 0.0) for r in steps), 1),
        "eval_timings_s": {k: round(v, 1) for k, v in evaluated["timings"].items()},
        "eval_logps_sources": {
            "baseline": evaluated.get("baseline_logps_source"),
            **{k: m.get("logps_source") for k, m in evaluated["metrics"].items()},
        },
        "rm_heldout_accuracy": json.loads((rm / "eval.json").read_text())["pairwise_accuracy"],
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
