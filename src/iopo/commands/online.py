"""`iopo online`: preference optimization round by round (paper Sec. 6.4, Table 2, Fig. 4-5).

A row of iopo.core.methods.ONLINE_METHODS names a method's stages. iter_dpo, rounds k = 1..K of stages joined by
files under round_k/: prompts (P from the pool, seeded, none reused unless asked) -> generate (n answers from the
current policy, in process) -> judge (any judge, through the run's SQLite store and ledger) -> pairs (kept only
when the judge separates them; the top keep_ratio by judged confidence, optionally mixed with human pairs) ->
train (DPO against the `reference` setting: the starting model or the policy as the round began) -> score.
iopo / dpo: the same rounds and optimizer steps on the human pairs only (train -> score): the game goes on with
zero judge calls; dpo is the offline control. score: margin reward and pairwise accuracy on the held-out human
split against the starting model, and the judged win rate of the policy's answers against the starting policy's.
The run continues where it stopped when the same command is given again (iopo.online.driver).
"""

from __future__ import annotations

import time

from iopo.config import OnlineConfig
from iopo.engine.export import export_policy
from iopo.io.log import PLAIN, get_logger
from iopo.online.driver import BudgetReached, Online
from iopo.online.summary import format_online
from iopo.report.card import model_card, publish

log = get_logger(__name__)


def online(cfg: OnlineConfig) -> dict:
    """Run (or continue) the online rounds; returns online.json's content."""
    driver = Online(cfg)
    try:
        driver.open()
    except BaseException:
        driver.release()  # a run that could not open leaves its folder to the next
        raise
    started = time.time()
    status = "running"
    try:
        driver.start()
        status = driver.run_rounds()
        if cfg.export:
            out = export_policy(driver.session, cfg.run_dir / "final")
            log.info(f"exported the {driver.session.policy.name} to {out}")
            if driver.accelerator.is_main_process:
                card = model_card("policy", cfg.model_dump(mode="json"), *driver.card_facts())
                publish(out, cfg.run_dir, card, cfg, f"iopo online {cfg.method}: {cfg.run_dir.name}")
    except BudgetReached as stop:
        status = f"stopped: {stop}"
        log.info(f"{status}. Everything finished is saved; raise the budget and rerun to go on.")
    except BaseException as error:  # Ctrl-C, a judge server down, a NaN: the same command continues later
        status = f"interrupted ({type(error).__name__}); rerun the same command to continue"
        raise
    finally:
        summary = driver.write_summary(status)
        driver.close()
        driver.accelerator.end_training()
    log.info(format_online(summary), extra=PLAIN)
    log.info(f"online {status} in {time.time() - started:.0f}s; run folder: {cfg.run_dir}")
    return summary
