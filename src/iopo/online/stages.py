"""The stages of an online round, each a function (run, k, folder, manifest) -> the facts its manifest records,
dispatched by name through STAGES: a row of iopo.core.methods.ONLINE_METHODS lists its stages in order. `run` is
the driver (iopo.online.driver.Online: its settings, session, data, judges, store and budget).

prompts -> generate -> judge -> pairs (judged methods) -> train -> score. Every stage writes its files atomically
into round_k/; the driver records it in the manifest when it returns, so a killed run redoes at most one stage.
"""

from __future__ import annotations

import random
from pathlib import Path

from accelerate.utils import set_seed

from iopo.config import ConfigError
from iopo.core.formatting import number
from iopo.core.methods import ONLINE_METHODS
from iopo.data.formats import PreferencePair
from iopo.data.tokenize import tokenize_pairs
from iopo.engine.fit import fit, log_eval
from iopo.engine.players import copy_weights
from iopo.engine.scoring import policy_metrics
from iopo.eval.judges import pending, run_judge
from iopo.eval.judges.compare import comparison_items, judge_against
from iopo.io import checkpoint
from iopo.io.jsonio import read_jsonl, write_json, write_jsonl
from iopo.io.log import get_logger
from iopo.io.runlog import progress_bar
from iopo.online.files import Manifest, file_hash
from iopo.online.pairs import (
    exploration_pairs,
    human_rows,
    select_pairs,
    self_play_pairs,
    sppo_pairs,
)

log = get_logger(__name__)


def stage_prompts(run, k: int, folder: Path, manifest: Manifest) -> dict:
    """The round's P prompts from the pool: seeded, none used twice unless reuse_prompts."""
    cfg = run.cfg
    if cfg.reuse_prompts:
        chosen = random.Random(cfg.seed + k).sample(
            range(len(run.pool)), min(cfg.prompts_per_round, len(run.pool))
        )
    else:
        order = list(range(len(run.pool)))
        random.Random(cfg.seed).shuffle(order)
        chosen = order[(k - 1) * cfg.prompts_per_round : k * cfg.prompts_per_round]
    rows = [run.pool[i] for i in chosen]
    write_jsonl(folder / "prompts.jsonl", rows)
    return {"prompts": len(rows), "sha256": file_hash(folder / "prompts.jsonl")}


def stage_generate(run, k: int, folder: Path, manifest: Manifest) -> dict:
    """n answers per prompt from the current policy (what generations.jsonl lacks)."""
    prompts = read_jsonl(folder / "prompts.jsonl")
    gen = run.cfg.generation.model_copy(update={"seed": run.cfg.generation.seed + k})
    records = run.generate(prompts, gen, folder / "generations.jsonl", f"{run.cfg.method}-round{k}")
    return {
        "answers": len(records),
        "completion_tokens": sum(r["completion_tokens"] for r in records),
        "finish_length_share": sum(r["finish_reason"] == "length" for r in records) / max(len(records), 1),
    }


def stage_reference_answers(run, k: int, folder: Path, manifest: Manifest) -> dict:
    """One answer per prompt from the starting model (XPO's y_ref), at the round's generation settings."""
    prompts = read_jsonl(folder / "prompts.jsonl")
    # A seed of its own: in round 1 the policy is still the starting model, and the same seed would give it the
    # same answers (no pair); OAT samples the two from separate engines.
    seed = run.cfg.generation.seed + k + REFERENCE_SEED_OFFSET
    gen = run.cfg.generation.model_copy(update={"seed": seed, "n": 1})
    output = folder / "reference_generations.jsonl"
    records = run.generate(prompts, gen, output, f"reference-round{k}", player=run.session.reference)
    return {
        "answers": len(records),
        "completion_tokens": sum(r["completion_tokens"] for r in records),
        "seed": seed,
    }


REFERENCE_SEED_OFFSET = 1_000_003  # the reference's answers are sampled with generation.seed + k + this


def annotation_mode(run, judge, jcfg) -> str:
    """How the judge labels the answers: annotate_by, or under auto its type's way (a reward model scores)."""
    mode = run.cfg.annotate_by
    if mode == "auto":
        mode = jcfg.facts.annotates_by
    if mode not in judge.modes:
        raise ConfigError(f"annotate_by={mode}, but the judge answers only {'/'.join(judge.modes)}")
    return mode


