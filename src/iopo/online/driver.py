"""The driver of `iopo online`: the run folder (new or continued), the session that lives across rounds, the
judges and the store, the budget, the starting policy's files, and the rounds, each a sequence of stages
(iopo.online.stages) joined by files under round_k/ and recorded in round_k/manifest.json.

Killed at any moment, the same command loads the newest round checkpoint, skips every finished stage, and asks no
judge twice (the store keeps each judgment as it arrives). A budget (max_judge_requests, max_cost) stops the run at
a stage boundary with everything saved.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import yaml
from accelerate.utils import set_seed

from iopo.config import ConfigError, OnlineConfig, changed_settings, dump_config
from iopo.core.logprobs import language_model
from iopo.core.methods import METHODS, ONLINE_METHODS
from iopo.data.formats import PreferencePair
from iopo.data.loading import load_split, pick_split, prompt_id, unique_prompts, write_rejects
from iopo.data.tokenize import tokenize_pairs
from iopo.engine.batching import choose_batching
from iopo.engine.players import BASE, acting
from iopo.engine.refcache import starting_weights_digest
from iopo.engine.scoring import starting_logps
from iopo.engine.session import open_accelerator, open_session, open_tokenizer, round_schedule
from iopo.eval.generate import generate_answers
from iopo.eval.judges import build_judge
from iopo.io import checkpoint, runfolder
from iopo.io.jsonio import read_jsonl, write_json
from iopo.io.log import get_logger
from iopo.io.models import check_model, model_fingerprint, resolve_model, resolve_model_path
from iopo.io.openai_client import BudgetSpent
from iopo.io.runlog import open_trackers
from iopo.io.store import Store
from iopo.online.files import Manifest, answers_of, file_hash, round_dir
from iopo.online.stages import STAGES
from iopo.online.summary import summarize

log = get_logger(__name__)


ROUND_FILES = (
    "manifest.json",
    "prompts.jsonl",
    "generations.jsonl",
    "judgments.jsonl",
    "pairs.jsonl",
    "scores.json",
    "score_generations.jsonl",
    "reference_generations.jsonl",
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
    places = {**checkpoint.TRAIN_PLACES, "online.json": own, "start": _own_round}
    places.update({name: own for name in ("store.sqlite", "store.sqlite-wal", "store.sqlite-shm")})
    places.update({name: _own_round for name in rounds})
    return places


# Settings that may change between a run and its continuation without changing what is computed.
RESUME_FREE_KEYS = {
    "overwrite",
    "progress_bar",
    "tensorboard",
    "report_to",
    "push_to_hub",
    "hub_model_id",
    "hub_private",
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


class Online:
    """An online run: its settings, session (players and optimizers living across rounds), data, judges, store
    and budget; `start()` the starting policy's files, `run_rounds()` the rounds stage by stage."""

    def __init__(self, cfg: OnlineConfig):
        self.cfg = cfg
        self.tcfg = cfg.train_config()
        self.run = cfg.run_dir
        self.stages = ONLINE_METHODS[cfg.method].stages

    def open(self) -> None:
        cfg, tcfg = self.cfg, self.tcfg
        if cfg.generation.engine == "vllm":
            import importlib.util

            if importlib.util.find_spec("vllm") is None:  # say it before anything is computed
                raise ConfigError(
                    "generation.engine=vllm needs vLLM (a CUDA machine): pip install 'iopo[vllm]', or use engine=hf"
                )
        self.accelerator = open_accelerator(tcfg)
        if self.accelerator.num_processes > 1:
            raise ConfigError(
                "iopo online runs in one process for now (generation and judging are not sharded); "
                "launch it without torchrun/accelerate launch"
            )
        set_seed(cfg.seed)
        # Every input is checked before the run folder is made or touched: the model, the judges' models, the data.
        check_model(cfg.model)
        for jcfg in (cfg.judge, cfg.score_judge):
            if jcfg is not None and jcfg.model:
                resolve_model(jcfg.model)
        self.tokenizer = open_tokenizer(tcfg, self.accelerator)
        train, test, rejects, report = load_split(cfg.data)
        skip_invalid = report.pop("skip_invalid")
        lengths = {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length}
        token_rejects = rejects if skip_invalid else None
        self.human_pairs, _ = tokenize_pairs(train, self.tokenizer, **lengths, rejects=token_rejects)
        self.test_pairs, _ = tokenize_pairs(test, self.tokenizer, **lengths, rejects=token_rejects)
        self.data_hashes = {
            "data": _pairs_hash(train + test),
            "train_pairs": len(self.human_pairs),
            "test_pairs": len(self.test_pairs),
        }
        pool_pairs = pick_split(train, test, cfg.prompt_split)
        self.pool = unique_prompts(pool_pairs)
        # SPIN's chosen answer to a prompt: the data's (the chosen answer of the prompt's first pair)
        self.data_answers: dict[str, object] = {}
        for pair in pool_pairs:
            self.data_answers.setdefault(prompt_id(pair.prompt), pair.chosen)
        self.raw_human = train
        self.score_prompts = unique_prompts(test)[: cfg.score_prompts]
        online = ONLINE_METHODS[cfg.method]
        if "prompts" in online.stages and not cfg.reuse_prompts:
            need = cfg.rounds * cfg.prompts_per_round
            if need > len(self.pool):
                raise ConfigError(
                    f"the prompt pool ({cfg.prompt_split} split) has {len(self.pool)} prompts; rounds x "
                    f"prompts_per_round = {need} without reuse: set reuse_prompts=true, fewer rounds or fewer prompts"
                )
        if not online.own_pairs and not self.human_pairs:
            raise ConfigError("no human training pairs left after loading; check data.path and rejects.jsonl")
        self.lock = runfolder.hold(self.run, "iopo online")  # one process in the folder, until close()
        continued = _prepare_run_dir(cfg)
        (self.run / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        write_rejects(rejects, self.run)
        log.info(
            f"online method={cfg.method} rounds={cfg.rounds} steps/round={cfg.round_steps} "
            f"human pairs: {len(self.human_pairs)} train, {len(self.test_pairs)} test; "
            f"{'continuing' if continued else 'new run in'} {self.run}"
        )

        # The schedule of the whole run (its schedulers span every round), then the session.
        self.round_schedules = [round_schedule(tcfg, cfg.round_steps, k) for k in range(1, cfg.rounds + 1)]
        schedule = [step for part in self.round_schedules for step in part]
        self.trained = self.last_trained_round()
        resume_dir = round_dir(self.run, self.trained) / "checkpoint" if self.trained else None
        if resume_dir is not None:
            damage = checkpoint.damage_of(resume_dir)
            if damage:
                raise ConfigError(f"{resume_dir} is damaged ({damage}); start over with overwrite=true")
        self.session = open_session(tcfg, self.accelerator, self.tokenizer, schedule, resume_dir, rounds=True)
        self.session.metrics_file = self.run / "metrics.jsonl"
        self.session.writer = open_trackers(cfg, self.run, self.accelerator.is_main_process)
        if resume_dir is not None:
            log.info(f"resumed the players from {resume_dir} (step {self.session.step}/{len(schedule)})")
        self.store = None
        self.judges: dict = {}

    def last_trained_round(self) -> int:
        """The last round whose train stage finished: its checkpoint is where the players resume from (those of
        earlier rounds may be pruned already, keep_checkpoints)."""
        last = 0
        for k in range(1, self.cfg.rounds + 1):
            manifest = round_dir(self.run, k) / "manifest.json"
            if not manifest.is_file():
                break
            data = json.loads(manifest.read_text(encoding="utf-8"))
            if not data["stages"].get("train", {}).get("done"):
                break
            last = k
        if last and not checkpoint.is_checkpoint(round_dir(self.run, last) / "checkpoint"):
            raise ConfigError(f"round {last} finished training but its checkpoint is gone; start over")
        return last

    def get_store(self):
        if self.store is None:
            self.store = Store(self.run / "store.sqlite")
        return self.store

    def get_judge(self, role: str):
        """The annotating judge ("judge") or the scoring one ("score_judge", default: the annotating one)."""
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
        self.release()

    def release(self) -> None:
        """Let another process use the run folder (its lock is held from open() on)."""
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release()

    def generate(self, prompts: list[dict], gen, output: Path, label: str, player=None) -> list[dict]:
        """The current policy's answers (or `player`'s: the starting model's), what `output` lacks generated, n per
        prompt, in prompt order."""
        policy = player or self.session.policy
        with acting(policy, self.session.players):
            model = language_model(policy.module)
            was_training = model.training
            model.eval()
            use_cache = getattr(model.config, "use_cache", None)
            model.config.use_cache = True
            try:
                if policy.adapter == BASE:  # the shared base, its adapters disabled: the starting weights
                    fingerprint = starting_weights_digest(model)[:16]
                else:
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
            from iopo.eval.vllm_engine import VllmEngine

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
        with acting(self.session.policy, self.session.players):
            return model_fingerprint(language_model(self.session.policy.module))

    def spent(self) -> dict:
        ledger = self.get_store().ledger() if (self.run / "store.sqlite").is_file() else {}
        return {
            "requests": sum(row["requests"] or 0 for row in ledger.values()),
            "cost": sum(row["cost"] or 0.0 for row in ledger.values()),
        }

    @contextmanager
    def budgeted(self, judge):
        """A judging stage under max_judge_requests: a judge that retries (an LLM behind a server) sends no request
        past what is left, retries included; the stage then stops as the budget does."""
        left = self.cfg.max_judge_requests
        if left is not None and hasattr(judge, "limit_requests"):
            judge.limit_requests(max(left - self.spent()["requests"], 0))
        try:
            yield
        except BudgetSpent as spent:
            raise BudgetReached(f"{spent}; stopped inside the stage, every answer so far stored") from None
        finally:
            if hasattr(judge, "limit_requests"):
                judge.limit_requests(None)

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

    def start(self) -> None:
        """The starting policy, once per run: its test log-probs (the reference of the metrics) and its answers to
        the scored prompts (what every round's answers are judged against)."""
        folder = self.run / "start"
        manifest = Manifest(folder, lambda: {"what": "the starting policy: reference log-probs and answers"})
        path = folder / "reference_logps.pt"
        # The batching is chosen once, here, on the same pairs in a new run and a resumed one: a run resumed just
        # before a scoring stage then scores in the layout the uninterrupted run used (the layouts agree only up to
        # float rounding).
        sample = (self.human_pairs or self.test_pairs)[: self.cfg.optim.batch_size]
        if self.session.collate is None and sample:
            choose_batching(self.session, sample)
        if not manifest.done("reference_logps"):
            if self.session.step > 0:
                raise ConfigError(
                    f"{folder} is incomplete but training has begun; start over with overwrite=true"
                )
            path.unlink(missing_ok=True)  # an unfinished stage's file is not trusted
            tick = time.perf_counter()
            self.reference_logps = starting_logps(
                self.session, self.test_pairs, path, self.bar("log-probs start")
            )
            manifest.finish(
                "reference_logps",
                time.perf_counter() - tick,
                fingerprint=self.policy_fingerprint(),
                test_pairs=len(self.test_pairs),
            )
        else:  # a damaged or deleted file is computed again from the starting weights (and said so)
            self.reference_logps = starting_logps(
                self.session, self.test_pairs, path, self.bar("log-probs start")
            )
        self.start_answers = None
        if self.score_prompts and self.get_judge("score")[0] is not None:
            answers = folder / "generations.jsonl"
            if not manifest.done("generate"):
                if self.session.step > 0:
                    raise ConfigError(
                        f"{folder} has no starting answers but training has begun; start over with overwrite=true"
                    )
                tick = time.perf_counter()
                self.generate(self.score_prompts, self.score_gen(), answers, "start")
                manifest.finish("generate", time.perf_counter() - tick, sha256=file_hash(answers))
            self.start_answers = answers_of(answers, self.score_prompts, 1)

    def score_gen(self):
        return self.cfg.generation.model_copy(update={"n": 1})

    def bar(self, label: str) -> str | None:
        return label if self.cfg.progress_bar else None

    def run_rounds(self) -> str:
        cfg = self.cfg
        for k in range(1, cfg.rounds + 1):
            folder = round_dir(self.run, k)
            manifest = Manifest(folder, lambda k=k: self.round_base(k))
            if all(manifest.done(s) for s in self.stages):
                continue
            log.info(f"round {k}/{cfg.rounds}")
            for stage in self.stages:
                if manifest.done(stage):
                    continue
                tick = time.perf_counter()
                facts = STAGES[stage](self, k, folder, manifest)
                manifest.finish(stage, time.perf_counter() - tick, **(facts or {}))
                self.write_summary("running")
            self.prune_checkpoints(k)
        return "done"

    def round_base(self, k: int) -> dict:
        cfg = self.cfg
        online = ONLINE_METHODS[cfg.method]
        judge = cfg.judge.model_dump(mode="json") if cfg.judge and online.judged else None
        scorer = cfg.score_judge or cfg.judge
        return {
            "round": k,
            "method": cfg.method,
            "policy_fingerprint_at_start": self.policy_fingerprint(),
            "step_at_start": self.session.step,
            "reference": self.reference_name(),
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

    def reference_name(self) -> str:
        """What the round's training measures the policy against, as its manifest records it."""
        online = ONLINE_METHODS[self.cfg.method]
        method = METHODS[online.trains]
        if method.env == "other":
            return "the other player (the game)"
        if method.env == "previous":
            return "previous_round"
        if method.env == "mixed":
            share = method.mix(self.cfg)
            return f"{share:g} x initial + {1 - share:g} x previous_round"
        return self.cfg.reference if online.own_pairs else "initial"

    @property
    def answers_per_prompt(self) -> int:
        """The answers a round judges per prompt: the policy's n, and the starting model's one where the method
        asks for it (XPO)."""
        return self.cfg.generation.n + int(ONLINE_METHODS[self.cfg.method].reference_answer)

    def generate_records(self, folder: Path) -> list[dict]:
        """The round's answers in prompt order, answers_per_prompt per prompt: the policy's n from generations.jsonl
        (then the starting model's from reference_generations.jsonl, XPO)."""
        prompts, n = read_jsonl(folder / "prompts.jsonl"), self.cfg.generation.n
        own = answers_of(folder / "generations.jsonl", prompts, n)
        if not ONLINE_METHODS[self.cfg.method].reference_answer:
            return own
        reference = answers_of(folder / "reference_generations.jsonl", prompts, 1)
        return [a for p in range(len(prompts)) for a in own[p * n : (p + 1) * n] + [reference[p]]]

    def prune_checkpoints(self, k: int) -> None:
        keep = self.cfg.keep_checkpoints
        for old in range(1, k - keep + 1):
            path = round_dir(self.run, old) / "checkpoint"
            if path.is_dir():
                shutil.rmtree(path)

    def card_facts(self) -> tuple[dict, dict | None]:
        """(data report, held-out evaluation of the last scored round) for the export's model card."""
        report = {
            "path": self.cfg.data.path,
            "train_pairs": len(self.human_pairs),
            "test_pairs": len(self.test_pairs),
        }
        scored = [
            k for k in range(1, self.cfg.rounds + 1) if (round_dir(self.run, k) / "scores.json").is_file()
        ]
        if not scored:
            return report, None
        scores = json.loads((round_dir(self.run, scored[-1]) / "scores.json").read_text(encoding="utf-8"))
        if scores.get("margin_reward") is None:
            return report, None
        return report, {**scores, "n_pairs": len(scores.get("margins") or []), "beta": self.cfg.loss.beta}

    def write_summary(self, status: str) -> dict:
        summary = summarize(self.run, self.cfg, status)
        write_json(self.run / "online.json", summary)
        return summary


def _pairs_hash(pairs: list[PreferencePair]) -> str:
    blob = json.dumps([[p.prompt, p.chosen, p.rejected] for p in pairs], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
