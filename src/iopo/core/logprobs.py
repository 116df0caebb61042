"""Per-sequence log-probabilities of completions: logp_π(y|x) = Σ over completion tokens of log π(token | x, earlier).

One forward over the concatenated chosen+rejected batch (2B rows). Only completion positions reach the vocabulary
projection, in chunks of `chunk_tokens`, in float32; under autograd each chunk is checkpointed, so full-vocabulary
float32 logits for the whole batch never exist at once (only one chunk's, during its forward or recompute).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _token_logps(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, softcap: float | None):
    """log π(target | context) for M positions: hidden (M, H), targets (M,) -> (M,) float32."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        own = type(head) is torch.nn.Linear  # the logits below are then a new tensor no other backward reads
        if own:
            # Project in float32 even when the weights are bf16: the log-softmax needs the precision.
            bias = None if head.bias is None else head.bias.float()
            logits = F.linear(hidden.float(), head.weight.float(), bias)  # (M, V)
        else:  # an adapted or custom head: call it as is, upcast after
            logits = head(hidden.to(head.weight.dtype)).float()
        if softcap:
            # A new tensor again (tanh's backward keeps tanh's own output, not this product).
            logits = softcap * torch.tanh(logits / softcap)
            own = True
        if own and logits.requires_grad:
            return _TargetLogSoftmax.apply(logits, targets)
        return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


class _TargetLogSoftmax(torch.autograd.Function):
    """logits.gather(target) - logits.logsumexp(), whose backward turns the saved (M, V) logits into their gradient
    in place. Autograd's own backward of the same expression makes three more (M, V) float32 tensors (the softmax,
    its product with the gradient, the scattered one-hot), at the moment of a training step when every activation
    is still alive. The gradient is the same one, computed with the same operations on the same values:
    (-g) * exp(logits - lse) everywhere, plus g at the target. Only for logits that nothing else keeps."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = logits.logsumexp(-1)
        ctx.save_for_backward(logits, lse, targets)
        return logits.gather(-1, targets[:, None]).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, lse, targets = ctx.saved_tensors
        grad_logits = logits.sub_(lse[:, None]).exp_().mul_(-grad[:, None])
        return grad_logits.scatter_add_(-1, targets[:, None], grad[:, None]), None


def completion_logps(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    head: torch.nn.Module,
    chunk_tokens: int = 1024,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of completion-token log-probs per row, and the completion token counts.

    hidden: (N, T, H) last hidden states; input_ids, completion_mask: (N, T). Position t predicts token t+1, so the
    mask is read on the targets (shifted by one). Prompt and padding tokens never count.
    Returns (logps (N,) float32, lengths (N,) long).
    """
    targets = input_ids[:, 1:]  # (N, T-1)
    mask = completion_mask[:, 1:].bool()  # (N, T-1)
    rows = mask.nonzero(as_tuple=True)[0]  # (M,) row of each completion token
    selected_hidden = hidden[:, :-1][mask]  # (M, H)
    selected_targets = targets[mask]  # (M,)
    logps = summed_logps(
        selected_hidden, selected_targets, rows, input_ids.shape[0], head, chunk_tokens, softcap
    )
    return logps, mask.sum(-1)


