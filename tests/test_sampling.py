"""The lean decoding loop (iopo.eval.sampling) against transformers' `generate` on the same seed: the same tokens,
greedy and sampled, one or several samples a prompt, rows that stop early and rows that run to the end; where it
cannot stand in for `generate` (a generation config asking for more), `generate` runs and says so."""

from __future__ import annotations

import pytest
import torch

from iopo.data.collate import pad_sequences
from iopo.eval.sampling import lean_obstacle, sample_answers

from tiny import build_model, build_tokenizer

PROMPTS = [
    "How do I bake bread?",
    "Paris is",
    "Write a poem about the sea please, with waves",
    "0123",
    "hello world user",
]
NEW = 20


@pytest.fixture(scope="module")
def sharp():
    """A tiny model whose head is scaled up: peaked distributions, so that some rows draw the stop token (2) early
    and others never do."""
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed=1).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
        model.lm_head.weight[2] *= 1.5
    ids, mask = pad_sequences([tokenizer(p)["input_ids"] for p in PROMPTS], tokenizer.pad_token_id, "left")
    return model, ids, mask


def _generate(model, ids, mask, n, temperature, top_p, **extra):
    sampling = temperature > 0
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=0 if sampling else None,
        max_new_tokens=NEW,
        num_return_sequences=n,
        pad_token_id=0,
        eos_token_id=[2],
        **extra,
    )[:, ids.shape[1] :]
    return torch.nn.functional.pad(out, (0, NEW - out.shape[1]), value=0)  # generate stops when all rows have


@pytest.mark.parametrize(
    "n, temperature, top_p",
    [(1, 0.0, 1.0), (1, 1.0, 1.0), (3, 0.7, 0.9), (2, 1.3, 1.0)],
    ids=["greedy", "sampled", "3 samples top-p", "2 samples hot"],
)
def test_lean_loop_draws_the_tokens_generate_draws(sharp, n, temperature, top_p):
    model, ids, mask = sharp
    torch.manual_seed(5)
    ours = sample_answers(
        model, ids, mask, n=n, max_new_tokens=NEW, temperature=temperature, top_p=top_p, stop=[2], pad=0
    )
    torch.manual_seed(5)
    theirs = _generate(model, ids, mask, n, temperature, top_p)
    assert ours.shape == (len(PROMPTS) * n, NEW)
    assert torch.equal(ours, theirs)
    stopped = (ours == 2).any(dim=1)
    assert stopped.any() and not stopped.all()  # rows left the batch early while others went on
    after_stop = [row[(row == 2).nonzero()[0, 0] + 1 :] for row in ours[stopped]]
    assert all(bool((rest == 0).all()) for rest in after_stop)  # padded after the stop, as generate pads


def test_lean_loop_runs_a_lora_policy_with_its_adapter_on(sharp):
    """The online rounds generate from a peft-wrapped policy: the loop runs its adapted weights (not the base's)."""
    peft = pytest.importorskip("peft")
    model, ids, mask = sharp
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    try:
        torch.manual_seed(3)
        ours = sample_answers(
            wrapped, ids, mask, n=2, max_new_tokens=NEW, temperature=1.0, top_p=1.0, stop=[2], pad=0
        )
        torch.manual_seed(3)
        theirs = _generate(wrapped, ids, mask, 2, 1.0, 1.0)
        torch.manual_seed(3)
        with wrapped.disable_adapter():
            base = _generate(wrapped, ids, mask, 2, 1.0, 1.0)
        assert torch.equal(ours, theirs)
        assert not torch.equal(ours, base)
    finally:
        wrapped.unload()  # the shared fixture's model without LoRA layers again


def test_a_generation_config_asking_for_more_runs_generate(sharp, tmp_path, capsys):
    """A model whose generation config sets a repetition penalty: the lean loop would not apply it, so iopo's
    generation runs transformers' generate (its answers carry the penalty) and logs why."""
    model, _, _ = sharp
    assert lean_obstacle(model) is None
    from copy import deepcopy

    from iopo.config import GenerationConfig
    from iopo.eval.generate import generate_answers
    from iopo.io.models import model_fingerprint

    penalised = deepcopy(model)
    penalised.generation_config.repetition_penalty = 1.5
    assert lean_obstacle(penalised) == "its generation config sets repetition_penalty"
    tokenizer = build_tokenizer()
    prompts = [{"prompt_id": f"{i:08x}", "prompt": p} for i, p in enumerate(PROMPTS)]
    gen = GenerationConfig(temperature=0.0, n=1, max_new_tokens=NEW, batch_size=8)

    def answers(m, name):
        records, _ = generate_answers(
            None,
            prompts,
            gen,
            tmp_path / f"{name}.jsonl",
            max_prompt_length=64,
            loaded=(m, tokenizer, model_fingerprint(m), name),
            progress=False,
        )
        return [r["answer"] for r in records]

    plain = answers(model, "plain")
    assert "not the lean loop" not in capsys.readouterr().out
    penalty = answers(penalised, "penalised")
    said = capsys.readouterr().out
    assert (
        "generate penalised: transformers' generate, not the lean loop (its generation config sets " in said
    )
    assert penalty != plain  # the penalty was applied
