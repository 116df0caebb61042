"""`iopo online`: preference optimization round by round (paper Sec. 6.4, Table 2, Fig. 4-5).

- method=iter_dpo, rounds k = 1..K of stages joined by files under round_k/:
  prompts (P from the pool, seeded, none reused unless asked) -> generate (n answers from the current policy, in
  process) -> judge (any judge, through the run's SQLite store and ledger) -> pairs (kept only when the judge
  separates them; the top keep_ratio by judged confidence, optionally mixed with human pairs) -> train (DPO against
  the `reference` setting: the starting model or the policy as the round began) -> score.
- method=iopo / dpo: the same rounds and optimizer steps on the human pairs only (train -> score): the game goes
  on with zero judge calls; dpo is the offline control.

score: margin reward and pairwise accuracy on the held-out human split against the starting model, and the judged
win rate of the policy's answers against the starting policy's.

The players, optimizers and accelerator live across rounds (trainer.open_session / fit). Every stage writes its
files atomically and records itself in round_k/manifest.json; killed at any moment, the same command loads the
newest round checkpoint, skips every finished stage, and asks no judge twice (the store keeps each judgment as it
arrives). A budget (max_judge_requests, max_cost) stops the run at a stage boundary with everything saved.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from iopo import checkpoint as ckpt
from iopo import runfolder, stats, trainer
from iopo.config import ConfigError, OnlineConfig, changed_settings, dump_config
from iopo.data import load_split, tokenize_pairs, unique_prompts, write_rejects
from iopo.data_formats import PreferencePair
from iopo.jsonio import write_json, write_jsonl

STAGES = {
    "iter_dpo": ("prompts", "generate", "judge", "pairs", "train", "score"),
    "iopo": ("train", "score"),
    "dpo": ("train", "score"),
}
ROUND_FILES = (
    "manifest.json",
    "prompts.jsonl",
    "generations.jsonl",
    "judgments.jsonl",
    "pairs.jsonl",
    "scores.json",
    "score_generations.jsonl",
    "reference_logps.pt",
)


def _own_round(folder: Path) -> list[Path]:
    """What the online rounds write into round_k/ (and start/): their files and the round's checkpoint."""
    found = runfolder.own_files_named(ROUND_FILES)(folder)
    return (
        found + runfolder.own_folder(folder / "checkpoint") + runfolder.own_folder(folder / ".tmp-checkpoint")
    )


def _places(run: Path) -> dict:
    """The places of an online run folder that a fresh start may clean (see iopo.runfolder)."""
    rounds = sorted(p.name for p in run.glob("round_*")) if run.is_dir() else []
    own = runfolder.own_file
    places = {**runfolder.TRAIN_PLACES, "online.json": own, "start": _own_round}
    places.update({name: own for name in ("store.sqlite", "store.sqlite-wal", "store.sqlite-shm")})
    places.update({name: _own_round for name in rounds})
    return places


# Settings that may change between a run and its continuation without changing what is computed.
RESUME_FREE_KEYS = {
    "overwrite",
    "progress_bar",
    "tensorboard",
    "logging_steps",
    "eval_batch_size",
    "keep_checkpoints",
    "export",
    "merge_lora",
    "max_judge_requests",  # raise the budget to go on
    "max_cost",
    "output_dir",
}


class BudgetReached(Exception):
    """The judges' budget would be passed by the next stage: the run stops before it, everything saved."""


# ---------------------------------------------------------------- files


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def file_hash(path: Path) -> str:
    return ckpt.sha256_file(path)[:16]


def answers_of(path: Path, prompts: list[dict], n: int) -> list[dict]:
    """The answers of a finished generation file in prompt order, n per prompt (the file holds one model's)."""
    by_prompt = {(r["prompt_id"], r["sample"]): r for r in read_jsonl(path)}
    missing = [(p["prompt_id"], j) for p in prompts for j in range(n) if (p["prompt_id"], j) not in by_prompt]
    if missing:
        raise ConfigError(f"{path} lacks {len(missing)} answers (first: prompt {missing[0][0]}); start over")
    return [by_prompt[p["prompt_id"], j] for p in prompts for j in range(n)]


def round_dir(run: Path, k: int) -> Path:
    return run / f"round_{k}"


class Manifest:
    """round_k/manifest.json: what the round used and which of its stages are finished (with their seconds)."""

    def __init__(self, folder: Path, base):
        """`base` (a callable, so nothing is computed for a finished round) gives a new manifest's facts."""
        self.path = folder / "manifest.json"
        folder.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
        else:
            self.data = {**base(), "stages": {}}
            self.save()

    def done(self, stage: str) -> bool:
        return bool(self.data["stages"].get(stage, {}).get("done"))

    def finish(self, stage: str, seconds: float, **facts) -> None:
        self.data["stages"][stage] = {"done": True, "seconds": seconds, **facts}
        self.save()

    def set(self, **facts) -> None:
        self.data.update(facts)
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)


