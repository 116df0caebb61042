"""FSDP2 for the players (`distributed.strategy=fsdp`): sharding, gradient sync, the gathered export.

Each player's `SequenceLogProbs` wrapper is sharded with `torch.distributed.fsdp.fully_shard`: every decoder layer
on its own, then the wrapper as the root, so the embeddings, final norm and LM head (tied or not) are one group the
wrapper's forward gathers (calling the LM's parts from outside a sharded root would meet sharded weights). Each
player keeps its own AdamW over its own shards; the frozen reference of the baselines is sharded the same way.
Mixed precision is FSDP2's policy (bf16 compute, float32 master weights and gradient reduction); optional CPU
offload of the shards. Checkpoints are `torch.distributed.checkpoint` (DCP) folders, written and read by
iopo.io.checkpoint: every process writes its shards, and DCP reshards on load, so a run may resume on another
number of processes (same global batch). With one process nothing is sharded (there is nothing to share), but
checkpoints are DCP all the same.
"""

from __future__ import annotations

import torch

from iopo.config import ConfigError
from iopo.core.logprobs import transformers_model


def sharded(cfg, accelerator) -> bool:
    """Are the players actually sharded (fsdp over more than one process)?"""
    return cfg.distributed.strategy == "fsdp" and accelerator.num_processes > 1


def _layer_classes(model, names: list[str]) -> set[str]:
    lm = transformers_model(model)
    wanted = set(names or getattr(lm, "_no_split_modules", None) or [])
    if not wanted:
        raise ConfigError(
            f"{type(lm).__name__} names no decoder-layer class (_no_split_modules): set distributed.fsdp_layers"
        )
    return wanted


def shard(module: torch.nn.Module, cfg, accelerator) -> torch.nn.Module:
    """Shard a SequenceLogProbs wrapper in place over all processes: decoder layers, then the wrapper as the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    device = accelerator.device
    mesh = init_device_mesh(device.type, (accelerator.num_processes,))
    options: dict = {"mesh": mesh, "reshard_after_forward": cfg.distributed.fsdp_reshard_after_forward}
    if cfg.mixed_precision == "bf16":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.distributed.fsdp_offload:
        # Pinned memory needs an accelerator; on a CPU-only machine the shards simply stay where they are.
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type != "cpu")
    elif device.type != "cpu":
        module.to(device)
    wanted = _layer_classes(module.model, cfg.distributed.fsdp_layers)
    layers = [m for m in module.modules() if type(m).__name__ in wanted]
    if not layers:
        raise ConfigError(f"distributed.fsdp_layers: no module of class {sorted(wanted)} in the model")
    for layer in layers:
        fully_shard(layer, **options)
    # The root: a forward gathers its own weights (embeddings, norm, head); resharding them after the forward
    # keeps a frozen player from holding them gathered for good and a stale gathered copy from outliving a step.
    fully_shard(module, **{**options, "reshard_after_forward": True})
    return module


def local_numel(params) -> int:
    """Parameters this process holds (its shards; whole tensors when nothing is sharded)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)


def full_numel(params) -> int:
    return sum(p.numel() for p in params)


def set_gradient_sync(module, sync: bool) -> None:
    """FSDP2's no_sync: accumulate unsharded gradients until the last micro-batch."""
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(sync)


def full_state_dict(module) -> dict:
    """The whole weights of a sharded wrapper gathered on the CPU of process 0 (a collective; others get {}),
    with the wrapper's `model.` prefix removed."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in state.items()}


def is_fsdp(module) -> bool:
    """Is this module sharded by FSDP2 (fully_shard)?"""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def autocast(accelerator, module):
    """accelerate's autocast, except for a sharded player: FSDP2's mixed-precision policy casts its weights."""
    from contextlib import nullcontext

    return nullcontext() if is_fsdp(module) else accelerator.autocast()
