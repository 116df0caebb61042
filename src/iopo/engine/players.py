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


@dataclass
class Blend:
    """An env made of frozen players whose log-probs are the weighted sum of theirs (INPO's reference: the starting
    model and the round's previous policy). Log-probs are linear in the blend, so the loss sees one env."""

    parts: tuple[tuple[float, Player], ...]
    name: str = "blend"


PREVIOUS = "previous"  # the frozen copy of the policy as the online round began (its LoRA adapter's name too)


def build_players(
    cfg: TrainConfig, method: Method, accelerator, resume_dir: Path | None, rounds: bool = False
) -> tuple[dict[str, Player], Player | None, Player | None]:
    """The trained players of `method`, the frozen starting model when its env needs one (else None), and, in
    online rounds (`rounds`) when its env is the previous policy or a blend with it, the frozen previous player
    (copied from the policy as each round's training begins: `copy_weights`; else None)."""
    names = list(method.players)
    needs_previous = rounds and method.env in ("previous", "mixed")
    needs_reference = method.env in ("reference", "mixed") or (method.env == "previous" and not rounds)
    chunk = cfg.logps_chunk_tokens
    shard = sharding.sharded(cfg, accelerator)
    # Under fsdp the weights of a checkpoint are in its DCP folder, loaded after sharding (open_session).
    hf_resume = resume_dir if resume_dir is not None and not checkpoint.uses_dcp(cfg) else None

    def distribute(module, frozen: bool = False):
        if shard:
            return sharding.shard(module, cfg, accelerator)
        return accelerator.prepare_model(module, evaluation_mode=frozen)

    if cfg.model.lora:
        frozen_adapters = [PREVIOUS] if needs_previous else []
        peft_model = add_lora_adapters(load_model(cfg.model), cfg.model, names + frozen_adapters)
        if hf_resume is not None:
            checkpoint.load_adapters(peft_model, hf_resume, names)
        # Both adapters stay trainable: DDP must see the same parameter set always. The previous one never is.
        for name in names:
            for p in adapter_parameters(peft_model, name):
                p.requires_grad_(True)
        for name in frozen_adapters:
            for p in adapter_parameters(peft_model, name):
                p.requires_grad_(False)
        module = distribute(SequenceLogProbs(peft_model.train(), chunk))
        # Collected after sharding: under fsdp the adapters' parameters are then the sharded ones.
        params = {name: adapter_parameters(peft_model, name) for name in names}
        players = {n: Player(n, module, adapter=n, params=params[n]) for n in names}
        reference = Player("reference", module, adapter=BASE) if needs_reference else None
        previous = Player(PREVIOUS, module, adapter=PREVIOUS) if needs_previous else None
    else:
        start = load_model(cfg.model)
        # Every copy is made before anything is sharded (a sharded module cannot be copied).
        frozen = copy.deepcopy(start).eval().requires_grad_(False) if needs_reference else None
        # The previous policy is overwritten before its first use (each round's training copies the policy).
        moving = copy.deepcopy(start).eval().requires_grad_(False) if needs_previous else None
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
        previous = None
        if moving is not None:
            previous = Player(PREVIOUS, distribute(SequenceLogProbs(moving, chunk).eval(), frozen=True))
    return players, reference, previous


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


def env_logps(env: Player | Blend, batch: dict, players: dict[str, Player]) -> dict[str, torch.Tensor]:
    """The env's log-probs on a batch, without autograd: one frozen player's, or a Blend's weighted sum (the
    lengths are the batch's, the same for every part)."""
    if isinstance(env, Player):
        return player_logps(env, batch, players, grad=False)
    outs = [(weight, player_logps(part, batch, players, grad=False)) for weight, part in env.parts]
    blended = dict(outs[0][1])
    for key in ("chosen_logps", "rejected_logps"):
        blended[key] = sum(weight * out[key].float() for weight, out in outs)
    return blended


def copy_weights(source: Player, target: Player) -> None:
    """`target` becomes `source` as it is now: the previous policy of an online round (full weights, or the
    policy's LoRA adapter copied into the target's adapter), or iter_dpo's reference moved to the policy."""
    with torch.no_grad():
        if target.adapter is None:
            language_model(target.module).load_state_dict(language_model(source.module).state_dict())
            return
        if source.adapter is None or target.adapter == BASE:
            raise ValueError(
                f"cannot copy the {source.name} into the {target.name} (LoRA: adapter to adapter)"
            )
        model = language_model(target.module)
        marker_from, marker_to = f".{source.adapter}.", f".{target.adapter}."
        own = dict(model.named_parameters())
        for name, param in own.items():
            if "lora_" in name and marker_to in name:
                param.copy_(own[name.replace(marker_to, marker_from)])