def annotation_items(run, folder: Path, mode: str) -> tuple[list[tuple], list[tuple]]:
    """(items to judge, what each item is: (prompt index, answer i, answer j or None))."""
    prompts = read_jsonl(folder / "prompts.jsonl")
    n = run.answers_per_prompt
    records = run.generate_records(folder)
    items, what = [], []
    for p in range(len(prompts)):
        answers = records[p * n : (p + 1) * n]
        if mode == "score":
            for i, r in enumerate(answers):
                items.append((r["prompt"], r["answer"]))
                what.append((p, i, None))
        else:
            for i in range(n):
                for j in range(i + 1, n):
                    a, b = answers[i], answers[j]
                    items.append((a["prompt"], a["answer"], b["answer"]))
                    what.append((p, i, j))
                    items.append((a["prompt"], b["answer"], a["answer"]))
                    what.append((p, j, i))
    return items, what


def stage_judge(run, k: int, folder: Path, manifest: Manifest) -> dict:
    """The judge on every answer (score) or every ordered pair of answers (pairwise), through the store."""
    judge, jcfg = run.get_judge("judge")
    mode = annotation_mode(run, judge, jcfg)
    items, what = annotation_items(run, folder, mode)
    planned = pending(judge, run.get_store(), mode, items)
    run.check_budget(planned, f"round {k}'s judging")
    session = f"round_{k}/annotate"
    with run.budgeted(judge):
        results, counts = run_judge(judge, run.get_store(), mode, items, session, run.cfg.progress_bar)
    rows = [
        {"prompt": p, "answer": i, "other": j, "kind": mode, "result": result}
        for (p, i, j), result in zip(what, results, strict=True)
    ]
    write_jsonl(folder / "judgments.jsonl", rows)
    return {
        "mode": mode,
        "judge_id": judge.judge_id,
        **counts,
        "ledger": run.get_store().ledger(session),
    }


def stage_pairs(run, k: int, folder: Path, manifest: Manifest) -> dict:
    """The pairs the judge separated (iopo.online.pairs), the top share by confidence, plus human pairs."""
    cfg = run.cfg
    judge = cfg.judge
    tie_margin = judge.tie_margin if judge.facts.score_verdict == "gap" else 0.0
    answers, judged = run.generate_records(folder), read_jsonl(folder / "judgments.jsonl")
    rows, facts = select_pairs(answers, judged, run.answers_per_prompt, cfg.keep_ratio, tie_margin)
    human = human_rows(run.raw_human, cfg.human_pairs_per_round, cfg.seed, k)
    write_jsonl(folder / "pairs.jsonl", rows + human)
    return {
        "prompts": facts["prompts"],
        "separated": facts["separated"],
        "kept": facts["kept"],
        "human": len(human),
        "invalid_judgments": facts["invalid_judgments"],
        "sha256": file_hash(folder / "pairs.jsonl"),
    }


def stage_win_rates(run, k: int, folder: Path, manifest: Manifest) -> dict:
    """SPPO's pairs: per prompt the answers with the highest and lowest estimated win probability against the
    policy (iopo.online.pairs.sppo_pairs), each with its probability for the soft loss; plus human pairs (the hard
    form: probabilities 1 and 0)."""
    cfg = run.cfg
    answers, judged = run.generate_records(folder), read_jsonl(folder / "judgments.jsonl")
    rows, facts = sppo_pairs(answers, judged, run.answers_per_prompt, cfg.judge.facts.score_verdict)
    human = human_rows(run.raw_human, cfg.human_pairs_per_round, cfg.seed, k)
    for row in human:
        row["extras"] = {"chosen_win": 1.0, "rejected_win": 0.0}
    write_jsonl(folder / "pairs.jsonl", rows + human)
    return {**facts, "human": len(human), "sha256": file_hash(folder / "pairs.jsonl")}


def stage_self_pairs(run, k: int, folder: Path, manifest: Manifest) -> dict:
    """SPIN's pairs: the data's answer to each prompt (chosen) against each of the policy's own answers."""
    rows, facts = self_play_pairs(run.generate_records(folder), run.data_answers)
    write_jsonl(folder / "pairs.jsonl", rows)
    return {**facts, "sha256": file_hash(folder / "pairs.jsonl")}


def stage_explore_pairs(run, k: int, folder: Path, manifest: Manifest) -> dict:
    """XPO's pairs: the policy's answer against the starting model's, as the judge separates them, each marked
    with the side the reference's answer is on (the loss's exploration term)."""
    judge = run.cfg.judge
    tie_margin = judge.tie_margin if judge.facts.score_verdict == "gap" else 0.0
    answers, judged = run.generate_records(folder), read_jsonl(folder / "judgments.jsonl")
    rows, facts = exploration_pairs(answers, judged, run.answers_per_prompt, tie_margin)
    write_jsonl(folder / "pairs.jsonl", rows)
    return {**facts, "sha256": file_hash(folder / "pairs.jsonl")}


