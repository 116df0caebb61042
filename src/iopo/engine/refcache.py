"""The starting model's test-split log-probs, shared between runs (`eval_reference_cache`).

Runs of a sweep, of several seeds or of several methods from the same starting model score their policy against the
same reference on the same test pairs: one forward over the test split that every run would otherwise repeat. With
`eval_reference_cache=DIR` the first run writes DIR/<key>.pt and the others read it. The key is a hash of everything
that decides those numbers: the starting weights (LoRA adapters excluded: they start as the identity), the test
pairs' token ids, the batching layout, the precision, the evaluation batch size and the process count. A file is
reused only on an exact key match; a file that does not load as plain tensors of the right size is computed again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from iopo.io.log import get_logger

logger = get_logger(__name__)


def starting_weights_digest(model) -> str:
    """sha256 of the weights a policy starts from: names, shapes, dtypes and bytes, LoRA adapters left out."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cache_key(session, test_pairs) -> str:
    cfg = session.cfg
    digest = hashlib.sha256()
    digest.update(starting_weights_digest(session.accelerator.unwrap_model(session.policy.module)).encode())
    layout = getattr(session.collate, "__name__", None) or type(session.collate).__name__
    facts = (cfg.mixed_precision, cfg.eval_batch_size, cfg.logps_chunk_tokens, layout, torch.__version__)
    digest.update(repr((*facts, session.accelerator.num_processes)).encode())
    for pair in test_pairs:
        digest.update(repr((pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)).encode())
    return digest.hexdigest()[:32]


def usable(found, n_pairs: int) -> bool:
    """Plain chosen/rejected log-prob tensors of n_pairs each, all finite."""
    return (
        isinstance(found, dict)
        and all(isinstance(found.get(k), torch.Tensor) for k in ("chosen_logps", "rejected_logps"))
        and found["chosen_logps"].numel() == n_pairs == found["rejected_logps"].numel()
        and bool(
            torch.isfinite(found["chosen_logps"]).all() and torch.isfinite(found["rejected_logps"]).all()
        )
    )


def load_logps(path: Path, n_pairs: int) -> dict | None:
    """Saved log-probs that load as plain tensors of n_pairs each, all finite (`usable`); None for a missing,
    truncated or foreign file (computed again, never trusted)."""
    if not Path(path).is_file():
        return None
    try:
        found = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:  # truncated by a kill, or not a tensor file
        return None
    return found if usable(found, n_pairs) else None


def save_logps(path: Path, logps: dict, tmp: Path | None = None) -> Path:
    """Write chosen/rejected log-probs to `path` atomically (through `tmp`, default <path>.tmp<pid>), as float32 on
    the CPU."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp or path.with_suffix(f".tmp{os.getpid()}")
    torch.save({k: logps[k].detach().cpu().float() for k in ("chosen_logps", "rejected_logps")}, tmp)
    os.replace(tmp, path)
    return path


def reference_logps(session, test_pairs, compute: Callable[[], dict]) -> dict:
    """compute() (the starting model's test log-probs), or the cache's copy of them when one matches."""
    folder = session.cfg.eval_reference_cache
    if not folder:
        return compute()
    path = Path(folder) / f"{cache_key(session, test_pairs)}.pt"
    found = load_logps(path, len(test_pairs))
    if found is not None:
        logger.info(f"reference log-probs of the test split: reused {path}")
        return found
    if path.is_file():
        logger.warning("%s: not a usable reference cache; computing again", path)
    result = compute()
    if session.accelerator.is_main_process:
        save_logps(path, result)
    return result


# ---------------------------------------------------------------- a model's test log-probs, by weights and pairs

LOGPS_FOLDER = (
    "logps"  # in a run folder (written by `iopo train`) and an eval folder (written by `iopo eval`)
)


def logps_key(fingerprint: str, dtype: str, pairs) -> str:
    """The key of a model's log-probs of `pairs`: its weights' fingerprint (iopo.io.models.model_fingerprint: names,
    shapes, dtypes and bytes), the precision they were computed in, the pairs' token ids and torch's version. The
    batching is not in it: the layouts give the same numbers up to float rounding (checked at 1e-4 when chosen)."""
    digest = hashlib.sha256(repr((fingerprint, dtype, torch.__version__)).encode())
    for pair in pairs:
        digest.update(repr((pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)).encode())
    return digest.hexdigest()[:32]


def read_logps(folders: list[Path], key: str, n_pairs: int) -> tuple[dict | None, Path | None]:
    """The stored log-probs of `key` from the first of `folders`/logps that has a usable file (plain tensors of
    n_pairs, all finite; a damaged or foreign file is passed over), and where they were found."""
    for folder in folders:
        path = Path(folder) / LOGPS_FOLDER / f"{key}.pt"
        found = load_logps(path, n_pairs)
        if found is not None:
            return found, path
    return None, None


def write_logps(folder: Path, key: str, logps: dict) -> Path:
    """Keep a model's log-probs under folder/logps/<key>.pt (atomically)."""
    return save_logps(Path(folder) / LOGPS_FOLDER / f"{key}.pt", logps)
