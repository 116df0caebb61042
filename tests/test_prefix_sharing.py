"""Prefix sharing and packing (collate_shared): one [prompt, chosen, rejected] sequence per pair, several pairs per
row, gives the same log-probs and gradients as the plain forward of prompt+chosen and prompt+rejected rows - for
several model families and attention implementations, and for multi-turn prompts."""

from __future__ import annotations

import pytest
import torch

from iopo.core.logprobs import SequenceLogProbs, sequence_logps
from iopo.data import TokenizedPair, collate_pairs, collate_shared

VOCAB = 300


def _model(family: str, attention: str):
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    configs = {
        "llama": lambda: T.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2),
        "qwen2": lambda: T.Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2),
        "mistral": lambda: T.MistralConfig(
            **common, num_attention_heads=4, num_key_value_heads=2, sliding_window=None
        ),
        "gemma2": lambda: T.Gemma2Config(
            **common,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4096,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=None,
        ),
    }
    torch.manual_seed(0)
    config = configs[family]()
    config._attn_implementation = attention
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation=attention).float()
    return model.eval()


def _pairs(seed: int = 0, n: int = 5) -> list[TokenizedPair]:
    """Pairs of uneven lengths; prompts of several turns' worth of tokens, one completion a single token."""
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(3, VOCAB, (k,), generator=g).tolist()

    lengths = [(9, 4, 7), (3, 1, 5), (14, 6, 2), (5, 8, 8), (1, 3, 1)][:n]
    return [TokenizedPair(ids(p), ids(c), ids(r), f"t:{i}") for i, (p, c, r) in enumerate(lengths)]


FAMILIES = [
    ("llama", "sdpa"),
    ("llama", "eager"),
    ("qwen2", "sdpa"),
    ("mistral", "eager"),
    ("gemma2", "eager"),
]


@pytest.mark.parametrize("family,attention", FAMILIES)
@pytest.mark.parametrize("pack", [None, 40])
def test_shared_prefix_equals_the_plain_forward(family, attention, pack):
    model = _model(family, attention)
    module = SequenceLogProbs(model, chunk_tokens=7)
    pairs = _pairs()
    plain = sequence_logps(module, collate_pairs(pairs, 0))
    shared_batch = collate_shared(pairs, 0, pack_tokens=pack)
    if pack:
        assert shared_batch["input_ids"].shape[0] < len(pairs)  # several pairs share a row
    shared = sequence_logps(module, shared_batch)
    for key in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(shared[key], plain[key], atol=2e-5, rtol=1e-5)
    for key in ("chosen_lengths", "rejected_lengths"):
        assert shared[key].tolist() == plain[key].tolist()
    # Gradients of a loss of both: equal too.
    weights = [p for p in model.parameters()]
    loss_plain = (plain["chosen_logps"] - 0.5 * plain["rejected_logps"]).sum()
    loss_shared = (shared["chosen_logps"] - 0.5 * shared["rejected_logps"]).sum()
    g_plain = torch.autograd.grad(loss_plain, weights)
    g_shared = torch.autograd.grad(loss_shared, weights)
    for a, b in zip(g_shared, g_plain, strict=True):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_the_layout_by_hand():
    pair = TokenizedPair([10, 11], [20, 21], [30], "t:0")
    batch = collate_shared([pair], 0)
    assert batch["input_ids"].tolist() == [[10, 11, 20, 21, 30]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2]]  # the rejected token sits where chosen began
    mask = batch["attention_mask"][0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # the rejected token sees the prompt and itself, not the chosen tokens
    ]
    # chosen 20 is predicted at position 1 (the last prompt token), 21 at 2; rejected 30 also at position 1
    assert batch["target_index"].tolist() == [1, 2, 1]
    assert batch["target_ids"].tolist() == [20, 21, 30]
    assert batch["target_seq"].tolist() == [0, 0, 1]


def test_packing_keeps_pairs_apart_and_pads_little():
    pairs = _pairs()
    padded = collate_pairs(pairs, 0)
    packed = collate_shared(pairs, 0, pack_tokens=40)
    real = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    assert real <= packed["input_ids"].numel() <= 40 * packed["input_ids"].shape[0]
    mask = packed["attention_mask"][:, 0]
    positions = packed["position_ids"]
    # No position attends across two pairs: where a new pair starts (position 0 after the row start), the rows of
    # the mask before it are closed to it.
    for row in range(mask.shape[0]):
        starts = [t for t in range(1, mask.shape[1]) if positions[row, t] == 0 and mask[row, t, t - 1] == 0]
        for t in starts:
            assert not mask[row, t:, :t].any()


# ---------------------------------------------------------------- in training


def _train(tmp_path, model_dir, *extra):
    from iopo.commands.train import train
    from iopo.config import load_config

    from tiny import run_overrides, write_pairs

    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        write_pairs(data, n=24)
    cfg = load_config(None, run_overrides(model_dir, data, tmp_path / extra[0], *extra[1:], "iopo.n_iter=2"))
    return cfg, train(cfg)


def test_training_with_shared_batches_equals_plain_batches(tmp_path, tiny_model_dir, capsys):
    from safetensors.torch import load_file

    cfg_auto, auto = _train(tmp_path, tiny_model_dir, "auto")
    assert "batching: prefix sharing + packing" in capsys.readouterr().out
    cfg_plain, plain = _train(tmp_path, tiny_model_dir, "plain", "batching=plain")
    a = load_file(cfg_auto.run_dir / "final" / "model.safetensors")
    b = load_file(cfg_plain.run_dir / "final" / "model.safetensors")
    for key in a:  # float rounding only (Adam at lr 1e-2 magnifies it over the steps)
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=0)
    assert auto["margin_reward"] == pytest.approx(plain["margin_reward"], abs=1e-3)
    assert auto["pairwise_accuracy"] == plain["pairwise_accuracy"]


def test_a_sliding_window_model_falls_back_to_plain_and_shared_is_refused(tmp_path, capsys):
    import transformers as T

    from iopo.config import ConfigError

    from tiny import build_tokenizer

    tok = build_tokenizer()
    config = T.MistralConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=8,
    )
    T.MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    tok.save_pretrained(tmp_path / "mistral")
    _train(tmp_path, tmp_path / "mistral", "auto", "iopo.n_mu=1", "iopo.n_nu=1")
    assert "batching: plain, because it uses sliding-window attention" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="batching=shared"):
        _train(tmp_path, tmp_path / "mistral", "forced", "batching=shared", "iopo.n_mu=1", "iopo.n_nu=1")


class RemoteLlama(__import__("transformers").LlamaForCausalLM):
    """Stands for trust_remote_code modelling code: a class defined outside transformers."""


def test_remote_code_models_get_the_plain_layout():
    from iopo.core.logprobs import sharing_obstacle

    model = _model("llama", "sdpa")
    assert sharing_obstacle(model) is None
    remote = RemoteLlama(model.config)
    assert "not transformers' own" in sharing_obstacle(remote)