# ---------------------------------------------------------------- the run folder


def _prepare_run_dir(cfg: OnlineConfig) -> bool:
    """Check and mark the run folder; returns True when an earlier run there is continued."""
    run = cfg.run_dir
    saved_file = run / "config.yaml"
    if saved_file.is_file() and runfolder.is_iopo_run(run) and not cfg.overwrite:
        saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
        if "rounds" not in saved:
            raise ConfigError(
                f"{run} holds an `iopo train` run, not an online one; choose another output_dir (or overwrite=true)"
            )
        changed = changed_settings(saved, cfg, RESUME_FREE_KEYS)
        if changed:
            raise ConfigError(
                f"{run} holds an online run with other settings ({', '.join(changed)}); rerun with the same "
                "settings to continue it, overwrite=true to start over, or another output_dir"
            )
        return True
    inputs = [cfg.model.name_or_path, cfg.data.path, cfg.data.test_path]
    inputs += [j.model for j in (cfg.judge, cfg.score_judge) if j is not None]
    hint = "pass overwrite=true to start over or choose another output_dir"
    doomed = runfolder.fresh_start(run, _places(run), inputs, cfg.overwrite, hint)
    runfolder.clean(run, doomed)
    runfolder.mark(run)
    return False


# ---------------------------------------------------------------- the driver