def summed_logps(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    sequence: torch.Tensor,
    n_sequences: int,
    head: torch.nn.Module,
    chunk_tokens: int = 1024,
    softcap: float | None = None,
) -> torch.Tensor:
    """Σ log π(target | context) per sequence: hidden (M, H) of the positions that predict the M targets (M,), each
    belonging to sequence[m] in [0, n_sequences). The head and log-softmax run in chunks of `chunk_tokens`."""
    pieces = []
    for start in range(0, targets.numel(), chunk_tokens):
        h = hidden[start : start + chunk_tokens]
        t = targets[start : start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            # Recompute this chunk's logits in backward instead of keeping (chunk, V) floats alive.
            pieces.append(checkpoint(_token_logps, h, t, head, softcap, use_reentrant=False))
        else:
            pieces.append(_token_logps(h, t, head, softcap))
    token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    logps = torch.zeros(n_sequences, dtype=torch.float32, device=hidden.device)
    return logps.index_add(0, sequence, token_logps)


def transformers_model(model):
    """The transformers PreTrainedModel inside a peft wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def language_model(module: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model a player computes with: inside its SequenceLogProbs, itself maybe inside DDP."""
    inner = getattr(module, "module", module) if not isinstance(module, SequenceLogProbs) else module
    return inner.model if isinstance(inner, SequenceLogProbs) else inner


class SequenceLogProbs(torch.nn.Module):
    """A causal LM whose forward returns per-sequence completion log-probs instead of logits.

    Wrapping the LM (rather than calling its parts from outside) keeps DDP/FSDP hooks on the path of every forward.
    """

    def __init__(self, model: torch.nn.Module, chunk_tokens: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, batch: dict):
        """(log-probs (2B,), completion lengths (2B,)) of a collate_pairs batch (2B padded rows) or a collate_shared
        batch (one [prompt, chosen, rejected] sequence per pair, maybe packed)."""
        lm = transformers_model(self.model)
        backbone = lm.base_model  # e.g. LlamaModel: hidden states without the vocabulary projection
        softcap = getattr(lm.config, "final_logit_softcapping", None)
        head = lm.get_output_embeddings()
        if "target_index" not in batch:
            hidden = backbone(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).last_hidden_state
            return completion_logps(
                hidden, batch["input_ids"], batch["completion_mask"], head, self.chunk_tokens, softcap
            )
        hidden = shared_hidden_states(lm, batch)  # (N, T, H)
        n_sequences = 2 * int(batch["n_pairs"])
        selected = hidden.reshape(-1, hidden.shape[-1])[batch["target_index"]]  # (M, H)
        logps = summed_logps(
            selected, batch["target_ids"], batch["target_seq"], n_sequences, head, self.chunk_tokens, softcap
        )
        return logps, torch.bincount(batch["target_seq"], minlength=n_sequences)


def shared_hidden_states(lm, batch: dict) -> torch.Tensor:
    """The last hidden states (N, T, H) of a collate_shared batch through the transformers model's backbone (no
    head): the block mask in the form its attention takes, and the restarted positions."""
    backbone = lm.base_model
    return backbone(
        input_ids=batch["input_ids"],
        attention_mask=attention_bias(batch["attention_mask"], lm.config, backbone),
        position_ids=batch["position_ids"],
        use_cache=False,
    ).last_hidden_state


def sequence_rewards(model, batch: dict) -> torch.Tensor:
    """The scalar rewards (2B,) of a sequence-classification model (one output) on a pair batch, chosen sequences
    first: a plain batch (collate_pairs) through the model as transformers runs it; a prefix-shared one
    (collate_shared) through its backbone with the block mask, the head (`score`) reading each sequence's last
    non-padding token (`last_index`), where the plain forward reads it."""
    if "last_index" not in batch:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    lm = transformers_model(model)
    hidden = shared_hidden_states(lm, batch)  # (N, T, H)
    last = hidden.reshape(-1, hidden.shape[-1])[batch["last_index"]]  # (2B, H)
    return lm.score(last)[:, 0]


def reward_sharing_obstacle(model) -> str | None:
    """Why a reward model cannot take prefix-shared batches (None when it can)."""
    lm = transformers_model(model)
    if not isinstance(getattr(lm, "score", None), torch.nn.Module):
        return f"its head is not a `score` layer ({type(lm).__name__})"
    return sharing_obstacle(model)


SHARED_ATTENTION = ("sdpa", "eager")  # attention implementations that take a custom 4D mask


def sharing_obstacle(model) -> str | None:
    """Why a model cannot take prefix-shared batches (None when it can)."""
    lm = transformers_model(model)
    if not type(lm).__module__.startswith("transformers."):
        # Remote code (trust_remote_code) may build its own mask from a 2D one, or ignore it in training.
        return f"its modelling code ({type(lm).__module__}) is not transformers' own"
    config = lm.config
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in SHARED_ATTENTION:
        return f"its attention implementation {implementation} takes no 4D mask"
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) or "sliding_attention" in layer_types:
        return "it uses sliding-window attention, which a custom mask would override"
    return None


def shared_tolerance(low_precision: bool) -> float:
    """The largest relative gap `layouts_gap` may show for the shared layout to be used."""
    return 2e-2 if low_precision else 1e-4


def attention_bias(mask: torch.Tensor, config, backbone) -> torch.Tensor:
    """The 4D block mask in the form the model's attention wants: bool for SDPA, additive float for eager."""
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation == "sdpa":
        return mask
    if implementation == "eager":
        dtype = next(backbone.parameters()).dtype
        if torch.is_autocast_enabled(mask.device.type):
            dtype = torch.get_autocast_dtype(mask.device.type)
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return bias.masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(
        f"prefix sharing needs an attention implementation that takes a 4D mask ({', '.join(SHARED_ATTENTION)}), "
        f"not {implementation}: set batching=plain"
    )


def chosen_token_count(batch: dict) -> int:
    """The chosen completions' tokens in a collate_pairs or collate_shared batch (what `sequence_logps` returns as
    chosen_lengths, summed), known before the forward: the denominator of a token-mean loss (SFT)."""
    if "target_seq" in batch:
        return int((batch["target_seq"] < int(batch["n_pairs"])).sum())
    half = batch["input_ids"].shape[0] // 2
    return int(batch["completion_mask"][:half, 1:].sum())


def sequence_logps(module, batch: dict) -> dict[str, torch.Tensor]:
    """Run one forward and split it: sequences 0..B-1 are the chosen completions, B..2B-1 the rejected.

    Returns chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, each (B,).
    """
    logps, lengths = module(batch)
    half = logps.shape[0] // 2
    return {
        "chosen_logps": logps[:half],
        "rejected_logps": logps[half:],
        "chosen_lengths": lengths[:half],
        "rejected_lengths": lengths[half:],
    }
