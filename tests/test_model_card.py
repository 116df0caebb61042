"""Every export carries a Hugging Face model card (final/README.md): metadata a Hub reads, the method, settings,
data and held-out evaluation, and the resolved config; the export loads with from_pretrained and a pipeline."""

from __future__ import annotations

import json

import pytest
import yaml

from iopo.core.stats import wilson_interval
from iopo.report.card import base_license, model_card

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


def test_an_eval_adds_its_judged_tables_to_the_runs_card(tmp_path, tiny_model_dir, work):
    """`iopo eval RUN` with a judge writes its tables into RUN/final/README.md (the implicit metrics, and win / tie
    / lose with the intervals of eval.json); a later eval replaces that section instead of adding another."""
    from iopo.cli import main
    from iopo.commands.train import train
    from iopo.report.card import JUDGED_START

    cfg = make_cfg(tmp_path, tiny_model_dir, "optim.max_steps=2", method="dpo")
    train(cfg)
    card = cfg.run_dir / "final" / "README.md"
    before = card.read_text()
    judge = ["judges.rm.type=reward_model", f"judges.rm.model={work['rm']}", "generation.max_new_tokens=4"]
    args = ["eval", str(cfg.run_dir), *judge, "progress_bar=false", "bootstrap=50"]
    for out in ("ev1", "ev2"):
        assert main([*args, f"output_dir={tmp_path / out}"]) == 0
    text = card.read_text()
    assert (
        text.count(JUDGED_START) == 1 and str(tmp_path / "ev2") in text and str(tmp_path / "ev1") not in text
    )
    assert text.startswith(before.split("## The resolved config")[0])  # the rest of the card is kept
    result = json.loads((tmp_path / "ev2" / "eval.json").read_text())
    table = result["judges"]["rm"]["models"]["run"]["table1"]
    low, high = table["ci"]["win"]
    assert f"{table['win']:.3f} [{low:.3f}, {high:.3f}]" in text
    assert f"pairwise accuracy {result['metrics']['run']['pairwise_accuracy']:.4f}" in text
    # The judge's check on the split's labelled pairs is in the card's row; a flagged judge is named so.
    check = result["judges"]["rm"]["check"]
    assert (
        f"| rm (reward_model){'' if check['informative'] else ' (uninformative)'} | {check['agreement']:.3f} |"
        in text
    )
    assert check["informative"] or "**rm is uninformative**" in text
    lc = table["length_controlled"]
    assert f"| {lc['win_rate']:.3f} |" in text
