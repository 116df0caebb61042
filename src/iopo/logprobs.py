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
        if type(head) is torch.nn.Linear:
            # Project in float32 even when the weights are bf16: the log-softmax needs the precision.
            bias = None if head.bias is None else head.bias.float()
            logits = F.linear(hidden.float(), head.weight.float(), bias)  # (M, V)
        else:  # an adapted or custom head: call it as is, upcast after
            logits = head(hidden.to(head.weight.dtype)).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


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
    pieces = []
    for start in range(0, selected_targets.numel(), chunk_tokens):
        h = selected_hidden[start : start + chunk_tokens]
        t = selected_targets[start : start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            # Recompute this chunk's logits in backward instead of keeping (chunk, V) floats alive.
            pieces.append(checkpoint(_token_logps, h, t, head, softcap, use_reentrant=False))
        else:
            pieces.append(_token_logps(h, t, head, softcap))
    token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    logps = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=hidden.device)
    logps = logps.index_add(0, rows, token_logps)
    return logps, mask.sum(-1)


def _transformers_model(model):
    """The transformers PreTrainedModel inside a peft wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class SequenceLogProbs(torch.nn.Module):
    """A causal LM whose forward returns per-sequence completion log-probs instead of logits.

    Wrapping the LM (rather than calling its parts from outside) keeps DDP/FSDP hooks on the path of every forward.
    """

    def __init__(self, model: torch.nn.Module, chunk_tokens: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids, attention_mask, completion_mask):
        lm = _transformers_model(self.model)
        backbone = lm.base_model  # e.g. LlamaModel: hidden states without the vocabulary projection
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        softcap = getattr(lm.config, "final_logit_softcapping", None)
        return completion_logps(
            hidden, input_ids, completion_mask, lm.get_output_embeddings(), self.chunk_tokens, softcap
        )


def sequence_logps(module, batch: dict) -> dict[str, torch.Tensor]:
    """Run one concatenated forward and split it: batch rows 0..B-1 are chosen, B..2B-1 rejected.

    Returns chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, each (B,).
    """
    logps, lengths = module(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    half = batch["input_ids"].shape[0] // 2
    return {
        "chosen_logps": logps[:half],
        "rejected_logps": logps[half:],
        "chosen_lengths": lengths[:half],
        "rejected_lengths": lengths[half:],
    }
