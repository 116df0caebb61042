"""`iopo train-rm`: a Bradley-Terry reward model (paper Eq. 2), the offline judge everyone has without a GPU or an
API key.

Trained on preference pairs read through the same data pipeline as `iopo train` (every format, the same
prompt-grouped split, the same chat rendering); the result is final/, a standard folder that
`AutoModelForSequenceClassification.from_pretrained` loads, and eval.json with its held-out pairwise accuracy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from accelerate.utils import set_seed

from iopo.config import TrainRMConfig, dump_config
from iopo.core.stats import wilson_interval
from iopo.data.loading import keep_rejects
from iopo.engine.reward import train_reward_model
from iopo.engine.session import holding, load_inputs, plain_accelerator
from iopo.io import checkpoint, runfolder
from iopo.io.jsonio import write_json
from iopo.io.log import get_logger
from iopo.io.runlog import mark_phase
from iopo.report.card import model_card, publish

log = get_logger(__name__)
PLACES = ("config.yaml", "metrics.jsonl", "eval.json", "rejects.jsonl", "final", "tensorboard")


def _prepare_dir(cfg: TrainRMConfig) -> Path:
    run_dir = cfg.run_dir
    inputs = [cfg.model.name_or_path, cfg.data.path, cfg.data.test_path]
    places = {name: checkpoint.TRAIN_PLACES[name] for name in PLACES}
    doomed = runfolder.fresh_start(
        run_dir, places, inputs, cfg.overwrite, "pass overwrite=true or another output_dir"
    )
    runfolder.clean(run_dir, doomed)
    runfolder.mark(run_dir)
    return run_dir


def train_rm(cfg: TrainRMConfig) -> dict:
    """Train, report held-out accuracy, save final/ (a standard sequence-classification folder) and eval.json."""
    mark_phase("load")
    accelerator = plain_accelerator(cfg.mixed_precision)
    set_seed(cfg.seed)
    tokenizer, train_pairs, test_pairs, rejects, report = load_inputs(cfg, accelerator)  # before any folder
    with holding(accelerator, cfg.run_dir, "iopo train-rm"):
        return _train_rm(cfg, accelerator, tokenizer, train_pairs, test_pairs, rejects, report)


def _train_rm(cfg: TrainRMConfig, accelerator, tokenizer, train_pairs, test_pairs, rejects, report) -> dict:
    run_dir = _prepare_dir(cfg) if accelerator.is_main_process else cfg.run_dir
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    started = time.time()
    keep_rejects(rejects, report, run_dir if accelerator.is_main_process else None)
    log.info(f"reward model data: {json.dumps(report)}")

    model, results = train_reward_model(cfg, accelerator, tokenizer, train_pairs, test_pairs, run_dir)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        mark_phase("export")
        final = run_dir / "final"
        inner = accelerator.unwrap_model(model).model
        if cfg.model.lora:
            inner = inner.merge_and_unload()
        inner.save_pretrained(final, safe_serialization=True)
        tokenizer.save_pretrained(final)
        card = model_card("reward_model", cfg.model_dump(mode="json"), report, results)
        publish(final, run_dir, card, cfg, f"iopo reward model: {run_dir.name}")
        write_json(run_dir / "eval.json", results)
        accuracy = results.get("pairwise_accuracy")
        interval = wilson_interval(accuracy, results.get("n_pairs"))
        shown = (
            f"{accuracy:.4f} [{interval[0]:.3f}, {interval[1]:.3f}] (95% Wilson) on {results['n_pairs']} held-out pairs"
            if accuracy is not None and interval
            else "n/a (no test pairs)"
        )
        log.info(
            f"reward model saved to {final}; held-out pairwise accuracy {shown}; {time.time() - started:.0f}s"
        )
    mark_phase("done")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results