class Online:
    def __init__(self, cfg: OnlineConfig):
        self.cfg = cfg
        self.tcfg = cfg.train_config()
        self.run = cfg.run_dir
        self.stages = STAGES[cfg.method]

    def log(self, message: str) -> None:
        print(message, flush=True)

    # --- set-up

    def open(self) -> None:
        from accelerate.utils import set_seed

        cfg, tcfg = self.cfg, self.tcfg
        if cfg.generation.engine == "vllm":
            import importlib.util

            if importlib.util.find_spec("vllm") is None:  # say it before anything is computed
                raise ConfigError(
                    "generation.engine=vllm needs vLLM (a CUDA machine): pip install 'iopo[vllm]', or use engine=hf"
                )
        continued = _prepare_run_dir(cfg)
        (self.run / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        self.accelerator = trainer.open_accelerator(tcfg)
        if self.accelerator.num_processes > 1:
            raise ConfigError(
                "iopo online runs in one process for now (generation and judging are not sharded); "
                "launch it without torchrun/accelerate launch"
            )
        set_seed(cfg.seed)
        self.tokenizer = trainer.open_tokenizer(tcfg, self.accelerator)
        train, test, rejects, report = load_split(cfg.data)
        skip_invalid = report.pop("skip_invalid")
        lengths = {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length}
        token_rejects = rejects if skip_invalid else None
        self.human_pairs, _ = tokenize_pairs(train, self.tokenizer, **lengths, rejects=token_rejects)
        self.test_pairs, _ = tokenize_pairs(test, self.tokenizer, **lengths, rejects=token_rejects)
        write_rejects(rejects, self.run)
        self.data_hashes = {
            "data": _pairs_hash(train + test),
            "train_pairs": len(self.human_pairs),
            "test_pairs": len(self.test_pairs),
        }
        pool_pairs = {"train": train, "test": test, "all": train + test}[cfg.prompt_split]
        self.pool = unique_prompts(pool_pairs)
        self.raw_human = train
        self.score_prompts = unique_prompts(test)[: cfg.score_prompts]
        if cfg.method == "iter_dpo" and not cfg.reuse_prompts:
            need = cfg.rounds * cfg.prompts_per_round
            if need > len(self.pool):
                raise ConfigError(
                    f"the prompt pool ({cfg.prompt_split} split) has {len(self.pool)} prompts; rounds x "
                    f"prompts_per_round = {need} without reuse: set reuse_prompts=true, fewer rounds or fewer prompts"
                )
        if cfg.method != "iter_dpo" and not self.human_pairs:
            raise ConfigError("no human training pairs left after loading; check data.path and rejects.jsonl")
        self.log(
            f"[iopo] online method={cfg.method} rounds={cfg.rounds} steps/round={cfg.round_steps} "
            f"human pairs: {len(self.human_pairs)} train, {len(self.test_pairs)} test; "
            f"{'continuing' if continued else 'new run in'} {self.run}"
        )

        # The schedule of the whole run (its schedulers span every round), then the session.
        self.round_schedules = [self._round_schedule(k) for k in range(1, cfg.rounds + 1)]
        schedule = [step for part in self.round_schedules for step in part]
        self.trained = self._last_trained_round()
        resume_dir = round_dir(self.run, self.trained) / "checkpoint" if self.trained else None
        if resume_dir is not None:
            damage = ckpt.damage_of(resume_dir)
            if damage:
                raise ConfigError(f"{resume_dir} is damaged ({damage}); start over with overwrite=true")
        self.session = trainer.open_session(tcfg, self.accelerator, self.tokenizer, schedule, resume_dir)
        self.session.metrics_file = self.run / "metrics.jsonl"
        self.session.writer = trainer._tensorboard(tcfg, self.run, self.accelerator)
        if resume_dir is not None:
            self.log(
                f"[iopo] resumed the players from {resume_dir} (step {self.session.step}/{len(schedule)})"
            )
        self.store = None
        self.judges: dict = {}

    def _round_schedule(self, k: int) -> list[tuple[str, int]]:
        cfg = self.cfg
        if cfg.method != "iopo":
            return [("policy", k - 1)] * cfg.round_steps
        games = cfg.round_steps // (cfg.iopo.n_mu + cfg.iopo.n_nu)
        first = (k - 1) * games
        return [(agent, first + i) for agent, i in trainer.iopo_schedule(games, cfg.iopo.n_mu, cfg.iopo.n_nu)]

    def _last_trained_round(self) -> int:
        last = 0
        for k in range(1, self.cfg.rounds + 1):
            manifest = round_dir(self.run, k) / "manifest.json"
            if not manifest.is_file():
                break
            data = json.loads(manifest.read_text(encoding="utf-8"))
            if not data["stages"].get("train", {}).get("done"):
                break
            if not (round_dir(self.run, k) / "checkpoint" / ckpt.STATE_FILE).is_file():
                raise ConfigError(f"round {k} finished training but its checkpoint is gone; start over")
            last = k
        return last

    def get_store(self):
        from iopo.store import Store

        if self.store is None:
            self.store = Store(self.run / "store.sqlite")
        return self.store

    def get_judge(self, role: str):
        """The annotating judge ("judge") or the scoring one ("score_judge", default: the annotating one)."""
        from iopo.judges import build_judge

        jcfg = self.cfg.judge if role == "judge" else (self.cfg.score_judge or self.cfg.judge)
        if jcfg is None:
            return None, None
        key = json.dumps(jcfg.model_dump(mode="json"), sort_keys=True)
        if key not in self.judges:  # one judge object per configuration, named after its setting
            name = "score_judge" if role != "judge" and self.cfg.score_judge is not None else "judge"
            self.judges[key] = build_judge(name, jcfg, self.cfg.judge_dtype, self.cfg.model.trust_remote_code)
        return self.judges[key], jcfg

    def close(self) -> None:
        for judge in self.judges.values():
            judge.close()
        self.judges = {}
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.session.writer is not None:
            self.session.writer.close()
        gc.collect()

    # --- the policy as a generator

    def generate(self, prompts: list[dict], gen, output: Path, label: str) -> list[dict]:
        """The current policy's answers (what `output` lacks is generated), n per prompt, in prompt order."""
        from iopo.generate import generate_answers
        from iopo.models import model_fingerprint

        policy = self.session.policy
        with trainer.acting(policy, self.session.players):
            model = trainer._unwrap(policy.module).model
            was_training = model.training
            model.eval()
            use_cache = getattr(model.config, "use_cache", None)
            model.config.use_cache = True
            try:
                fingerprint = model_fingerprint(model)
                engine = self.vllm_engine() if gen.engine == "vllm" else None
                if engine is not None:
                    engine.load_weights(model, fingerprint)
                with self.accelerator.autocast() if engine is None else nullcontext():
                    records, _ = generate_answers(
                        None,
                        prompts,
                        gen,
                        output,
                        max_prompt_length=self.cfg.data.max_prompt_length,
                        loaded=(model, self.tokenizer, fingerprint, label),
                        progress=self.cfg.progress_bar,
                        engine=engine,
                    )
            finally:
                model.config.use_cache = use_cache
                model.train(was_training)
        return records

    def vllm_engine(self):
        if getattr(self, "_vllm", None) is None:
            from iopo.models import resolve_model_path
            from iopo.vllm_engine import VllmEngine

            dtype = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}[self.cfg.mixed_precision]
            self._vllm = VllmEngine(
                resolve_model_path(self.cfg.model),
                dtype,
                self.cfg.data.max_prompt_length + self.cfg.generation.max_new_tokens,
                self.cfg.generation.vllm_gpu_memory_utilization,
                self.cfg.seed,
            )
        return self._vllm

    def policy_fingerprint(self) -> str:
        from iopo.models import model_fingerprint

        with trainer.acting(self.session.policy, self.session.players):
            return model_fingerprint(trainer._unwrap(self.session.policy.module).model)

    # --- budget

    def spent(self) -> dict:
        ledger = self.get_store().ledger() if (self.run / "store.sqlite").is_file() else {}
        return {
            "requests": sum(row["requests"] or 0 for row in ledger.values()),
            "cost": sum(row["cost"] or 0.0 for row in ledger.values()),
        }

    def check_budget(self, planned_requests: int, what: str) -> None:
        cfg = self.cfg
        spent = self.spent()
        if cfg.max_cost is not None and spent["cost"] >= cfg.max_cost:
            raise BudgetReached(
                f"the judges have cost {spent['cost']:.4f} of max_cost={cfg.max_cost:g}; stopped before {what}"
            )
        if (
            cfg.max_judge_requests is not None
            and spent["requests"] + planned_requests > cfg.max_judge_requests
        ):
            raise BudgetReached(
                f"{what} needs {planned_requests} judge requests and {spent['requests']} of "
                f"max_judge_requests={cfg.max_judge_requests} are spent; stopped before it"
            )

    # --- the start: the starting model's test log-probs and answers, once

    def start(self) -> None:
        folder = self.run / "start"
        manifest = Manifest(folder, lambda: {"what": "the starting policy: reference log-probs and answers"})
        if not manifest.done("reference_logps"):
            if self.session.step > 0:
                raise ConfigError(
                    f"{folder} is incomplete but training has begun; start over with overwrite=true"
                )
            tick = time.perf_counter()
            logps = trainer.session_logps(self.session, self.test_pairs, self._bar("log-probs start"))
            tmp = folder / ".reference_logps.pt.tmp"
            torch.save(logps, tmp)
            os.replace(tmp, folder / "reference_logps.pt")
            manifest.finish(
                "reference_logps",
                time.perf_counter() - tick,
                fingerprint=self.policy_fingerprint(),
                test_pairs=len(self.test_pairs),
            )
        self.reference_logps = torch.load(folder / "reference_logps.pt", weights_only=True)
        if self.reference_logps["chosen_logps"].numel() != len(self.test_pairs):
            raise ConfigError(f"{folder / 'reference_logps.pt'} does not match the test split; start over")
        self.start_answers = None
        if self.score_prompts and self.get_judge("score")[0] is not None:
            answers = folder / "generations.jsonl"
            if not manifest.done("generate"):
                if self.session.step > 0:
                    raise ConfigError(
                        f"{folder} has no starting answers but training has begun; start over with overwrite=true"
                    )
                tick = time.perf_counter()
                self.generate(self.score_prompts, self._score_gen(), answers, "start")
                manifest.finish("generate", time.perf_counter() - tick, sha256=file_hash(answers))
            self.start_answers = answers_of(answers, self.score_prompts, 1)

    def _score_gen(self):
        return self.cfg.generation.model_copy(update={"n": 1})

    def _bar(self, label: str) -> str | None:
        return label if self.cfg.progress_bar else None

    # --- rounds

    def run_rounds(self) -> str:
        cfg = self.cfg
        for k in range(1, cfg.rounds + 1):
            folder = round_dir(self.run, k)
            manifest = Manifest(folder, lambda k=k: self._round_base(k))
            if all(manifest.done(s) for s in self.stages):
                continue
            self.log(f"[iopo] round {k}/{cfg.rounds}")
            for stage in self.stages:
                if manifest.done(stage):
                    continue
                tick = time.perf_counter()
                facts = getattr(self, f"stage_{stage}")(k, folder, manifest)
                manifest.finish(stage, time.perf_counter() - tick, **(facts or {}))
                self.write_summary("running")
            self._prune_checkpoints(k)
        return "done"

    def _round_base(self, k: int) -> dict:
        cfg = self.cfg
        judge = cfg.judge.model_dump(mode="json") if cfg.judge and cfg.method == "iter_dpo" else None
        scorer = cfg.score_judge or cfg.judge
        return {
            "round": k,
            "method": cfg.method,
            "policy_fingerprint_at_start": self.policy_fingerprint(),
            "step_at_start": self.session.step,
            "reference": (
                cfg.reference
                if cfg.method == "iter_dpo"
                else ("the other player (the game)" if cfg.method == "iopo" else "initial")
            ),
            "judge": judge,
            "score_judge": scorer.model_dump(mode="json") if scorer and cfg.score_prompts else None,
            "seeds": {
                "run": cfg.seed,
                "train": cfg.seed + k,
                "generation": cfg.generation.seed + k,
                "prompts": cfg.seed,
            },
            "data": self.data_hashes,
            "steps": cfg.round_steps,
        }

    def stage_prompts(self, k: int, folder: Path, manifest: Manifest) -> dict:
        cfg = self.cfg
        if cfg.reuse_prompts:
            chosen = random.Random(cfg.seed + k).sample(
                range(len(self.pool)), min(cfg.prompts_per_round, len(self.pool))
            )
        else:
            order = list(range(len(self.pool)))
            random.Random(cfg.seed).shuffle(order)
            chosen = order[(k - 1) * cfg.prompts_per_round : k * cfg.prompts_per_round]
        rows = [self.pool[i] for i in chosen]
        write_jsonl(folder / "prompts.jsonl", rows)
        return {"prompts": len(rows), "sha256": file_hash(folder / "prompts.jsonl")}

    def stage_generate(self, k: int, folder: Path, manifest: Manifest) -> dict:
        prompts = read_jsonl(folder / "prompts.jsonl")
        gen = self.cfg.generation.model_copy(update={"seed": self.cfg.generation.seed + k})
        records = self.generate(prompts, gen, folder / "generations.jsonl", f"{self.cfg.method}-round{k}")
        return {
            "answers": len(records),
            "completion_tokens": sum(r["completion_tokens"] for r in records),
            "finish_length_share": sum(r["finish_reason"] == "length" for r in records)
            / max(len(records), 1),
        }

    def _annotation_mode(self, judge, jcfg) -> str:
        mode = self.cfg.annotate_by
        if mode == "auto":
            mode = "score" if jcfg.type == "reward_model" else "pairwise"
        if mode not in judge.modes:
            raise ConfigError(f"annotate_by={mode}, but the judge answers only {'/'.join(judge.modes)}")
        return mode

    def _annotation_items(self, folder: Path, mode: str) -> tuple[list[tuple], list[tuple]]:
        """(items to judge, what each item is: (prompt index, answer i, answer j or None))."""
        prompts = read_jsonl(folder / "prompts.jsonl")
        gen = self.cfg.generation
        records = self.generate_records(folder)
        items, what = [], []
        for p in range(len(prompts)):
            answers = records[p * gen.n : (p + 1) * gen.n]
            if mode == "score":
                for i, r in enumerate(answers):
                    items.append((r["prompt"], r["answer"]))
                    what.append((p, i, None))
            else:
                for i in range(gen.n):
                    for j in range(i + 1, gen.n):
                        a, b = answers[i], answers[j]
                        items.append((a["prompt"], a["answer"], b["answer"]))
                        what.append((p, i, j))
                        items.append((a["prompt"], b["answer"], a["answer"]))
                        what.append((p, j, i))
        return items, what

    def generate_records(self, folder: Path) -> list[dict]:
        """The round's answers in prompt order (n per prompt), from its generations.jsonl."""
        return answers_of(
            folder / "generations.jsonl", read_jsonl(folder / "prompts.jsonl"), self.cfg.generation.n
        )

    def stage_judge(self, k: int, folder: Path, manifest: Manifest) -> dict:
        from iopo.judges import pending, run_judge

        judge, jcfg = self.get_judge("judge")
        mode = self._annotation_mode(judge, jcfg)
        items, what = self._annotation_items(folder, mode)
        planned = pending(judge, self.get_store(), mode, items)
        self.check_budget(planned, f"round {k}'s judging")
        session = f"round_{k}/annotate"
        results, counts = run_judge(judge, self.get_store(), mode, items, session, self.cfg.progress_bar)
        rows = [
            {"prompt": p, "answer": i, "other": j, "kind": mode, "result": result}
            for (p, i, j), result in zip(what, results, strict=True)
        ]
        write_jsonl(folder / "judgments.jsonl", rows)
        return {
            "mode": mode,
            "judge_id": judge.judge_id,
            **counts,
            "ledger": self.get_store().ledger(session),
        }

    def stage_pairs(self, k: int, folder: Path, manifest: Manifest) -> dict:
        cfg = self.cfg
        records = self.generate_records(folder)
        judged = read_jsonl(folder / "judgments.jsonl")
        jcfg = cfg.judge
        n = cfg.generation.n
        candidates = []  # (confidence, prompt index, better answer index, worse answer index)
        by_prompt: dict[int, list[dict]] = {}
        for row in judged:
            by_prompt.setdefault(row["prompt"], []).append(row)
        invalid = 0
        for p, rows in sorted(by_prompt.items()):
            answers = records[p * n : (p + 1) * n]
            if rows[0]["kind"] == "score":
                scored = [(r["result"].get("score"), r["answer"]) for r in rows if r["result"].get("valid")]
                invalid += len(rows) - len(scored)
                if len(scored) < 2:
                    continue
                best, worst = max(scored), min(scored)
                margin = jcfg.tie_margin if jcfg.type == "reward_model" else 0.0
                gap = best[0] - worst[0]
                if gap > margin and answers[best[1]]["answer"] != answers[worst[1]]["answer"]:
                    candidates.append((gap, p, best[1], worst[1]))
            else:
                verdicts = {(r["answer"], r["other"]): r["result"] for r in rows}
                best_pair = None
                for (i, j), first in verdicts.items():
                    if i > j:
                        continue
                    second = verdicts[j, i]
                    outcome, _ = stats.pairwise_outcome(
                        first.get("winner") if first.get("valid") else None,
                        second.get("winner") if second.get("valid") else None,
                    )
                    if outcome == "invalid":
                        invalid += 1
                    if outcome not in ("win", "lose") or answers[i]["answer"] == answers[j]["answer"]:
                        continue
                    better, worse = (i, j) if outcome == "win" else (j, i)
                    confidence = _pairwise_confidence(first, second)
                    if best_pair is None or confidence > best_pair[0]:
                        best_pair = (confidence, p, better, worse)
                if best_pair is not None:
                    candidates.append(best_pair)
        candidates.sort(key=lambda c: (-c[0], records[c[1] * n]["prompt_id"]))
        keep = math.ceil(cfg.keep_ratio * len(candidates))
        rows = []
        for confidence, p, better, worse in candidates[:keep]:
            a, b = records[p * n + better], records[p * n + worse]
            rows.append(
                {
                    "prompt": a["prompt"],
                    "chosen": _completion(a["prompt"], a["answer"]),
                    "rejected": _completion(a["prompt"], b["answer"]),
                    "prompt_id": a["prompt_id"],
                    "confidence": confidence,
                    "origin": "judge",
                }
            )
        human = self._human_pairs(k)
        rows += human
        write_jsonl(folder / "pairs.jsonl", rows)
        return {
            "prompts": len(by_prompt),
            "separated": len(candidates),
            "kept": keep,
            "human": len(human),
            "invalid_judgments": invalid,
            "sha256": file_hash(folder / "pairs.jsonl"),
        }

    def _human_pairs(self, k: int) -> list[dict]:
        """human_pairs_per_round pairs of the train split: round k takes the next slice of one seeded order."""
        m = self.cfg.human_pairs_per_round
        if not m or not self.raw_human:
            return []
        order = list(range(len(self.raw_human)))
        random.Random(self.cfg.seed + 1).shuffle(order)
        picked = [order[(i + (k - 1) * m) % len(order)] for i in range(m)]
        out = []
        for i in picked:
            pair = self.raw_human[i]
            out.append(
                {
                    "prompt": pair.prompt,
                    "chosen": pair.chosen,
                    "rejected": pair.rejected,
                    "origin": "human",
                    "source": pair.source,
                }
            )
        return out

    def stage_train(self, k: int, folder: Path, manifest: Manifest) -> dict:
        from accelerate.utils import set_seed

        cfg, session = self.cfg, self.session
        if cfg.method == "iter_dpo":
            rows = read_jsonl(folder / "pairs.jsonl")
            raw = [
                PreferencePair(r["prompt"], r["chosen"], r["rejected"], f"{folder / 'pairs.jsonl'}:{n}")
                for n, r in enumerate(rows, 1)
            ]
            lengths = {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length}
            rejects: list[dict] = []
            pairs, _ = tokenize_pairs(raw, self.tokenizer, **lengths, rejects=rejects)
            session.position = 0  # a new round, new pairs: the data stream starts over
            if cfg.reference == "previous_round":
                _copy_weights(session.policy, session.reference)
        else:
            pairs, rejects = self.human_pairs, []  # the stream continues over the human pairs
        schedule = self.round_schedules[k - 1]
        if not pairs:
            self.log(f"[iopo] round {k}: no pairs to train on; the policy stays as it is")
            session.step += len(schedule)
        else:
            set_seed(cfg.seed + k)
            session.bar = trainer._progress(self.tcfg, self.accelerator, len(schedule), 0)
            trainer.fit(session, pairs, schedule, online_round=k)
            if session.bar is not None:
                session.bar.close()
                session.bar = None
        trainer.save_session(session, folder / ".tmp-checkpoint", folder / "checkpoint")
        self.trained = k
        return {
            "pairs": len(pairs),
            "rejected_pairs": len(rejects),
            "steps": len(schedule) if pairs else 0,
            "step": session.step,
            "policy_fingerprint": self.policy_fingerprint(),
        }

    def _prune_checkpoints(self, k: int) -> None:
        keep = self.cfg.keep_checkpoints
        for old in range(1, k - keep + 1):
            path = round_dir(self.run, old) / "checkpoint"
            if path.is_dir():
                shutil.rmtree(path)

    def stage_score(self, k: int, folder: Path, manifest: Manifest) -> dict:
        from iopo.judges import pending
        from iopo.judges.compare import comparison_items, judge_against

        cfg = self.cfg
        metrics = {}
        if self.test_pairs:
            metrics = trainer.policy_metrics(
                self.session, self.test_pairs, self.reference_logps, self._bar(f"log-probs round {k}")
            )
            trainer.log_eval(self.session, self.session.step, metrics, online_round=k)
        scores = {
            "round": k,
            "step": self.session.step,
            **{key: metrics.get(key) for key in ("margin_reward", "pairwise_accuracy", "margin_reward_std")},
            # per test pair, in the split's order: paired comparisons between runs and the margin distributions
            **({"margins": metrics["margins"]} if metrics else {}),
        }
        judge, jcfg = self.get_judge("score")
        if self.start_answers is not None and judge is not None:
            answers = self.generate(
                self.score_prompts,
                self._score_gen(),
                folder / "score_generations.jsonl",
                f"{cfg.method}-round{k}",
            )
            kind = judge.modes[0]  # a reward model scores; an LLM judge compares (both orders)
            items = comparison_items(kind, answers, self.start_answers)
            self.check_budget(pending(judge, self.get_store(), kind, items), f"round {k}'s scoring")
            session = f"round_{k}/score"
            table = judge_against(
                judge,
                self.get_store(),
                session,
                jcfg,
                answers,
                self.start_answers,
                n=1,
                boot={"n_boot": cfg.bootstrap, "confidence": cfg.confidence, "seed": cfg.seed},
                progress=cfg.progress_bar,
                modes=[kind],
            )
            t = table.get("table1") or table.get("table2")
            scores.update(
                judged={
                    "judge_id": judge.judge_id,
                    "kind": kind,
                    "win": t["win"],
                    "tie": t["tie"],
                    "lose": t["lose"],
                    "ci": t["ci"],
                    "n": t["n"],
                    "invalid": t["invalid"],
                    **({"bad": t["bad"]} if "bad" in t else {}),
                },
                ledger=self.get_store().ledger(session),
            )
        write_json(folder / "scores.json", scores)
        judged = scores.get("judged")
        self.log(
            f"[iopo] round {k}: margin reward {_num(scores.get('margin_reward'))}, pairwise accuracy "
            f"{_num(scores.get('pairwise_accuracy'))}"
            + (
                f", judged win/tie/lose {judged['win']:.3f}/{judged['tie']:.3f}/{judged['lose']:.3f}"
                if judged
                else ""
            )
        )
        return {
            "margin_reward": scores.get("margin_reward"),
            "pairwise_accuracy": scores.get("pairwise_accuracy"),
        }

    # --- the summary

    def write_summary(self, status: str) -> dict:
        summary = summarize(self.run, self.cfg, status)
        write_json(self.run / "online.json", summary)
        return summary


