"""Checkpoints, their one owner: what a checkpoint folder holds and how a training session is written into it and
read back (full weights, LoRA adapters, or sharded DCP folders), atomically (a temp folder renamed into place, its
checksums written last), so a crash never leaves a half checkpoint and a damaged one is named, never trusted.

A checkpoint folder (`checkpoints/step-N`, or an online round's `checkpoint/`) holds:
- config.yaml (the run's resolved config) and trainer_state.json (step, data position, batch, format);
- per player: `<player>/` (full weights, save_pretrained) or `<player>/adapter_model.safetensors` (LoRA), or all
  players' shards in `dcp/` (distributed.strategy=fsdp, with the optimizer states);
- per player: `<player>.optimizer.pt` (not under DCP) and `<player>.scheduler.pt`;
- per process: `rng_state_<rank>.pt`; and checksums.json.
Everything else of iopo asks this module (`save_session`, `load_session`, `policy_folder`, `player_weights`) and
knows none of these names. A session is taken as it comes (its players, optimizers and accelerator): no import
of the engine here.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml

from iopo.config import ConfigError, TrainConfig, changed_settings, dump_config
from iopo.core.logprobs import language_model
from iopo.core.methods import METHODS
from iopo.io import runfolder
from iopo.io.log import get_logger
from iopo.io.runlog import mark_phase

log = get_logger(__name__)

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


STATE_FILE = "trainer_state.json"


# Settings that may differ between a run and its resumption without changing what is computed.
RESUME_FREE_KEYS = {
    "resume",
    "output_dir",  # a moved run folder resumes
    "overwrite",
    "progress_bar",
    "tensorboard",
    "report_to",
    "push_to_hub",
    "hub_model_id",
    "hub_private",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "eval_batch_size",
    "eval_steps",
    "eval_at_end",
    "eval_reference_cache",
    "export",
    "merge_lora",
    # how FSDP holds the shards, not what is computed
    "distributed.fsdp_offload",
    "distributed.fsdp_reshard_after_forward",
    "distributed.fsdp_layers",
}


# A sharded (DCP) checkpoint is resharded on load: the per-process batch may change with the number of processes
# (the pairs per step over all processes, checked apart, may not).
RESHARD_FREE_KEYS = {"optim.batch_size"}


def own_checkpoints(folder: Path) -> list[Path]:
    """The checkpoint folders iopo wrote into a run's checkpoints/ (finished `step-N`, interrupted `.tmp-step-N`)."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name.removeprefix(".tmp-"))
    )


# The places of an `iopo train` run folder and who owns each (iopo.io.runfolder); train-rm and the online rounds
# take some of them and add their own.
TRAIN_PLACES = {
    "config.yaml": runfolder.own_file,
    "metrics.jsonl": runfolder.own_file,
    "eval.json": runfolder.own_file,
    "eval_reference_logps.pt": runfolder.own_file,
    "logps": runfolder.own_logps,  # the test log-probs kept for `iopo eval` (iopo.engine.refcache)
    "rejects.jsonl": runfolder.own_file,
    "checkpoints": own_checkpoints,
    "tensorboard": runfolder.own_events,
    "final": runfolder.own_export,
}


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temp folders of interrupted writes are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := CHECKPOINT_RE.match(p.name))
        and (p / STATE_FILE).is_file()  # a stray empty step folder is not one
    ]
    return [p for _, p in sorted(found)]


CHECKSUMS = "checksums.json"


def sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_files(paths: list[Path]) -> list[str]:
    """sha256_file of each path, a few files at a time (hashlib and file reads release the GIL): the quickstart's
    3.1 GB checkpoint, cached in memory, hashes in 1.5 s instead of 2.3 s on this 2-core machine."""
    from concurrent.futures import ThreadPoolExecutor

    if len(paths) < 2:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(sha256_file, paths))


