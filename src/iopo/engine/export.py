"""The export: the protagonist (a game) or the policy as a standard Hugging Face folder that
`AutoModelForCausalLM.from_pretrained` loads (LoRA merged, or the adapter folder), listed in the run's marker."""

from __future__ import annotations

import copy
from pathlib import Path

from iopo.core.logprobs import language_model
from iopo.engine import sharding
from iopo.engine.players import Player
from iopo.engine.session import Session
from iopo.io import runfolder
from iopo.io.models import add_lora_adapters, load_model
from iopo.io.runlog import mark_phase


def export_policy(session: Session, out: Path) -> Path:
    """The protagonist/policy as a from_pretrained folder `out` (inside a run folder), listed in the run's marker so
    a later fresh start deletes only these files."""
    mark_phase("export")
    written = _export(session.cfg, session.accelerator, session.policy, session.tokenizer, out)
    if session.accelerator.is_main_process:
        runfolder.record_export(out.parent, out)
    return written


def _export(cfg, accelerator, player: Player, tokenizer, out: Path) -> Path:
    """The protagonist/policy as a standard HF folder that AutoModelForCausalLM.from_pretrained loads."""
    accelerator.wait_for_everyone()
    full = None
    if sharding.is_fsdp(
        player.module
    ):  # every process takes part in gathering the whole weights onto process 0
        full = sharding.full_state_dict(player.module)
    if accelerator.is_main_process:
        inner = language_model(player.module)
        if full is not None and player.adapter is not None:
            # An unsharded copy of the LoRA model (base + adapters) to merge from, built on process 0 only.
            adapters = list(language_model(player.module).peft_config)  # the players' (and a previous one)
            inner = add_lora_adapters(load_model(cfg.model), cfg.model, adapters)
            inner.load_state_dict(full, strict=True)
        if player.adapter is None and full is not None:
            inner.save_pretrained(out, state_dict=full, safe_serialization=True)
        elif player.adapter is None:
            inner.save_pretrained(out, safe_serialization=True)
        elif cfg.merge_lora:
            # Merge a copy of the protagonist's adapter into a copy of the base; the live model stays as it is.
            merged = copy.deepcopy(inner)
            merged.set_adapter(player.adapter)
            for name in list(merged.peft_config):
                if name != player.adapter:
                    merged.delete_adapter(name)
            merged = merged.merge_and_unload()
            merged.save_pretrained(out, safe_serialization=True)
        else:
            inner.save_pretrained(out, selected_adapters=[player.adapter])
            out = out / player.adapter
        tokenizer.save_pretrained(out)
    accelerator.wait_for_everyone()
    return out