def _pairwise_confidence(first: dict, second: dict) -> float:
    """How sure the two orders are together: the mean probability margin when the judge gives one (a local
    judge), else 1 (an LLM that agreed with itself in both orders)."""
    margins = [abs(r["p_a"] - 0.5) * 2 for r in (first, second) if isinstance(r.get("p_a"), (int, float))]
    return sum(margins) / len(margins) if len(margins) == 2 else 1.0


def _completion(prompt, answer: str):
    return answer if isinstance(prompt, str) else [{"role": "assistant", "content": answer}]


def _copy_weights(source: trainer.Player, target: trainer.Player) -> None:
    """The reference becomes the policy as it is now (reference=previous_round, full fine-tuning)."""
    src = trainer._unwrap(source.module).model
    dst = trainer._unwrap(target.module).model
    with torch.no_grad():
        dst.load_state_dict(src.state_dict())


def _pairs_hash(pairs: list[PreferencePair]) -> str:
    blob = json.dumps([[p.prompt, p.chosen, p.rejected] for p in pairs], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------- summary (read by report and plot too)


def summarize(run: Path, cfg: OnlineConfig | None, status: str) -> dict:
    """online.json: per round the scores, annotation and scoring ledgers, stage seconds; totals."""
    rounds = []
    for folder in sorted(run.glob("round_*"), key=lambda p: int(p.name.split("_")[1])):
        manifest_file = folder / "manifest.json"
        if not manifest_file.is_file():
            continue
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        stages = manifest["stages"]
        scores = (
            json.loads((folder / "scores.json").read_text()) if (folder / "scores.json").is_file() else None
        )
        annotate = stages.get("judge", {}).get("ledger", {})
        scoring = (scores or {}).get("ledger", {})
        rounds.append(
            {
                "round": manifest["round"],
                "reference": manifest["reference"],
                "scores": {k: v for k, v in (scores or {}).items() if k not in ("ledger", "margins")} or None,
                "annotation": _ledger_total(annotate),
                "scoring": _ledger_total(scoring),
                "stage_seconds": {name: s.get("seconds") for name, s in stages.items() if s.get("done")},
                "pairs": {
                    k: v for k, v in stages.get("pairs", {}).items() if k in ("separated", "kept", "human")
                },
                "trained_pairs": stages.get("train", {}).get("pairs"),
                "steps": stages.get("train", {}).get("steps"),
            }
        )
    totals = {
        "annotation": _sum_ledgers([r["annotation"] for r in rounds]),
        "scoring": _sum_ledgers([r["scoring"] for r in rounds]),
        "stage_seconds": {},
    }
    for r in rounds:
        for name, seconds in r["stage_seconds"].items():
            totals["stage_seconds"][name] = totals["stage_seconds"].get(name, 0.0) + (seconds or 0.0)
    start = run / "start" / "manifest.json"
    if start.is_file():  # the starting model's test log-probs and answers, once per run
        stages = json.loads(start.read_text(encoding="utf-8"))["stages"]
        totals["stage_seconds"]["start"] = sum(s.get("seconds") or 0.0 for s in stages.values())
    totals["seconds"] = sum(totals["stage_seconds"].values())
    method = cfg.method if cfg is not None else None
    return {
        "kind": "iopo-online",
        "method": method,
        "status": status,
        "rounds_planned": cfg.rounds if cfg is not None else None,
        "rounds": rounds,
        "totals": totals,
        "settings": cfg.model_dump(mode="json") if cfg is not None else None,
    }


_LEDGER_KEYS = ("requests", "prompt_tokens", "completion_tokens", "seconds", "cost")


def _ledger_total(ledger: dict) -> dict:
    return {key: sum((row.get(key) or 0) for row in ledger.values()) for key in _LEDGER_KEYS}


def _sum_ledgers(rows: list[dict]) -> dict:
    return {key: sum(row.get(key) or 0 for row in rows) for key in _LEDGER_KEYS}


# ---------------------------------------------------------------- the command


def online(cfg: OnlineConfig) -> dict:
    """Run (or continue) the online rounds; returns online.json's content."""
    driver = Online(cfg)
    driver.open()
    started = time.time()
    status = "running"
    try:
        driver.start()
        status = driver.run_rounds()
        if cfg.export:
            out = trainer.export_policy(driver.session, cfg.run_dir / "final")
            driver.log(f"[iopo] exported the {driver.session.policy.name} to {out}")
    except BudgetReached as stop:
        status = f"stopped: {stop}"
        driver.log(f"[iopo] {status}. Everything finished is saved; raise the budget and rerun to go on.")
    except BaseException as error:  # Ctrl-C, a judge server down, a NaN: the same command continues later
        status = f"interrupted ({type(error).__name__}); rerun the same command to continue"
        raise
    finally:
        summary = driver.write_summary(status)
        driver.close()
        driver.accelerator.end_training()
    driver.log(format_online(summary))
    driver.log(f"[iopo] online {status} in {time.time() - started:.0f}s; run folder: {cfg.run_dir}")
    return summary


def format_online(summary: dict) -> str:
    """The per-round table of one online run."""
    lines = [f"Online {summary['method']}: {summary['status']}"]
    lines.append(
        f"{'round':>5} {'margin':>8} {'pair.acc':>8} {'win':>6} {'tie':>6} {'lose':>6} {'pairs':>6} "
        f"{'annot.req':>9} {'cost':>8} {'seconds':>8}"
    )
    for r in summary["rounds"]:
        s = r["scores"] or {}
        judged = s.get("judged") or {}
        lines.append(
            f"{r['round']:>5} {_cell(s.get('margin_reward'), 4):>8} {_cell(s.get('pairwise_accuracy'), 3):>8} "
            f"{_cell(judged.get('win'), 3):>6} {_cell(judged.get('tie'), 3):>6} {_cell(judged.get('lose'), 3):>6} "
            f"{r['trained_pairs'] if r['trained_pairs'] is not None else '-':>6} "
            f"{r['annotation']['requests']:>9} {r['annotation']['cost']:>8.4f} "
            f"{sum(v or 0 for v in r['stage_seconds'].values()):>8.0f}"
        )
    t = summary["totals"]
    lines.append(
        f"total: annotation {t['annotation']['requests']} requests, {t['annotation']['prompt_tokens']} prompt + "
        f"{t['annotation']['completion_tokens']} completion tokens, cost {t['annotation']['cost']:.4f}; scoring "
        f"{t['scoring']['requests']} requests; "
        + ", ".join(f"{k} {v:.0f}s" for k, v in t["stage_seconds"].items())
    )
    return "\n".join(lines)


def _cell(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
