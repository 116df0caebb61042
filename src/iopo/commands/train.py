"""`iopo train`: IOPO's two-player game (Alg. 1) or a frozen-reference baseline, then the export and the test
metrics. Read top to bottom: the run folder (fresh or resumed) -> data, schedule, session -> the optimizer steps
(checkpoints and evaluations between them) -> the last checkpoint, the export, the evaluation.
"""

from __future__ import annotations

import json
import time

from accelerate.utils import set_seed

from iopo.config import ConfigError, TrainConfig, dump_config
from iopo.core.formatting import metrics_table
from iopo.core.methods import METHODS
from iopo.data.loading import keep_rejects
from iopo.engine.batching import choose_batching
from iopo.engine.export import export_policy
from iopo.engine.fit import fit, log_eval
from iopo.engine.scoring import keep_logps, policy_metrics, starting_logps
from iopo.engine.session import (
    Session,
    build_schedule,
    describe,
    holding,
    load_inputs,
    next_sample,
    on_main,
    open_accelerator,
    open_session,
    peak_rss,
)
from iopo.io import checkpoint
from iopo.io.jsonio import write_json
from iopo.io.log import PLAIN, get_logger
from iopo.io.runlog import mark_phase, open_trackers, progress_bar
from iopo.report.card import model_card, publish

log = get_logger(__name__)


def train(cfg: TrainConfig) -> dict:
    """Train with cfg.method, checkpoint, export the protagonist/policy and evaluate it. Returns eval results."""
    if not METHODS[cfg.method].offline:
        raise ConfigError(
            f"method={cfg.method} trains on pairs that its online rounds make (the policy's own answers): run "
            f"`iopo online method={cfg.method}`"
        )
    mark_phase("load")
    accelerator = open_accelerator(cfg)
    set_seed(cfg.seed)
    tokenizer, train_pairs, test_pairs, rejects, report = load_inputs(cfg, accelerator)  # before any folder
    with holding(accelerator, cfg.run_dir, "iopo train"):
        return _train(cfg, accelerator, tokenizer, train_pairs, test_pairs, rejects, report)


def _train(cfg: TrainConfig, accelerator, tokenizer, train_pairs, test_pairs, rejects, report) -> dict:
    """The run, in its locked folder: fresh or resumed -> the optimizer steps -> the export and evaluation."""
    run_dir = cfg.run_dir
    resume_dir = on_main(accelerator, lambda: checkpoint.resolve_resume(cfg))
    resumed_at = checkpoint.resume_step(resume_dir, cfg)
    if accelerator.is_main_process:
        checkpoint.prepare_run_dir(run_dir, resumed_at)
        (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    accelerator.wait_for_everyone()
    keep_rejects(rejects, report, run_dir if accelerator.is_main_process else None)
    log.info(f"data: {json.dumps(report)}")
    started = time.time()

    # --- schedule, session
    schedule = build_schedule(cfg, len(train_pairs), cfg.optim.batch_size * accelerator.num_processes)
    session = open_session(cfg, accelerator, tokenizer, schedule, resume_dir)
    describe(session, schedule)
    # The batching is chosen before the test split's reference log-probs, so they and the steps use the same; also
    # when a finished run is resumed only to export and score, so that it scores in the uninterrupted run's layout.
    choose_batching(session, next_sample(session, train_pairs))
    if resume_dir is not None:
        log.info(f"resumed from {resume_dir} at step {session.step}/{len(schedule)}")
    evaluated = (cfg.eval_at_end or cfg.eval_steps) and test_pairs
    # The starting model's test log-probs, once (so no third copy of the model is kept).
    start_bar = "log-probs start" if cfg.progress_bar else None
    eval_ref = (
        starting_logps(session, test_pairs, run_dir / "eval_reference_logps.pt", start_bar)
        if evaluated
        else None
    )
    if eval_ref is not None and session.step == 0:  # the policy is the starting model: its key is the start's
        keep_logps(session, run_dir, test_pairs, eval_ref)
    session.writer = open_trackers(cfg, run_dir, accelerator.is_main_process)
    session.metrics_file = run_dir / "metrics.jsonl"
    session.bar = progress_bar(
        cfg.progress_bar, len(schedule), session.step, cfg.method, is_main=accelerator.is_main_process
    )

    def test_metrics(label: str | None, keep: bool = False) -> dict:
        """Margin reward and pairwise accuracy of the protagonist/policy vs the starting model on the test split
        (`keep`: the policy's log-probs kept for `iopo eval` of the export)."""
        mark_phase(f"eval at step {session.step}")
        return policy_metrics(session, test_pairs, eval_ref, label, run_dir if keep else None)

    # --- the optimizer steps
    try:
        fit(
            session,
            train_pairs,
            schedule[session.step :],
            _between_steps(len(schedule), eval_ref, test_metrics),
        )
    except KeyboardInterrupt:
        if accelerator.num_processes == 1 and session.step > 0:
            log.info(f"interrupted: saving step {session.step} so resume=true continues from it")
            checkpoint.save_session(session)
        raise
    if session.bar is not None:
        session.bar.close()
    if resumed_at != session.step:  # else the checkpoint resumed from is this state already
        checkpoint.save_session(session)

    # --- export and evaluation
    policy = session.policy
    exported = None
    if cfg.export:
        exported = export_policy(session, run_dir / "final")
        log.info(f"exported {policy.name} to {exported}")
    results: dict = {}
    if eval_ref is not None:
        results = test_metrics(f"eval {policy.name}" if cfg.progress_bar else None, keep=cfg.export)
        log_eval(session, session.step, results)
    if session.writer is not None:
        session.writer.close()
    if results and cfg.eval_at_end:
        results.update(method=cfg.method, player=policy.name, reference="starting model", step=session.step)
        if accelerator.is_main_process:
            write_json(run_dir / "eval.json", results)  # strict JSON, written atomically
        title = f"{cfg.method}: {policy.name} vs the starting model on {len(test_pairs)} test pairs"
        log.info(metrics_table(results, title), extra=PLAIN)
    if exported is not None and accelerator.is_main_process:  # the model card beside the weights
        card = model_card("policy", cfg.model_dump(mode="json"), report, results or None)
        publish(exported, run_dir, card, cfg, f"iopo {cfg.method}: {run_dir.name}")
    mark_phase("done")
    log.info(f"peak RSS per process (GB): {', '.join(f'{x:.2f}' for x in peak_rss(accelerator))}")
    log.info(f"done in {time.time() - started:.0f}s; run folder: {run_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _between_steps(total: int, eval_ref: dict | None, test_metrics):
    """What runs after each optimizer step but the last: a checkpoint every save_steps, the test metrics every
    eval_steps (the curves of Fig. 5)."""

    def after(session: Session) -> None:
        cfg, step = session.cfg, session.step
        if cfg.save_steps and step % cfg.save_steps == 0 and step < total:
            checkpoint.save_session(session)
        if eval_ref is not None and cfg.eval_steps and step % cfg.eval_steps == 0 and step < total:
            # its own bar under the training bar, gone when done
            log_eval(session, step, test_metrics(f"eval at step {step}" if cfg.progress_bar else None))

    return after
