"""report_to: TensorBoard, Weights & Biases and MLflow get the same metric names, for real and offline: MLflow into
a local file store read back with MLflow's own client, W&B in offline mode (the run folder it writes)."""

from __future__ import annotations

import json

import pytest

from iopo.commands.train import train

from tiny import make_cfg


def test_mlflow_and_wandb_get_the_runs_metrics_offline(tmp_path, tiny_model_dir, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="mlflow (the dev extra) is not installed")
    pytest.importorskip("wandb", reason="wandb (the dev extra) is not installed")
    store = (tmp_path / "mlruns").as_uri()  # a local file store (mlflow-skinny has no database backend)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg(
        tmp_path,
        tiny_model_dir,
        "optim.max_steps=3",
        "tensorboard=true",
        "report_to=[tensorboard,wandb,mlflow]",
        method="dpo",
    )
    train(cfg)
    records = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3

    # MLflow: one run in the experiment "iopo", named after the run folder, with every step's loss and the config
    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("iopo")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == cfg.run_dir.name and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx(losses, rel=1e-6)
    assert "eval/pairwise_accuracy" in run.data.metrics
    assert run.data.params["method"] == "dpo" and run.data.params["optim.max_steps"] == "3"

    # W&B offline: its run folder under run_dir/wandb, whose run file (what `wandb sync` uploads; wandb >= 0.2x has
    # no Python reader for it) holds the same metric names and every step's loss as its JSON value
    (offline,) = list((cfg.run_dir / "wandb").glob("offline-run-*"))
    (run_file,) = list(offline.glob("*.wandb"))
    content = run_file.read_bytes()
    assert b"train/loss" in content and b"eval/pairwise_accuracy" in content
    assert all(json.dumps(loss).encode() in content for loss in losses)
    # TensorBoard as before
    assert list((cfg.run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_train_rm_and_online_log_to_mlflow_with_the_same_names(tmp_path, tiny_model_dir, work, monkeypatch):
    """The reward model's training and an online run (its train and score stages) reach the same tracker, one run
    per run folder, under the metric names iopo train uses."""
    mlflow = pytest.importorskip("mlflow", reason="mlflow (the dev extra) is not installed")
    from iopo.cli import main

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    data = ["data.max_length=64", "data.max_prompt_length=32", "data.test_size=6", "progress_bar=false"]
    rm = ["train-rm", f"model={tiny_model_dir}", f"data={work['data']}", *data, "optim.max_steps=2"]
    assert main([*rm, f"output_dir={tmp_path / 'rm'}", "report_to=[mlflow]"]) == 0
    online = ["online", "method=dpo", f"model={tiny_model_dir}", f"data={work['data']}", *data, "rounds=2"]
    online += ["steps_per_round=1", "optim.batch_size=2", "score_prompts=0", "report_to=[mlflow]"]
    assert main([*online, f"output_dir={tmp_path / 'online'}"]) == 0
    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    runs = {
        r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("iopo").experiment_id])
    }
    assert set(runs) == {"rm", "online"}
    assert [m.step for m in client.get_metric_history(runs["rm"].info.run_id, "train/loss")] == [1, 2]
    assert "eval/pairwise_accuracy" in runs["rm"].data.metrics
    assert [m.step for m in client.get_metric_history(runs["online"].info.run_id, "train/loss")] == [1, 2]
    assert "eval/margin_reward" in runs["online"].data.metrics  # each round's score