def stage_train(run, k: int, folder: Path, manifest: Manifest) -> dict:
    """The round's optimizer steps, on its own pairs (a judged method: a new data stream each round) or on the
    human pairs (the stream going on), then the round's checkpoint."""
    cfg, session = run.cfg, run.session
    if ONLINE_METHODS[cfg.method].own_pairs:
        rows = read_jsonl(folder / "pairs.jsonl")
        raw = [
            PreferencePair(
                r["prompt"], r["chosen"], r["rejected"], f"{folder / 'pairs.jsonl'}:line {n}", r.get("extras")
            )
            for n, r in enumerate(rows, 1)
        ]
        lengths = {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length}
        rejects: list[dict] = []
        pairs, _ = tokenize_pairs(raw, run.tokenizer, **lengths, rejects=rejects)
        session.position = 0  # a new round, new pairs: the data stream starts over
        if cfg.reference == "previous_round":
            copy_weights(session.policy, session.reference)
    else:
        pairs, rejects = run.human_pairs, []  # the stream continues over the human pairs
    if session.previous is not None:  # pi_t: the policy as this round's training begins (also after a resume)
        copy_weights(session.policy, session.previous)
    schedule = run.round_schedules[k - 1]
    if not pairs:
        log.info(f"round {k}: no pairs to train on; the policy stays as it is")
        session.step += len(schedule)
    else:
        set_seed(cfg.seed + k)
        session.bar = progress_bar(cfg.progress_bar, len(schedule), 0, run.tcfg.method)
        fit(session, pairs, schedule, online_round=k)
        if session.bar is not None:
            session.bar.close()
            session.bar = None
    checkpoint.save_session(session, folder / ".tmp-checkpoint", folder / "checkpoint")
    run.trained = k
    return {
        "pairs": len(pairs),
        "rejected_pairs": len(rejects),
        "steps": len(schedule) if pairs else 0,
        "step": session.step,
        "policy_fingerprint": run.policy_fingerprint(),
    }


def stage_score(run, k: int, folder: Path, manifest: Manifest) -> dict:
    """The round's scores: implicit-reward metrics on the held-out pairs, and the judged win rate of the policy's
    answers against the starting policy's."""
    cfg = run.cfg
    metrics = {}
    if run.test_pairs:
        progress = run.bar(f"log-probs round {k}")
        metrics = policy_metrics(run.session, run.test_pairs, run.reference_logps, progress)
        log_eval(run.session, run.session.step, metrics, online_round=k)
    scores = {
        "round": k,
        "step": run.session.step,
        **{key: metrics.get(key) for key in ("margin_reward", "pairwise_accuracy", "margin_reward_std")},
        # per test pair, in the split's order: paired comparisons between runs and the margin distributions
        **({"margins": metrics["margins"]} if metrics else {}),
    }
    judge, jcfg = run.get_judge("score")
    if run.start_answers is not None and judge is not None:
        answers = run.generate(
            run.score_prompts,
            run.score_gen(),
            folder / "score_generations.jsonl",
            f"{cfg.method}-round{k}",
        )
        kind = judge.modes[0]  # a reward model scores; an LLM judge compares (both orders)
        items = comparison_items(kind, answers, run.start_answers)
        run.check_budget(pending(judge, run.get_store(), kind, items), f"round {k}'s scoring")
        session = f"round_{k}/score"
        with run.budgeted(judge):
            table = judge_against(
                judge,
                run.get_store(),
                session,
                jcfg,
                answers,
                run.start_answers,
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
            ledger=run.get_store().ledger(session),
        )
    write_json(folder / "scores.json", scores)
    judged = scores.get("judged")
    log.info(
        f"round {k}: margin reward {number(scores.get('margin_reward'), 4)}, pairwise accuracy "
        f"{number(scores.get('pairwise_accuracy'), 4)}"
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


STAGES = {
    "prompts": stage_prompts,
    "generate": stage_generate,
    "judge": stage_judge,
    "pairs": stage_pairs,
    "win_rates": stage_win_rates,
    "self_pairs": stage_self_pairs,
    "reference_answers": stage_reference_answers,
    "explore_pairs": stage_explore_pairs,
    "train": stage_train,
    "score": stage_score,
}
