"""The players: a trainable (or frozen) policy's module, LoRA adapter, parameters and optimizer state, built from
the starting model (or a checkpoint) as the METHODS row asks, and the forward of one player on a pair batch.

Full fine-tuning: one model copy per player (and a frozen copy for a reference). LoRA: one shared frozen base
with one adapter per player; the reference is the base with every adapter disabled (`BASE`).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from iopo.config import TrainConfig
from iopo.core.logprobs import SequenceLogProbs, language_model, sequence_logps
from iopo.core.methods import Method
from iopo.engine import sharding
from iopo.io import checkpoint
from iopo.io.models import adapter_parameters, add_lora_adapters, load_model

BASE = "<base>"  # the LoRA reference: the shared base with every adapter disabled


@dataclass
class Player:
    """A trainable (or frozen) policy: its forward module, LoRA adapter name, parameters and optimizer state."""

    name: str
    module: torch.nn.Module  # prepared SequenceLogProbs; shared by both players under LoRA
    adapter: str | None = (
        None  # LoRA adapter name, BASE for the disabled-adapter reference, None for full weights
    )
    params: list = field(default_factory=list)
    optimizer: object = None
    scheduler: object = None


def build_players(
    cfg: TrainConfig, method: Method, accelerator, resume_dir: Path | None
) -> tuple[dict[str, Player], Player | None]:
    """The trained players of `method` and, when its env is the reference, the frozen reference player."""
    names = list(method.players)
    needs_reference = method.env == "reference"
    chunk = cfg.logps_chunk_tokens
    shard = sharding.sharded(cfg, accelerator)
    # Under fsdp the weights of a checkpoint are in its DCP folder, loaded after sharding (open_session).
    hf_resume = resume_dir if resume_dir is not None and not checkpoint.uses_dcp(cfg) else None

    def distribute(module, frozen: bool = False):
        if shard:
            return sharding.shard(module, cfg, accelerator)
        return accelerator.prepare_model(module, evaluation_mode=frozen)

    if cfg.model.lora:
        peft_model = add_lora_adapters(load_model(cfg.model), cfg.model, names)
        if hf_resume is not None:
            checkpoint.load_adapters(peft_model, hf_resume, names)
        # Both adapters stay trainable: DDP must see the same parameter set always.
        for name in names:
            for p in adapter_parameters(peft_model, name):
                p.requires_grad_(True)
        module = distribute(SequenceLogProbs(peft_model.train(), chunk))
        # Collected after sharding: under fsdp the adapters' parameters are then the sharded ones.
        params = {name: adapter_parameters(peft_model, name) for name in names}
        players = {n: Player(n, module, adapter=n, params=params[n]) for n in names}
        reference = Player("reference", module, adapter=BASE) if needs_reference else None
    else:
        start = load_model(cfg.model)
        # Every copy is made before anything is sharded (a sharded module cannot be copied).
        frozen = copy.deepcopy(start).eval().requires_grad_(False) if needs_reference else None
        models = {}
        for i, name in enumerate(names):
            if hf_resume is not None:
                weights = checkpoint.player_weights(hf_resume, name)
                models[name] = load_model(cfg.model.model_copy(update={"name_or_path": str(weights)}))
            else:
                models[name] = start if i == 0 else copy.deepcopy(start)  # both players start alike
        reference = None
        if frozen is not None:
            reference = Player("reference", distribute(SequenceLogProbs(frozen, chunk).eval(), frozen=True))
        players = {}
        for name, model in models.items():
            # Trained players are in train mode (from_pretrained returns eval mode); whether that means dropout is
            # model.disable_dropout's decision. The frozen env/reference forwards run in eval mode (player_logps).
            module = distribute(SequenceLogProbs(model.train(), chunk))
            players[name] = Player(name, module, params=[p for p in module.parameters() if p.requires_grad])
    return players, reference


@contextmanager
def use_adapter(model, name: str | None, trainable: list = ()):
    """Make LoRA adapter `name` the one a peft model computes with (None: every adapter disabled, the base), and
    restore the previous choice in `finally` (as torchtune's disable_adapter). peft freezes the adapters it does
    not select: the `trainable` parameters are made trainable again after each switch (DDP's view never changes)."""
    if name is None:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    model.set_adapter(name)
    for p in trainable:
        p.requires_grad_(True)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for p in trainable:
            p.requires_grad_(True)


@contextmanager
def acting(player: Player, all_players: dict[str, Player]):
    """Make `player` the one its (maybe shared) module computes: its LoRA adapter, or the base for BASE."""
    if player.adapter is None:
        yield
        return
    trainable = [p for pl in all_players.values() for p in pl.params]
    adapter = None if player.adapter == BASE else player.adapter
    with use_adapter(language_model(player.module), adapter, trainable):
        yield


def player_logps(
    player: Player, batch: dict, players: dict[str, Player], grad: bool
) -> dict[str, torch.Tensor]:
    """One concatenated chosen+rejected forward of `player`; the env/reference runs without autograd."""
    with acting(player, players), torch.set_grad_enabled(grad):
        if grad:
            return sequence_logps(player.module, batch)
        was_training = player.module.training
        player.module.eval()
        try:
            return sequence_logps(player.module, batch)
        finally:
            player.module.train(was_training)


def copy_weights(source: Player, target: Player) -> None:
    """`target` becomes `source` as it is now (a reference moved to the policy, full fine-tuning)."""
    with torch.no_grad():
        language_model(target.module).load_state_dict(language_model(source.module).state_dict())