def write_checksums(folder: Path) -> None:
    """sha256 of every file of a checkpoint, written last (the checkpoint is complete when this file is)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    sums = {str(p.relative_to(folder)): digest for p, digest in zip(files, _sha256_files(files), strict=True)}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1), encoding="utf-8")


def damage_of(folder: Path) -> str | None:
    """Why a checkpoint cannot be trusted (a missing, changed or truncated file), or None when it verifies.
    Checkpoints of an older iopo carry no checksums: they are taken as they are."""
    sums_file = folder / CHECKSUMS
    if not sums_file.is_file():
        return None
    try:
        sums = json.loads(sums_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{CHECKSUMS} is unreadable"
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        return f"{CHECKSUMS} is unreadable"
    for name in sums:
        if not (folder / name).is_file():
            return f"{name} is missing"
    names = list(sums)
    for name, digest in zip(names, _sha256_files([folder / n for n in names]), strict=True):
        if digest != sums[name]:
            return f"{name} does not match its checksum"
    return None


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start; refuses to overwrite finished work silently."""
    run_dir = cfg.run_dir
    if isinstance(cfg.resume, str) and cfg.resume.lower() not in ("true", "false"):
        path = Path(cfg.resume)
        if not (path / STATE_FILE).is_file():
            raise ConfigError(f"resume={cfg.resume}: not a checkpoint folder (no {STATE_FILE})")
        damage = damage_of(path)
        if damage is not None:
            raise ConfigError(f"resume={cfg.resume}: the checkpoint is damaged ({damage})")
        return path
    want = cfg.resume is True or (isinstance(cfg.resume, str) and cfg.resume.lower() == "true")
    existing = list_checkpoints(run_dir)
    if want and existing:
        damage = damage_of(existing[-1])
        if damage is None:
            return existing[-1]
        intact = next((p for p in reversed(existing[:-1]) if damage_of(p) is None), None)
        offer = (
            f"resume={intact} continues from the newest intact one"
            if intact
            else "no older intact one is left"
        )
        raise ConfigError(f"the newest checkpoint {existing[-1]} is damaged ({damage}); {offer}")
    # A fresh start: may it write here, and may it delete what an earlier run there wrote? resume=true with no
    # checkpoint to resume may replace the traces of a run killed before its first one, never an export.
    inputs = [cfg.model.name_or_path, cfg.data.path, cfg.data.test_path]
    unfinished = (
        want and not runfolder.own_export(run_dir / "final") and not (run_dir / "eval.json").is_file()
    )
    runfolder.fresh_start(run_dir, TRAIN_PLACES, inputs, cfg.overwrite or unfinished)
    return None


