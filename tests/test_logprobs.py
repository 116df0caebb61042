"""logprobs.py: chunked completion log-probs equal the naive full-logits computation, ignore prompt and padding."""

import pytest
import torch
import torch.nn.functional as F

from iopo.core.logprobs import SequenceLogProbs, completion_logps, sequence_logps, summed_logps

from tiny import build_model


def naive_logps(model, ids, attention_mask, completion_mask):
    """Reference: full (N, T, V) float32 logits, log-softmax, gather, mask the targets."""
    logits = model(input_ids=ids, attention_mask=attention_mask).logits.float()
    token = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token * completion_mask[:, 1:]).sum(-1)


@pytest.fixture()
def model():
    m = build_model(400, seed=3)
    m.config.use_cache = False
    return m


def _plain(ids, attention, completion) -> dict:
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 400, (4, 12), generator=g)
    attention = torch.ones_like(ids)
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, 6:] = True
    attention[1, 9:] = 0  # row 1 right-padded
    completion[1, 9:] = False
    return ids, attention, completion


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_chunked_equals_naive_values_and_gradients(model, chunk):
    ids, attention, completion = _batch()
    logps, lengths = SequenceLogProbs(model, chunk_tokens=chunk)(_plain(ids, attention, completion))
    expected = naive_logps(model, ids, attention, completion)
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
    assert lengths.tolist() == [6, 3, 6, 6]  # completion tokens 6..11; row 1 is padded after 8
    weight = model.model.layers[0].self_attn.q_proj.weight
    (g_chunk,) = torch.autograd.grad(logps.sum(), weight)
    (g_naive,) = torch.autograd.grad(expected.sum(), weight)
    torch.testing.assert_close(g_chunk, g_naive, atol=1e-6, rtol=1e-4)


def test_padding_invariance(model):
    """A sequence's log-prob is the same alone and right-padded inside a batch of longer rows."""
    ids, attention, completion = _batch(1)
    wrapper = SequenceLogProbs(model)
    with torch.no_grad():
        batched, _ = wrapper(_plain(ids, attention, completion))
        alone, _ = wrapper(_plain(ids[1:2, :9], attention[1:2, :9], completion[1:2, :9]))
        # Different garbage in the padding changes nothing.
        other = ids.clone()
        other[1, 9:] = 5
        repadded, _ = wrapper(_plain(other, attention, completion))
    torch.testing.assert_close(alone[0], batched[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(repadded, batched)


def test_prompt_tokens_do_not_count(model):
    """Changing a prompt token changes the context, so we check the mask instead: only completion targets sum."""
    hidden = torch.zeros(1, 4, 32)
    head = torch.nn.Linear(32, 400, bias=False)
    torch.nn.init.zeros_(head.weight)  # uniform distribution: every target has log-prob -ln(400)
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[False, False, True, True]])
    logps, lengths = completion_logps(hidden, ids, mask, head)
    assert lengths.item() == 2
    assert logps.item() == pytest.approx(-2 * torch.log(torch.tensor(400.0)).item(), abs=1e-5)


def test_float32_under_bf16_autocast(model):
    ids, attention, completion = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, _ = SequenceLogProbs(model)(_plain(ids, attention, completion))
    assert logps.dtype == torch.float32


def test_sequence_logps_splits_chosen_and_rejected(model):
    ids, attention, completion = _batch()
    out = sequence_logps(
        SequenceLogProbs(model),
        {"input_ids": ids, "attention_mask": attention, "completion_mask": completion},
    )
    full, _ = SequenceLogProbs(model)(_plain(ids, attention, completion))
    torch.testing.assert_close(out["chosen_logps"], full[:2])
    torch.testing.assert_close(out["rejected_logps"], full[2:])
    assert out["chosen_lengths"].tolist() == [6, 3]


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("chunk", [4, 1024])
def test_in_place_head_backward_is_bitwise_autograds_own(softcap, chunk):
    """The head's backward that reuses the logits' buffer gives exactly autograd's gradients of the same expression
    (values too), through the chunk checkpoints, with and without a logit softcap."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(32, 400, bias=True)
    hidden = torch.randn(13, 32, generator=g, requires_grad=True)
    targets = torch.randint(0, 400, (13,), generator=g)
    sequence = torch.tensor([0] * 6 + [1] * 7)
    logps = summed_logps(hidden, targets, sequence, 2, head, chunk, softcap)
    weights = torch.tensor([0.7, -1.3])
    grads = torch.autograd.grad((logps * weights).sum(), [hidden, head.weight, head.bias])

    logits = F.linear(hidden, head.weight, head.bias)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    token = logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)
    expected = torch.zeros(2).index_add(0, sequence, token)
    expected_grads = torch.autograd.grad((expected * weights).sum(), [hidden, head.weight, head.bias])
    if chunk == 1024:  # one chunk: the same operations on the same values, bit for bit
        assert torch.equal(logps, expected)
        assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads, strict=True))
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
