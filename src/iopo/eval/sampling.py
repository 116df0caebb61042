"""The decoding loop of HF `generate` (sampling or greedy, KV cache), made lean for batches of answers on a CPU,
with the same tokens: `generate` prefills each prompt once per sample and keeps computing rows that have finished
until the last one has; here a prompt is prefilled once and its cache repeated for its n samples, and a row that
has stopped leaves the batch (its cache rows too), so each step costs what the answers still being written need.

Tokens are picked as `generate` picks them: float32 logits of the last position, divided by the temperature, cut
to top-p (its TopPLogitsWarper: the smallest set whose probability passes top_p, at least one token), then one
`torch.multinomial` draw over the whole batch, finished rows included (with a uniform row), so the random stream is
the one `generate` consumes; argmax when greedy. A finished row is padded with `pad` to max_new_tokens, as `generate`
pads it. Only where that loop is `generate`'s loop (lean_obstacle is None); elsewhere the caller uses `generate`.
"""

from __future__ import annotations

import inspect

import torch

# generation_config fields that the loop reads (or that change nothing it does); any other field set away from its
# default asks `generate` for something more (a repetition penalty, banned words, beams, ...): then `generate` runs.
READ_OR_INERT = {
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "max_length",
    "max_new_tokens",
    "use_cache",
    "cache_implementation",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "output_logits",
    "return_dict_in_generate",
    "transformers_version",
    "_from_model_config",
}


def lean_obstacle(model) -> str | None:
    """Why the lean loop cannot stand in for `generate` on this model (None when it can): it needs transformers'
    own decoder-only modelling code (taking position ids) and a generation config that asks for nothing beyond
    temperature and top-p (the caller sets those, and top_k=0)."""
    from iopo.core.logprobs import transformers_model

    lm = transformers_model(model)
    if not type(lm).__module__.startswith("transformers."):
        return f"its modelling code ({type(lm).__module__}) is not transformers' own"
    if getattr(lm.config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    if "position_ids" not in inspect.signature(lm.forward).parameters:
        return "its forward takes no position_ids"
    config = getattr(lm, "generation_config", None)
    if config is not None:
        extra = sorted(set(config.to_diff_dict()) - READ_OR_INERT)
        if extra:
            return f"its generation config sets {', '.join(extra)}"
    return None


def _pick(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Processed float32 scores (R, V) of `generate`'s sampling: temperature, then top-p."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_p < 1.0:
        ordered, index = torch.sort(scores, descending=False)
        cut = ordered.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        cut[..., -1:] = False  # at least one token stays
        scores = scores.masked_fill(cut.scatter(1, index, cut), -float("inf"))
    return scores


class CacheUnsupported(RuntimeError):
    """The model's cache cannot be repeated or cut by row: use `generate`."""


@torch.inference_mode()
def sample_answers(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop: list[int],
    pad: int,
) -> torch.Tensor:
    """New tokens (B*n, max_new_tokens) for left-padded prompts (B, T); row b*n + j is sample j of prompt b, padded
    with `pad` after its stop token. temperature 0 = greedy. Raises CacheUnsupported before any token is drawn when
    the prefill's cache is not one whose rows can be repeated and dropped (the caller then runs `generate`)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from iopo.core.logprobs import transformers_model

    lm = transformers_model(model)
    accepted = inspect.signature(lm.forward).parameters
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    cache_name = "cache" if "cache" in accepted else "past_key_values"  # transformers 5.x's name, then 4.x's
    device = input_ids.device
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate's prepare_inputs_for_generation
    out = lm(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep_last)
    cache = getattr(out, cache_name, None)
    if type(cache) is not DynamicCache or not all(isinstance(layer, DynamicLayer) for layer in cache.layers):
        raise CacheUnsupported(f"its cache is a {type(cache).__name__}")
    logits = out.logits[:, -1].float()  # (B, V)
    del out
    rows_total = input_ids.shape[0] * n
    next_position = positions[:, -1] + 1  # (B,)
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)
        mask = mask.repeat_interleave(n, dim=0)
        next_position = next_position.repeat_interleave(n, dim=0)
    stop_ids = torch.tensor(stop, device=device)
    tokens = torch.full((rows_total, max_new_tokens), pad, dtype=torch.long, device=device)
    rows = torch.arange(rows_total, device=device)  # the batch row of each row still being written
    sampling = temperature > 0
    for step in range(max_new_tokens):
        if sampling:
            probs = torch.full((rows_total, logits.shape[-1]), 1.0 / logits.shape[-1], device=device)
            probs[rows] = _pick(logits, temperature, top_p).softmax(dim=-1)
            chosen = torch.multinomial(probs, num_samples=1).squeeze(1)[rows]  # the draw generate makes
        else:
            chosen = logits.argmax(dim=-1)
        tokens[rows, step] = chosen
        if step == max_new_tokens - 1:
            break
        going = ~torch.isin(chosen, stop_ids)
        if not bool(going.all()):
            if not bool(going.any()):
                break
            kept = going.nonzero().squeeze(1)
            cache.batch_select_indices(kept)
            rows, chosen, mask, next_position = rows[kept], chosen[kept], mask[kept], next_position[kept]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = lm(
            input_ids=chosen[:, None],
            attention_mask=mask,
            position_ids=next_position[:, None],
            **{cache_name: cache},
            use_cache=True,
            **keep_last,
        )
        logits = out.logits[:, -1].float()
        del out
        next_position = next_position + 1
    return tokens
