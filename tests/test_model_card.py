"""Every export carries a Hugging Face model card (final/README.md): metadata a Hub reads, the method, settings,
data and held-out evaluation, and the resolved config; the export loads with from_pretrained and a pipeline."""

from __future__ import annotations

import json

import pytest
import yaml

from iopo.report.card import base_license, model_card, wilson_interval

from tiny import make_cfg


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---", 2)[1])


def test_a_training_run_writes_a_card_that_the_hub_library_reads(tmp_path, tiny_model_dir):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from iopo.commands.train import train

    (tiny_model_dir / "README.md").write_text("---\nlicense: mit\n---\n# a tiny model\n")
    try:
        cfg = make_cfg(tmp_path, tiny_model_dir, "optim.max_steps=2", method="dpo")
        results = train(cfg)
    finally:
        (tiny_model_dir / "README.md").unlink()
    final = cfg.run_dir / "final"
    text = (final / "README.md").read_text()
    meta = front_matter(text)
    assert (
        meta["base_model"] == str(tiny_model_dir) and meta["license"] == "mit"
    )  # inherited from the base's card
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"iopo", "dpo"} <= set(meta["tags"]) and "datasets" not in meta  # a local file is no Hub dataset
    card = ModelCard.load(final / "README.md")
    assert card.data.base_model == str(tiny_model_dir)
    assert f"| margin reward | {results['margin_reward']:.4f}" in text
    assert f"| pairwise accuracy | {results['pairwise_accuracy']:.4f}" in text
    assert (
        "| `loss.beta` | 0.5 |" in text and "method: dpo" in text
    )  # the settings table and the whole config
    # the card is the export's: listed in the run's marker (a fresh start deletes it), and the folder loads
    marker = json.loads((cfg.run_dir / ".iopo-run").read_text())
    assert "README.md" in marker["exports"]["final"]
    model = AutoModelForCausalLM.from_pretrained(final)
    generate = pipeline("text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(final))
    assert isinstance(generate("hello", max_new_tokens=3, do_sample=False)[0]["generated_text"], str)


def test_a_reward_model_card_gives_its_accuracy_with_an_interval():
    config = {"model": {"name_or_path": None, "lora": False}, "data": {"path": None}, "seed": 1, "optim": {}}
    results = {"pairwise_accuracy": 0.625, "n_pairs": 200}
    text = model_card("reward_model", config, {"rows": 10, "train_pairs": 8}, results)
    meta = front_matter(text)
    assert (
        meta["pipeline_tag"] == "text-classification" and meta["license"] == "apache-2.0"
    )  # the embedded base
    assert meta["datasets"] == ["Anthropic/hh-rlhf"] and "reward-model" in meta["tags"]
    low, high = wilson_interval(0.625, 200)
    assert f"**0.6250 [{low:.3f}, {high:.3f}]**" in text
    # Wilson by hand: z = 1.96, n = 200, p = 0.625 -> centre 0.6231, half-width 0.0663
    assert low == pytest.approx(0.5567, abs=1e-3) and high == pytest.approx(0.6894, abs=1e-3)


def test_the_base_license_is_only_what_can_be_known(tmp_path):
    assert base_license(None) == "apache-2.0"
    assert base_license("org/some-hub-model") is None  # offline: unknown, left out
    (tmp_path / "README.md").write_text("no front matter")
    assert base_license(str(tmp_path)) is None
