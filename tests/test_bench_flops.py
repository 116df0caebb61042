"""What the speed benchmarks share (benchmarks/common.py): the useful-FLOP count by hand, its attention term against
the (query, key) pairs the prefix-shared layout really lets attend, and the training step they time."""

import sys
from pathlib import Path

import pytest

from iopo.data import TokenizedPair, collate_shared

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import preference_step, useful_flops  # noqa: E402


def test_useful_flops_by_hand():
    shape = {"body_parameters": 10, "hidden": 2, "layers": 3, "vocabulary": 5}
    # prompt 2, chosen 1, rejected 3: attended pairs 3 (prompt) + 4 x 2 (both branches see the prompt) + 1 + 6 = 18;
    # one forward 2 x 10 x 6 + 2 x 2 x 5 x 4 + 4 x 2 x 3 x 18 = 120 + 80 + 432 = 632; a step is 4 forwards.
    assert useful_flops(shape, [(2, 1, 3)]) == 4 * 632
    assert useful_flops(shape, [(2, 1, 3), (2, 1, 3)]) == 2 * 4 * 632


@pytest.mark.parametrize("pack", [None, 24])
def test_attention_term_counts_what_the_shared_layout_attends(pack):
    """With no parameters and no vocabulary only attention is left: 16 x hidden x layers x attended pairs, the pairs
    being exactly the True entries of collate_shared's block mask on real (non-padding) queries."""
    lengths = [(5, 3, 4), (2, 1, 6), (7, 2, 2)]
    pairs = [
        TokenizedPair(list(range(1, p + 1)), [7] * c, [8] * r, f"t:{i}")
        for i, (p, c, r) in enumerate(lengths)
    ]
    batch = collate_shared(pairs, pad_token_id=0, pack_tokens=pack)
    mask = batch["attention_mask"][:, 0]  # (N, T, T)
    real = batch["input_ids"] != 0
    attended = int(mask[real].sum())
    shape = {"body_parameters": 0, "hidden": 1, "layers": 1, "vocabulary": 0}
    assert useful_flops(shape, lengths) == 16 * attended


@pytest.mark.parametrize("bf16", [False, True])
def test_benchmarks_step_trains_the_agent_and_leaves_the_env(bf16):
    """The step speed_vs_trl.py, step_profile.py and compile_speed.py time: the agent's parameters move, the env's
    (the other player) do not, with iopo's per-pair IOPO loss, in float32 and under bf16 autocast."""
    import torch

    from iopo.core.logprobs import SequenceLogProbs
    from iopo.core.losses import iopo_loss

    from tiny import build_model

    agent, env = build_model(64, seed=0).train(), build_model(64, seed=1).train()
    pairs = [TokenizedPair([1, 2, 3], [4, 5], [6, 7, 8], "a"), TokenizedPair([9, 10], [11], [12, 13], "b")]
    batch = collate_shared(pairs, pad_token_id=0, pack_tokens=16)
    before = {n: [p.detach().clone() for p in m.parameters()] for n, m in (("agent", agent), ("env", env))}
    optimizer = torch.optim.AdamW(agent.parameters(), lr=1e-2)
    preference_step(SequenceLogProbs(agent), SequenceLogProbs(env), batch, iopo_loss, optimizer, bf16)
    moved = [not torch.equal(a, p) for a, p in zip(before["agent"], agent.parameters(), strict=True)]
    assert sum(moved) > len(moved) // 2
    assert all(torch.equal(a, p) for a, p in zip(before["env"], env.parameters(), strict=True))
    assert env.training  # put back in train mode after its eval-mode forward
