"""Tokenized pairs to tensors: plain (2B, T) right-padded batches whose completion_mask marks the tokens whose
log-probs count, prefix-shared batches (each pair's prompt computed once, packed rows), and left/right padding."""

from __future__ import annotations

import math

import torch

from iopo.data.tokenize import TokenizedPair


def pair_values(batch: list[TokenizedPair]) -> dict[str, torch.Tensor]:
    """The pairs' per-pair numbers (TokenizedPair.extras), one float32 (B,) tensor per name, in batch order. Every
    pair of a batch carries the same names (an online round writes them all); a batch that mixes pairs with and
    without a name is refused rather than filled in."""
    names = {tuple(sorted(p.extras or {})) for p in batch}
    if len(names) > 1:
        raise ValueError(f"the pairs of one batch carry different per-pair values: {sorted(names)}")
    keys = next(iter(names), ())
    return {key: torch.tensor([p.extras[key] for p in batch], dtype=torch.float32) for key in keys}


def collate_pairs(batch: list[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows 0..B-1 = prompt+chosen, rows B..2B-1 = prompt+rejected (same order), right-padded to the longest."""
    if not batch:
        raise ValueError("collate_pairs needs at least one pair")
    sequences = [(p.prompt_ids, p.chosen_ids) for p in batch] + [
        (p.prompt_ids, p.rejected_ids) for p in batch
    ]
    width = max(len(prompt) + len(completion) for prompt, completion in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (2B, T)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.bool)  # (2B, T)
    for row, (prompt, completion) in enumerate(sequences):
        end = len(prompt) + len(completion)
        input_ids[row, :end] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[row, :end] = 1
        completion_mask[row, len(prompt) : end] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        **pair_values(batch),
    }


def collate_shared(
    batch: list[TokenizedPair], pad_token_id: int, pack_tokens: int | None = None
) -> dict[str, torch.Tensor]:
    """Prefix sharing: each pair as ONE sequence [prompt, chosen, rejected], so its prompt is computed once.

    The rejected tokens restart their positions where the chosen ones started and cannot see the chosen tokens (a
    block attention mask), so every token sees exactly what it sees in its own prompt+completion sequence and gets
    the same log-prob. With `pack_tokens`, several pairs share a row (first fit in order, each pair in its own
    block, positions restarting at 0) up to that many tokens, so little is padding; else one pair per row.

    Returns input_ids and position_ids (N, T); attention_mask (N, 1, T, T) bool, True where a query (row) may
    attend a key (column); the completion-token table: target_index (M,) the flat index (row * T + t) of the
    position whose output predicts each completion token, target_ids (M,), target_seq (M,) in [0, 2B) - pair i's
    chosen is i, its rejected B + i - in the same order as collate_pairs' rows; and last_index (2B,), the flat index
    of each sequence's last token that is not the pad token (where transformers' sequence-classification head reads
    a right-padded row: a reward model's score), in the same order.
    """
    if not batch:
        raise ValueError("collate_shared needs at least one pair")
    sizes = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in batch]
    rows: list[list[int]] = []  # pair indices per row
    used: list[int] = []
    for i, size in enumerate(sizes):
        spot = None
        if pack_tokens:
            spot = next((r for r, n in enumerate(used) if n + size <= pack_tokens), None)
        if spot is None:
            rows.append([i])
            used.append(size)
        else:
            rows[spot].append(i)
            used[spot] += size
    width = max(used)
    n_rows, n_pairs = len(rows), len(batch)
    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    block = torch.full(
        (n_rows, width), -1, dtype=torch.long
    )  # which pair a position belongs to (-1: padding)
    branch = torch.zeros((n_rows, width), dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected
    index, targets, seqs = [], [], []
    last = [0] * (2 * n_pairs)
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            pair = batch[i]
            p, c, j = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
            end = start + p + c + j
            input_ids[r, start:end] = torch.tensor(pair.prompt_ids + pair.chosen_ids + pair.rejected_ids)
            position_ids[r, start : start + p + c] = torch.arange(p + c)
            position_ids[r, start + p + c : end] = torch.arange(p, p + j)
            block[r, start:end] = i
            branch[r, start + p : start + p + c] = 1
            branch[r, start + p + c : end] = 2
            base = r * width + start
            # chosen token k (at p + k) is predicted by the position before it; so is rejected token k, except the
            # first, which is predicted by the last prompt token (as in its own sequence)
            index += [base + p + k - 1 for k in range(c)]
            index += [base + p - 1] + [base + p + c + k - 1 for k in range(1, j)] if j else []
            targets += pair.chosen_ids + pair.rejected_ids
            seqs += [i] * c + [n_pairs + i] * j
            # where a sequence-classification head reads each sequence: its last token that is not padding
            k = _last_kept(pair.prompt_ids + pair.chosen_ids, pad_token_id)
            last[i] = base + k
            k = _last_kept(pair.prompt_ids + pair.rejected_ids, pad_token_id)
            last[n_pairs + i] = base + (k if k < p else c + k)  # rejected tokens sit after the chosen ones
            start = end
    same = block[:, :, None] == block[:, None, :]  # (N, T, T)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    hidden_branch = (branch[:, :, None] == 2) & (
        branch[:, None, :] == 1
    )  # rejected queries never see chosen keys
    mask = same & causal & ~hidden_branch & (block[:, :, None] >= 0)
    mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself (no empty softmax row)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": mask[:, None],
        "target_index": torch.tensor(index, dtype=torch.long),
        "target_ids": torch.tensor(targets, dtype=torch.long),
        "target_seq": torch.tensor(seqs, dtype=torch.long),
        "n_pairs": torch.tensor(n_pairs),
        "last_index": torch.tensor(last, dtype=torch.long),
        **pair_values(batch),
    }


def _last_kept(ids: list[int], pad_token_id: int) -> int:
    """The index of the last token of `ids` that is not the pad token (0 when all are)."""
    k = len(ids) - 1
    while k > 0 and ids[k] == pad_token_id:
        k -= 1
    return k


def pad_sequences(
    sequences: list[list[int]], pad_token_id: int, side: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (N, T), padded on the left (generation, next-token judges) or the right."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (N, T)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        input_ids[row, span] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def layouts_gap(
    forward, sample: list, pad_token_id: int, pack_tokens: int | None
) -> tuple[float, str | None]:
    """How far the prefix-shared results of `sample` are from the plain layout's: (the largest gap relative to the
    batch's largest value, None), or (inf, why) when `forward(batch)` refuses the shared batch (a model whose code
    wants a 2D mask). `forward` runs one batch without autograd (its device, adapter, precision) and gives the
    chosen and rejected log-probs (a dict, as sequence_logps), or one tensor (a reward model's rewards)."""
    try:
        with torch.no_grad():
            plain = forward(collate_pairs(sample, pad_token_id))
            shared = forward(collate_shared(sample, pad_token_id, pack_tokens=pack_tokens))
    except Exception as e:  # a model whose forward refuses a 4D mask or position ids: the plain layout
        return math.inf, f"its forward refused the shared layout ({type(e).__name__}: {str(e)[:120]})"
    pairs = (
        [(plain[k], shared[k]) for k in ("chosen_logps", "rejected_logps")]
        if isinstance(plain, dict)
        else [(plain, shared)]
    )
    gap = max(float((a - b).abs().max() / (1.0 + a.abs().max())) for a, b in pairs)
    return gap, None
