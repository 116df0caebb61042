"""The reward model on prefix-shared, packed batches (`iopo train-rm` batching=shared): the head reads each answer
where transformers' plain forward reads it, the rewards and the trained model are the plain layout's."""

from __future__ import annotations

import json

import pytest
import torch

from iopo.data.collate import collate_pairs, collate_shared
from iopo.data.tokenize import TokenizedPair
from iopo.engine.reward import PairRewards

PAD = 0


def test_last_index_is_each_sequences_last_token_that_is_not_padding():
    """Pair 0: prompt [5, 6], chosen [7, 0] (ends with the pad token, as an EOS that is also the pad), rejected [8];
    pair 1: prompt [9], chosen [10, 11], rejected [12, 13, 14]. Packed in one row of 12: pair 0 at 0..4 (prompt 0-1,
    chosen 2-3, rejected 4), pair 1 at 5..10. Chosen 0 is read at 2 (7: its pad skipped), rejected 0 at 4, chosen 1
    at 7, rejected 1 at 10."""
    pairs = [TokenizedPair([5, 6], [7, PAD], [8], "t:0"), TokenizedPair([9], [10, 11], [12, 13, 14], "t:1")]
    batch = collate_shared(pairs, PAD, pack_tokens=12)
    assert batch["input_ids"].shape == (1, 11)
    assert batch["last_index"].tolist() == [2, 7, 4, 10]
    # one pair per row (no packing): row width 6, pair 1 in row 1 starts at 6
    batch = collate_shared(pairs, PAD)
    assert batch["last_index"].tolist() == [2, 6 + 2, 4, 6 + 5]


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    model.config.pad_token_id = PAD
    return model


def random_pairs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(3, 300, (k,), generator=g).tolist()

    pairs = []
    for i in range(n):
        p, c, r = (int(x) for x in torch.randint(1, 9, (3,), generator=g))
        chosen = ids(c) + ([PAD] if i % 2 else [])  # every other chosen ends with the pad token (EOS = pad)
        pairs.append(TokenizedPair(ids(p), chosen, ids(r), f"t:{i}"))
    return pairs


def test_shared_rewards_equal_the_plain_forward(reward_model):
    module = PairRewards(reward_model)
    pairs = random_pairs()
    with torch.no_grad():
        plain = module(collate_pairs(pairs, PAD))
        shared = module(collate_shared(pairs, PAD, pack_tokens=40))
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)


def test_train_rm_shared_equals_plain_on_the_same_data_and_seed(tmp_path, tiny_model_dir):
    """Four optimizer steps each way on the same data and seed: the same held-out accuracy and margins (float32)."""
    from iopo.cli import main as iopo_main

    from tiny import train_rm_args, write_pairs

    data = write_pairs(tmp_path / "pairs.jsonl", n=30)
    results = {}
    for batching in ("plain", "shared"):
        out = tmp_path / batching
        assert iopo_main(train_rm_args(tiny_model_dir, data, out, f"batching={batching}")) == 0
        results[batching] = json.loads((out / "eval.json").read_text())
    assert results["shared"]["pairwise_accuracy"] == results["plain"]["pairwise_accuracy"]
    assert results["shared"]["margins"] == pytest.approx(results["plain"]["margins"], abs=1e-4)
    assert any(abs(m) > 1e-3 for m in results["plain"]["margins"])  # the model learned something to compare


def test_train_rm_trainable_layers_trains_only_the_top_blocks_and_the_head(tmp_path, tiny_model_dir):
    """trainable_layers=1 on a 2-block model: the embeddings and block 0 keep the starting weights bit for bit;
    block 1, the final norm and the new score head move. On a model without such blocks, or asking for more blocks
    than it has, one line names the setting."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from iopo.cli import main as iopo_main
    from iopo.config import ConfigError
    from iopo.io.models import freeze_lower_layers

    from tiny import train_rm_args, write_pairs

    data = write_pairs(tmp_path / "pairs.jsonl", n=30)
    out = tmp_path / "rm"
    args = train_rm_args(tiny_model_dir, data, out, "optim.max_steps=3", "trainable_layers=1")
    assert iopo_main(args) == 0
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    trained = load_file(str(out / "final" / "model.safetensors"))
    assert start["model.layers.0.mlp.up_proj.weight"].shape  # the tiny model has blocks 0 and 1
    for name, value in trained.items():
        if name.startswith("score."):
            continue
        before = start[name]
        moved = not torch.equal(value, before)
        top = name.startswith("model.layers.1.") or name == "model.norm.weight"
        assert moved == top, name
    assert AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.num_hidden_layers == 2

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigError, match="has 2 decoder blocks"):
        freeze_lower_layers(model, 3)
    assert (
        iopo_main(args[:-4] + ["trainable_layers=1", "model.lora=true", f"output_dir={tmp_path / 'x'}"]) == 2
    )