def prepare_run_dir(run_dir: Path, resume_step: int | None) -> None:
    """Fresh start: delete what an earlier run there wrote (resolve_resume has checked that it may).
    Resume: drop the metrics logged after the checkpoint, which the resumed run logs again."""
    runfolder.mark(run_dir)
    if resume_step is None:
        runfolder.clean(run_dir, runfolder.owned_paths(run_dir, TRAIN_PLACES))
        return
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        kept, torn = [], 0
        for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError:  # a line cut mid-write by a kill
                torn += 1
                continue
            if isinstance(record, dict) and record.get("step", 0) <= resume_step:
                kept.append(line)
        if torn:
            log.info(
                f"{metrics}: dropped {torn} unreadable line(s) (cut by a kill); the resumed steps log again"
            )
        tmp = metrics.with_name(f".{metrics.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, metrics)


def resume_step(resume_dir: Path | None, cfg: TrainConfig) -> int | None:
    """The step a run resumes from (None: a fresh start), after checking that the checkpoint's settings allow it."""
    if resume_dir is None:
        return None
    state = read_state(resume_dir)
    check_resume_config(_saved_config(resume_dir), cfg, sharded=state.get("format") == "dcp")
    return state["step"]


def check_resume_config(saved: dict, cfg: TrainConfig, sharded: bool = False) -> None:
    free = RESUME_FREE_KEYS | (RESHARD_FREE_KEYS if sharded else set())
    diffs = changed_settings(saved, cfg, free, then="checkpoint")
    if diffs:
        raise ConfigError("cannot resume with changed settings: " + "; ".join(diffs))


def rng_state() -> dict:
    """Every RNG's state in a form `torch.load(weights_only=True)` reads (tensors, ints, floats, strings, lists):
    loading a checkpoint never unpickles arbitrary objects."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state_file(path: Path):
    """torch.load with weights_only=True: tensors and plain containers only, never code. A file that needs more (an
    older iopo's RNG pickle, a tampered checkpoint) or cannot be read is one ConfigError naming it."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise ConfigError(f"checkpoint file {path} is missing") from None
    except pickle.UnpicklingError:
        raise ConfigError(
            f"{path} holds objects other than tensors and plain containers (an older iopo's RNG state, or a "
            "tampered file) and is not unpickled; start over with overwrite=true, or resume from a checkpoint "
            "this version wrote"
        ) from None
    except Exception as e:  # RuntimeError (damaged zip), EOFError (truncated), ...
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ConfigError(f"cannot load checkpoint file {path}: {reason}") from None


def begin_write(run_dir: Path, step: int) -> tuple[Path, Path]:
    """(temp folder to fill, final folder). The temp folder is renamed into place by `finish_write`."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    begin_folder(tmp)
    return tmp, final


def begin_folder(tmp: Path) -> None:
    """An empty temp folder for a checkpoint at a chosen place (the online rounds' round_k/checkpoint)."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def write_common(tmp: Path, cfg: TrainConfig, state: dict) -> None:
    (tmp / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")


def finish_write(tmp: Path, final: Path, keep: int | None) -> None:
    write_checksums(tmp)
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after resuming from it)
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep:
        for old in list_checkpoints(final.parent.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


DCP_FOLDER = "dcp"


def _optimizer_file(folder: Path, player: str) -> Path:
    return folder / f"{player}.optimizer.pt"


def _scheduler_file(folder: Path, player: str) -> Path:
    return folder / f"{player}.scheduler.pt"


def _rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng_state_{rank}.pt"


def is_checkpoint(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file()


def is_sharded(folder: Path) -> bool:
    return (folder / DCP_FOLDER).is_dir()


def policy_folder(folder: Path) -> tuple[Path, bool]:
    """Where a checkpoint keeps the weights of its policy (the protagonist of a game, else the policy): (the
    folder, whether it is a LoRA adapter). A sharded checkpoint holds no whole model: refused in one line."""
    saved = _saved_config(folder)
    method = METHODS.get(str(saved.get("method")))
    names = [method.players[0]] if method else [m.players[0] for m in METHODS.values()]
    for name in dict.fromkeys(names):
        sub = folder / name
        if (sub / "adapter_config.json").is_file():
            return sub, True
        if (sub / "config.json").is_file():
            return sub, False
    if is_sharded(folder):
        raise ConfigError(
            f"{folder}: a sharded (FSDP) checkpoint holds no whole model; evaluate the run's final/ export, or "
            "resume the run to export one"
        )
    raise ConfigError(f"{folder}: checkpoint without a {' or '.join(dict.fromkeys(names))}/ folder")


def _saved_config(folder: Path) -> dict:
    try:
        saved = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return saved if isinstance(saved, dict) else {}


def player_weights(folder: Path, player: str) -> Path:
    """The full-weights folder of one player of a (non-sharded) checkpoint, for from_pretrained."""
    return folder / player


def load_adapters(peft_model, folder: Path, players: list[str]) -> None:
    """Load each player's LoRA adapter of a (non-sharded) checkpoint into the peft model's adapter of that name."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    for name in players:
        state = load_file(folder / name / "adapter_model.safetensors")
        set_peft_model_state_dict(peft_model, state, adapter_name=name)


# ---------------------------------------------------------------- a session, written and read back


def save_session(session, tmp: Path | None = None, final: Path | None = None) -> Path:
    """Every player (full weights or adapters), optimizer/scheduler/RNG states and the data position, written
    atomically: into `tmp`, renamed to `final` (default: checkpoints/step-N of the run, pruned to save_total_limit).
    A collective: every process calls it."""
    cfg, accelerator = session.cfg, session.accelerator
    mark_phase("checkpoint")
    started = time.perf_counter()
    if accelerator.is_main_process:  # a checkpoint of a large model takes a while: say it before, and after
        log.info(f"saving the checkpoint of step {session.step} (players, optimizer states, data position)")
    accelerator.wait_for_everyone()
    keep = None
    if final is None:
        keep = cfg.save_total_limit
        tmp, final = begin_write(cfg.run_dir, session.step) if accelerator.is_main_process else (None, None)
    elif accelerator.is_main_process:
        begin_folder(tmp)
    names = [str(tmp) if tmp else None, str(final) if final else None]
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(names, src=0)
    tmp, final = Path(names[0]), Path(names[1])
    dcp = uses_dcp(cfg)
    with_optimizer = _save_dcp(session, tmp) if dcp else None  # every process writes its shards
    if accelerator.is_main_process:
        for player in session.players.values():
            if not dcp:
                inner = language_model(player.module)
                if player.adapter is None:
                    inner.save_pretrained(player_weights(tmp, player.name), safe_serialization=True)
                else:
                    inner.save_pretrained(tmp, selected_adapters=[player.adapter])  # -> tmp/<adapter>/
                torch.save(player.optimizer.state_dict(), _optimizer_file(tmp, player.name))
            torch.save(player.scheduler.state_dict(), _scheduler_file(tmp, player.name))
        state = {
            "step": session.step,
            "micro_batches": session.position,
            "total_steps": session.total_steps,
            "global_batch": session.global_batch,
        }
        if dcp:
            state.update(format="dcp", processes=accelerator.num_processes, with_optimizer=with_optimizer)
        write_common(tmp, cfg, state)
    torch.save(rng_state(), _rng_file(tmp, accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finish_write(tmp, final, keep)
        log.info(f"checkpoint at step {session.step}: {final} ({time.perf_counter() - started:.0f}s)")
    accelerator.wait_for_everyone()
    session.last_saved = final
    return final


def load_session(session, folder: Path) -> None:
    """Read a checkpoint's states into a session whose players hold its weights already (non-sharded: loaded
    with the players) or not yet (DCP: loaded here, into the sharded players): optimizers, schedulers, this
    process's RNG, the step and the data position."""
    accelerator = session.accelerator
    state = read_state(folder)
    if state["global_batch"] != session.global_batch:
        raise ConfigError(
            f"checkpoint was written with {state['global_batch']} pairs per micro-batch over all "
            f"processes, now {session.global_batch}: keep optim.batch_size x processes equal to resume"
        )
    session.step, session.position = state["step"], state["micro_batches"]
    dcp = uses_dcp(session.cfg)
    if dcp:
        _load_dcp(session, folder, state.get("with_optimizer", []))
    for player in session.players.values():
        if not dcp:
            player.optimizer.load_state_dict(load_state_file(_optimizer_file(folder, player.name)))
        player.scheduler.load_state_dict(load_state_file(_scheduler_file(folder, player.name)))
    rng_file = _rng_file(folder, accelerator.process_index)
    if rng_file.is_file():
        set_rng_state(load_state_file(rng_file))
    session.last_saved = folder


# ---------------------------------------------------------------- sharded (DCP) checkpoints


def uses_dcp(cfg) -> bool:
    """Checkpoints of distributed.strategy=fsdp are DCP folders (even with one process)."""
    return cfg.distributed.strategy == "fsdp"


@contextmanager
def _quiet():
    """One process without a process group: DCP warns that it assumes a single process, which is the case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*process group.*")
        warnings.filterwarnings("ignore", message=".*assuming the intent.*")
        yield


def _stepped(session) -> list[str]:
    """The players whose optimizer has state (has stepped). A player that has not stepped yet is saved without
    one: asking DCP for an empty AdamW's state dict would first run a zero step that sets its step count to 1."""
    return [p.name for p in session.players.values() if p.optimizer.state]


def _dcp_state(session, with_optimizer: list[str]) -> dict:
    """What DCP saves and loads: each player's weights and the optimizer states of `with_optimizer` (LoRA: the
    adapters of the shared model once, then each player's optimizer)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    players = list(session.players.values())
    if players[0].adapter is not None:  # LoRA: one module, both adapters trainable, the base frozen
        module = players[0].module
        options = StateDictOptions(ignore_frozen_params=True)
        state = {"adapters": get_model_state_dict(module, options=options)}
        for p in players:
            if p.name in with_optimizer:
                state[f"{p.name}.optimizer"] = get_optimizer_state_dict(module, p.optimizer, options=options)
        return state
    state = {}
    for p in players:
        state[p.name] = get_model_state_dict(p.module)
        if p.name in with_optimizer:
            state[f"{p.name}.optimizer"] = get_optimizer_state_dict(p.module, p.optimizer)
    return state


def _save_dcp(session, folder: Path) -> list[str]:
    """Every process writes its shards of every player and optimizer into folder/dcp (a collective). Returns the
    players saved with optimizer state (recorded in the checkpoint's state)."""
    import torch.distributed.checkpoint as dcp

    with_optimizer = _stepped(session)
    with _quiet():
        dcp.save(_dcp_state(session, with_optimizer), checkpoint_id=str(folder / DCP_FOLDER))
    return with_optimizer


def _load_dcp(session, folder: Path, with_optimizer: list[str]) -> None:
    """Load a DCP checkpoint into the (sharded or whole) players and the optimizers of `with_optimizer`,
    resharding as needed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if not (folder / DCP_FOLDER / ".metadata").is_file():
        raise ConfigError(
            f"{folder} holds no sharded (DCP) checkpoint: it was written with distributed.strategy=ddp; resume "
            "it with that strategy"
        )
    with _quiet():
        state = _dcp_state(
            session, with_optimizer
        )  # what to load into (those AdamW states are made empty first)
        dcp.load(state, checkpoint_id=str(folder / DCP_FOLDER))
        players = list(session.players.values())
        if players[0].adapter is not None:
            module = players[0].module
            options = StateDictOptions(ignore_frozen_params=True)
            set_model_state_dict(module, state["adapters"], options=options)
            for p in players:
                if p.name in with_optimizer:
                    set_optimizer_state_dict(
                        module, p.optimizer, state[f"{p.name}.optimizer"], options=options
                    )
        else:
            for p in players:
                set_model_state_dict(p.module, state[p.name])
                if p.name in with_optimizer:
                    set_optimizer_state_dict(p.module, p.optimizer, state[f"{p.name}.optimizer"])
