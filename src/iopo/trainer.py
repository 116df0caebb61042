"""The training loop: IOPO's two-player game (Alg. 1) and the frozen-reference baselines, on accelerate.

Read top to bottom: set-up (data, players, schedule, resume) -> the optimizer-step loop -> checkpoint, export,
evaluation. In IOPO's phases one player is the AGENT (trained) and the other the ENV (frozen, the reference);
a baseline is the same loop with a single player, the policy, against a frozen copy of the starting model.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from iopo import checkpoint as ckpt
from iopo import refcache, runfolder, sharding
from iopo.config import MAX_STEPS, ConfigError, TrainConfig, dump_config
from iopo.data import TokenizedPair, collate_pairs, collate_shared, load_training_data
from iopo.logprobs import (
    SequenceLogProbs,
    layouts_gap,
    sequence_logps,
    shared_tolerance,
    sharing_obstacle,
)
from iopo.losses import LOSSES
from iopo.models import adapter_parameters, add_lora_adapters, load_model, load_tokenizer
from iopo.scoring import dataset_logps, format_table, offline_metrics
from iopo.stats import json_safe

BASE = "<base>"  # the LoRA reference: the shared base with every adapter disabled


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm; the step's update was not applied. The trainer adds the step number."""

    def __init__(self, quantity: str, value: float, player: str, step: int | None = None, kept: str = ""):
        self.quantity, self.value, self.player, self.step = quantity, value, player, step
        at = f"step {step}" if step is not None else "a step"
        super().__init__(
            f"non-finite {quantity} ({value}) at {at} of the {player}: the update was not applied and nothing was "
            f"exported{kept} (lower optim.learning_rate, check the data, or use float32)"
        )


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


# ---------------------------------------------------------------- schedule


def iopo_schedule(n_iter: int, n_mu: int, n_nu: int) -> list[tuple[str, int]]:
    """Alg. 1: for each of n_iter rounds, n_mu protagonist steps then n_nu adversary steps.

    Returns one (agent name, round index) per optimizer step.
    """
    one_round = ["protagonist"] * n_mu + ["adversary"] * n_nu
    return [(agent, i) for i in range(n_iter) for agent in one_round]


def optimizer_steps(optim, n_train: int, global_batch: int) -> int:
    """optim.max_steps, else the steps that num_epochs over n_train pairs take (at least one)."""
    steps_per_epoch = max(1, math.ceil(n_train / (global_batch * optim.gradient_accumulation_steps)))
    return optim.max_steps or max(1, math.ceil(optim.num_epochs * steps_per_epoch))


def build_schedule(cfg: TrainConfig, n_train: int, global_batch: int) -> list[tuple[str, int]]:
    """The agent of every optimizer step, from max_steps / num_epochs (baselines) or n_iter (IOPO)."""
    wanted = optimizer_steps(cfg.optim, n_train, global_batch)
    if cfg.method != "iopo":
        total = wanted
    else:
        n_iter = cfg.iopo.n_iter or max(1, math.ceil(wanted / (cfg.iopo.n_mu + cfg.iopo.n_nu)))
        total = n_iter * (cfg.iopo.n_mu + cfg.iopo.n_nu)
    if total > MAX_STEPS:  # refused before a list of that many steps is built
        raise ConfigError(
            f"the settings ask for {total:,} optimizer steps (optim.num_epochs={cfg.optim.num_epochs:g} over "
            f"{n_train} pairs, optim.max_steps, iopo.n_iter x (n_mu + n_nu)); at most {MAX_STEPS:,}"
        )
    if cfg.method != "iopo":
        return [("policy", 0)] * wanted
    return iopo_schedule(n_iter, cfg.iopo.n_mu, cfg.iopo.n_nu)


def micro_batch_indices(position: int, global_batch: int, n: int, seed: int) -> list[int]:
    """Pair indices of micro-batch number `position` in an endless stream of seeded per-epoch permutations.

    Depends only on its arguments, so a resumed run reads exactly the batches the uninterrupted run would have.
    """
    out = []
    for k in range(position * global_batch, (position + 1) * global_batch):
        epoch, offset = divmod(k, n)
        out.append(_permutation(n, seed + epoch)[offset])
    return out


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------- players


def _loss_options(cfg: TrainConfig) -> dict:
    """The keyword options of the chosen loss, picked from the config by name."""
    beta = {"beta": cfg.loss.beta}
    return {
        "dpo": {**beta, "label_smoothing": cfg.loss.label_smoothing},
        "ipo": {**beta, "average": cfg.loss.ipo_average},
        "hinge": beta,
        "kto_pair": beta,
        "sft": {},
        "iopo": {
            **beta,
            "epsilon": cfg.iopo.epsilon,
            "is_clip": cfg.iopo.is_clip,
            "is_logp": cfg.iopo.is_logp,
        },
    }[cfg.method]


def _optimizer(params, cfg: TrainConfig):
    o = cfg.optim
    return torch.optim.AdamW(
        params,
        lr=o.learning_rate,
        betas=(o.adam_beta1, o.adam_beta2),
        eps=o.adam_epsilon,
        weight_decay=o.weight_decay,
    )


def _scheduler(optimizer, cfg: TrainConfig, n_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
        cfg.optim.lr_scheduler
    ]
    warmup = math.ceil(cfg.optim.warmup_ratio * n_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(n_steps, 1))


def build_players(cfg: TrainConfig, accelerator, names: list[str], resume_dir: Path | None):
    """The trained players and, for the reference-based baselines, the frozen reference player."""
    needs_reference = cfg.method not in ("iopo", "sft")
    chunk = cfg.logps_chunk_tokens
    shard = sharding.sharded(cfg, accelerator)
    # Under fsdp the weights of a checkpoint are in its DCP folder, loaded after sharding (open_session).
    hf_resume = resume_dir if resume_dir is not None and not sharding.uses_dcp(cfg) else None

    def distribute(module, frozen: bool = False):
        if shard:
            return sharding.shard(module, cfg, accelerator)
        return accelerator.prepare_model(module, evaluation_mode=frozen)

    if cfg.model.lora:
        peft_model = add_lora_adapters(load_model(cfg.model), cfg.model, names)
        if hf_resume is not None:
            from peft.utils import set_peft_model_state_dict
            from safetensors.torch import load_file

            for name in names:
                state = load_file(hf_resume / name / "adapter_model.safetensors")
                set_peft_model_state_dict(peft_model, state, adapter_name=name)
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
                models[name] = load_model(
                    cfg.model.model_copy(update={"name_or_path": str(hf_resume / name)})
                )
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
def acting(player: Player, all_players: dict[str, Player]):
    """Make `player` the one the shared module computes: select its LoRA adapter (or disable all for BASE)."""
    if player.adapter is None:
        yield
        return
    peft_model = _unwrap(player.module).model
    if player.adapter == BASE:
        with peft_model.disable_adapter():
            yield
        return
    peft_model.set_adapter(player.adapter)
    # peft freezes the inactive adapters; keep every player's adapter trainable so DDP's view never changes.
    for p in (p for pl in all_players.values() for p in pl.params):
        p.requires_grad_(True)
    yield


def _unwrap(module):
    return getattr(module, "module", module)


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


def train_step(
    agent: Player, env: Player | None, players, micro_batches, loss_fn, accelerator, max_grad_norm
):
    """One optimizer step of `agent` against `env` (the frozen other player, the reference, or None for SFT).

    Gradients are accumulated over the micro-batches (synchronised across processes on the last one only), clipped,
    and applied by the agent's own optimizer; no other player's parameters or optimizer state are touched.
    Returns the step's metrics (means over micro-batches; min/max keep their extremes) and the gradient norm.
    """
    agent.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    n_micro = len(micro_batches)
    fsdp = _is_fsdp(agent.module)
    for k, batch in enumerate(micro_batches):
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        if fsdp:  # FSDP2 reduce-scatters the gradients on the last micro-batch only
            sharding.set_gradient_sync(agent.module, k == n_micro - 1)
            sync = nullcontext()
        else:
            sync = nullcontext() if k == n_micro - 1 else accelerator.no_sync(agent.module)
        with sync:
            with _autocast(accelerator, agent.module):
                env_out = player_logps(env, batch, players, grad=False) if env is not None else {}
                agent_out = player_logps(agent, batch, players, grad=True)
            loss, metrics = loss_fn(
                agent_out["chosen_logps"],
                agent_out["rejected_logps"],
                env_out.get("chosen_logps"),
                env_out.get("rejected_logps"),
                agent_out["chosen_lengths"],
                agent_out["rejected_lengths"],
            )
            accelerator.backward(loss / n_micro)
        for key, value in {"loss": loss.detach(), **metrics}.items():
            sums[key] = _combine(key, sums.get(key), float(value), n_micro)
    sums["grad_norm"] = _clip(accelerator, agent.params, max_grad_norm, fsdp)
    # Before the update: a non-finite loss or gradient (the norm is the same on every process after the gradient
    # all-reduce) stops the run here, so no NaN reaches the weights, a checkpoint or the export.
    for quantity in ("loss", "grad_norm"):
        if not math.isfinite(sums[quantity]):
            agent.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(quantity, sums[quantity], agent.name)
    sums["learning_rate"] = agent.optimizer.param_groups[0]["lr"]  # the rate this step used
    agent.optimizer.step()
    # Free the gradients now rather than at this player's next step: kept, they would sit beside the other
    # player's during its steps and through the evaluations, checkpoint and export (one more model's worth).
    agent.optimizer.zero_grad(set_to_none=True)
    if agent.scheduler is not None:
        agent.scheduler.step()
    return sums


# ---------------------------------------------------------------- the session and its fit


@dataclass
class Session:
    """What lives across fits: the accelerator, tokenizer, players with their optimizer states, the frozen reference,
    the loss, and where training stands (optimizer steps done, micro-batches read of the current data).

    `fit` reads data only from its arguments, so a driver (the `train` command, the online rounds) may hand it new
    pairs and a new schedule again and again on the same players.
    """

    cfg: TrainConfig
    accelerator: object
    tokenizer: object
    players: dict[str, Player]
    reference: Player | None
    loss_fn: object
    global_batch: int
    total_steps: int  # of the whole run, for the logging of the last step
    step: int = 0  # optimizer steps done
    position: int = 0  # micro-batches read of the current data stream
    log: object = print
    metrics_file: Path | None = None
    writer: object = None
    bar: object = None
    last_saved: Path | None = None  # the newest checkpoint written, named when a step turns non-finite
    # pairs -> a batch: plain or prefix-shared (chosen on the first batch, see choose_batching)
    collate: object = None

    @property
    def policy(self) -> Player:
        """The protagonist (IOPO) or the policy (baselines): the player that is exported and evaluated."""
        return next(iter(self.players.values()))


def player_names(method: str) -> list[str]:
    return ["protagonist", "adversary"] if method == "iopo" else ["policy"]


def open_accelerator(cfg: TrainConfig):
    """The accelerator of a run (once per process and run), with iopo's DDP settings; DeepSpeed is refused."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    if (
        cfg.distributed.strategy == "fsdp"
        and torch.cuda.is_available()
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
        and not torch.distributed.is_initialized()
    ):
        # FSDP2 with CPU offload reduces CPU tensors (the gradient norm, the gathered export): the group needs a CPU
        # backend beside NCCL. accelerate adds one only for its own FSDP launch, so the group is made here.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend="cuda:nccl,cpu:gloo")
    # Under LoRA IOPO one DDP module holds both adapters and only the agent's gets gradients in a phase.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.model.lora and cfg.method == "iopo")
    # A second run in one process (a notebook, the tests) may ask for another precision: accelerate keeps its
    # settings in a process-wide singleton, so drop them first (the process group, in PartialState, stays).
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True on a machine without accelerators: accelerate then treats torchrun's processes as MULTI_CPU (gloo).
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, kwargs_handlers=[ddp], cpu=not _has_accelerator()
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError(
            "DeepSpeed is not supported: accelerate's integration takes one model and one optimizer, while "
            "iopo keeps a separate optimizer per player; shard with distributed.strategy=fsdp (FSDP2) instead "
            "(see docs/distributed.md)"
        )
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError(
            "an accelerate FSDP launch config would wrap the players its own way: launch with a plain multi-process "
            "config (configs/accelerate/fsdp.yaml, or torchrun) and set distributed.strategy=fsdp in the training "
            "config, which shards each player with FSDP2"
        )
    return accelerator


def open_tokenizer(cfg: TrainConfig, accelerator):
    with accelerator.main_process_first():  # the first call converts the embedded model into the cache
        return load_tokenizer(cfg.model)


def open_session(
    cfg: TrainConfig,
    accelerator,
    tokenizer,
    schedule: list[tuple[str, int]],
    resume_dir: Path | None = None,
) -> Session:
    """Players (from the starting model, or from the checkpoint `resume_dir` with its optimizer, scheduler and RNG
    states, step and data position), each with its own optimizer and a scheduler over its own steps of `schedule`
    (the whole run's)."""
    log = _printer(accelerator)
    names = player_names(cfg.method)
    players, reference = build_players(cfg, accelerator, names, resume_dir)
    global_batch = cfg.optim.batch_size * accelerator.num_processes
    for player in players.values():
        own_steps = sum(agent == player.name for agent, _ in schedule)
        optimizer = _optimizer(player.params, cfg)
        # Under fsdp the optimizer is the plain one over the player's own shards (DCP reads and writes its state).
        player.optimizer = optimizer if sharding.uses_dcp(cfg) else accelerator.prepare_optimizer(optimizer)
        player.scheduler = _scheduler(player.optimizer, cfg, own_steps)
        if own_steps and player.scheduler.get_last_lr()[0] == 0.0:
            log(
                f"[iopo] warning: the {player.name}'s first step runs at learning rate 0 (warm-up over "
                f"{own_steps} steps of its own); set optim.warmup_ratio=0 for short runs"
            )
    session = Session(
        cfg=cfg,
        accelerator=accelerator,
        tokenizer=tokenizer,
        players=players,
        reference=reference,
        loss_fn=functools.partial(LOSSES[cfg.method], **_loss_options(cfg)),
        global_batch=global_batch,
        total_steps=len(schedule),
        log=log,
    )
    if resume_dir is not None:
        state = ckpt.read_state(resume_dir)
        if state["global_batch"] != global_batch:
            raise ConfigError(
                f"checkpoint was written with {state['global_batch']} pairs per micro-batch over all "
                f"processes, now {global_batch}: keep optim.batch_size x processes equal to resume"
            )
        session.step, session.position = state["step"], state["micro_batches"]
        if sharding.uses_dcp(cfg):
            sharding.load(session, resume_dir, state.get("with_optimizer", []))
        for player in players.values():
            if not sharding.uses_dcp(cfg):
                optimizer_file = resume_dir / f"{player.name}.optimizer.pt"
                player.optimizer.load_state_dict(ckpt.load_state_file(optimizer_file))
            player.scheduler.load_state_dict(ckpt.load_state_file(resume_dir / f"{player.name}.scheduler.pt"))
        rng_file = resume_dir / f"rng_state_{accelerator.process_index}.pt"
        if rng_file.is_file():
            ckpt.set_rng_state(ckpt.load_state_file(rng_file))
        session.last_saved = resume_dir
    return session


def fit(
    session: Session, pairs: list[TokenizedPair], schedule: list[tuple[str, int]], on_step=None, **fields
):
    """Run the optimizer steps of `schedule` (one (agent, round) per step) on `pairs`, continuing the session's step
    count and data position. `on_step(session)` runs after every step (checkpoints, evaluation); `fields` are added
    to every logged record (e.g. the online round)."""
    cfg, accelerator = session.cfg, session.accelerator
    micro = cfg.optim.batch_size
    if session.collate is None and schedule:
        choose_batching(session, next_sample(session, pairs))
    for agent_name, round_index in schedule:
        agent = session.players[agent_name]
        env = session.reference if cfg.method != "iopo" else session.players[_other(agent_name)]
        # The adversary="reversed" ablation: the adversary's action prefers y_l over y_w (Sec. 4.1).
        reverse = cfg.method == "iopo" and cfg.iopo.adversary == "reversed" and agent_name == "adversary"
        step_loss = (
            functools.partial(session.loss_fn, reverse_preference=reverse)
            if cfg.method == "iopo"
            else session.loss_fn
        )
        micro_batches = []
        for k in range(cfg.optim.gradient_accumulation_steps):
            indices = micro_batch_indices(session.position + k, session.global_batch, len(pairs), cfg.seed)
            mine = indices[accelerator.process_index * micro : (accelerator.process_index + 1) * micro]
            micro_batches.append(session.collate([pairs[i] for i in mine], session.tokenizer.pad_token_id))
        mark_phase(f"train step {session.step + 1} ({agent_name})")
        tick = time.perf_counter()
        try:
            sums = train_step(
                agent, env, session.players, micro_batches, step_loss, accelerator, cfg.optim.max_grad_norm
            )
        except NonFiniteError as e:
            kept = (
                f"; {session.last_saved} holds the last finite state saved"
                if session.last_saved
                else "; no checkpoint was saved"
            )
            raise NonFiniteError(e.quantity, e.value, e.player, session.step + 1, kept) from None
        sums["step_seconds"] = time.perf_counter() - tick
        session.step += 1
        session.position += len(micro_batches)  # only a finished step moves the data position
        if session.step % cfg.logging_steps == 0 or session.step == session.total_steps:
            record = _reduce(accelerator, sums)
            record.update(
                step=session.step,
                agent=agent_name,
                round=round_index,
                epoch=session.position * session.global_batch / len(pairs),
                **fields,
            )
            log_metrics(session, record)
        if session.bar is not None:
            session.bar.set_postfix(loss=f"{sums['loss']:.4f}", phase=f"{agent_name}@{round_index}")
            session.bar.update(1)
        if on_step is not None:
            on_step(session)


def next_sample(session: Session, pairs: list[TokenizedPair]) -> list[TokenizedPair]:
    """This process's pairs of the next micro-batch."""
    micro, rank = session.cfg.optim.batch_size, session.accelerator.process_index
    indices = micro_batch_indices(session.position, session.global_batch, len(pairs), session.cfg.seed)
    return [pairs[i] for i in indices[rank * micro : (rank + 1) * micro]]


def shared_collate(cfg: TrainConfig):
    """Prefix-shared batches packed into rows of up to 2 x data.max_length tokens."""
    return functools.partial(collate_shared, pack_tokens=2 * cfg.data.max_length)


def choose_batching(session: Session, sample: list[TokenizedPair]) -> None:
    """Set session.collate from cfg.batching: under auto, prefix sharing only when the model allows it and this
    sample's log-probs agree both ways (every process checks its own sample; all must agree)."""
    cfg, accelerator = session.cfg, session.accelerator
    policy = session.policy
    inner = _unwrap(policy.module).model
    obstacle = sharing_obstacle(inner)
    if cfg.batching == "plain":
        session.collate = collate_pairs
        return
    if cfg.batching == "shared":
        if obstacle:
            raise ConfigError(
                f"batching=shared: the model cannot share prompts: {obstacle}; use batching=plain"
            )
        session.collate = shared_collate(cfg)
        return
    gap = math.inf
    if obstacle is None:

        def forward(batch):
            with _autocast(accelerator, policy.module):
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                return player_logps(policy, batch, session.players, False)

        pad = session.tokenizer.pad_token_id
        gap, obstacle = layouts_gap(forward, sample, pad, 2 * cfg.data.max_length)
    gap = max(row[0] for row in _gathered(accelerator, [gap]))
    tolerance = shared_tolerance(cfg.mixed_precision != "no")
    if gap <= tolerance:
        session.collate = shared_collate(cfg)
        session.log(
            f"[iopo] batching: prefix sharing + packing (first batch agrees with the plain forward: {gap:.1e})"
        )
    else:
        why = obstacle or f"the first batch's log-probs differ from the plain forward's by {gap:.1e}"
        session.collate = collate_pairs
        session.log(f"[iopo] batching: plain, because {why}")


def save_session(session: Session, tmp: Path | None = None, final: Path | None = None) -> Path:
    """Both players (full weights or adapters), optimizer/scheduler/RNG states and the data position, written
    atomically: into `tmp`, renamed to `final` (default: checkpoints/step-N of the run, pruned to save_total_limit)."""
    cfg, accelerator = session.cfg, session.accelerator
    mark_phase("checkpoint")
    accelerator.wait_for_everyone()
    keep = None
    if final is None:
        keep = cfg.save_total_limit
        tmp, final = (
            ckpt.begin_write(cfg.run_dir, session.step) if accelerator.is_main_process else (None, None)
        )
    elif accelerator.is_main_process:
        ckpt.begin_folder(tmp)
    names = [str(tmp) if tmp else None, str(final) if final else None]
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(names, src=0)
    tmp, final = Path(names[0]), Path(names[1])
    dcp = sharding.uses_dcp(cfg)
    with_optimizer = sharding.save(session, tmp) if dcp else None  # every process writes its shards
    if accelerator.is_main_process:
        for player in session.players.values():
            if not dcp:
                inner = _unwrap(player.module).model
                if player.adapter is None:
                    inner.save_pretrained(tmp / player.name, safe_serialization=True)
                else:
                    inner.save_pretrained(tmp, selected_adapters=[player.adapter])  # -> tmp/<adapter>/
                torch.save(player.optimizer.state_dict(), tmp / f"{player.name}.optimizer.pt")
            torch.save(player.scheduler.state_dict(), tmp / f"{player.name}.scheduler.pt")
        state = {
            "step": session.step,
            "micro_batches": session.position,
            "total_steps": session.total_steps,
            "global_batch": session.global_batch,
        }
        if dcp:
            state.update(format="dcp", processes=accelerator.num_processes, with_optimizer=with_optimizer)
        ckpt.write_common(tmp, cfg, state)
    torch.save(ckpt.rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.finish_write(tmp, final, keep)
    accelerator.wait_for_everyone()
    session.last_saved = final
    return final


def session_logps(session: Session, pairs: list[TokenizedPair], progress: str | None = None) -> dict:
    """The policy's chosen/rejected log-probs of `pairs` (no autograd, eval mode)."""
    return _test_logps(
        session.policy,
        session.players,
        pairs,
        session.cfg,
        session.tokenizer,
        session.accelerator,
        progress,
        session.collate or collate_pairs,
    )


def log_metrics(session: Session, record: dict) -> None:
    _log_metrics(session.accelerator, record, session.metrics_file, session.writer)


def export_policy(session: Session, out: Path) -> Path:
    """The protagonist/policy as a from_pretrained folder `out` (inside a run folder), listed in the run's marker so
    a later fresh start deletes only these files."""
    mark_phase("export")
    written = _export(session.cfg, session.accelerator, session.policy, session.tokenizer, out)
    if session.accelerator.is_main_process:
        runfolder.record_export(out.parent, out)
    return written


# ---------------------------------------------------------------- the train command


def train(cfg: TrainConfig) -> dict:
    """Train with cfg.method, checkpoint, export the protagonist/policy and evaluate it. Returns eval results."""
    from accelerate.utils import set_seed

    mark_phase("load")
    accelerator = open_accelerator(cfg)
    log = _printer(accelerator)
    set_seed(cfg.seed)
    run_dir = cfg.run_dir
    resume_dir = _on_main(accelerator, lambda: ckpt.resolve_resume(cfg))
    resume_state = ckpt.read_state(resume_dir) if resume_dir is not None else None
    if resume_dir is not None:
        saved = yaml.safe_load((resume_dir / "config.yaml").read_text(encoding="utf-8"))
        ckpt.check_resume_config(saved, cfg, sharded=resume_state.get("format") == "dcp")
    if accelerator.is_main_process:
        ckpt.prepare_run_dir(run_dir, resume_state["step"] if resume_state else None)
        (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    accelerator.wait_for_everyone()
    started = time.time()

    # --- data, schedule, session
    tokenizer = open_tokenizer(cfg, accelerator)
    train_pairs, test_pairs, report = load_training_data(
        cfg.data, tokenizer, run_dir if accelerator.is_main_process else None
    )
    log(f"[iopo] data: {json.dumps(report)}")
    if not train_pairs:
        raise ConfigError("no training pairs left after loading; check data.path and the rejects file")
    global_batch = cfg.optim.batch_size * accelerator.num_processes
    schedule = build_schedule(cfg, len(train_pairs), global_batch)
    if (
        cfg.method == "iopo"
        and cfg.iopo.n_iter
        and cfg.optim.max_steps
        and cfg.optim.max_steps != len(schedule)
    ):
        log(
            f"[iopo] iopo.n_iter={cfg.iopo.n_iter} sets the schedule ({len(schedule)} steps = n_iter x (n_mu + n_nu)); "
            f"optim.max_steps={cfg.optim.max_steps} is not used (unset n_iter to let max_steps decide)"
        )
    session = open_session(cfg, accelerator, tokenizer, schedule, resume_dir)
    policy = session.policy
    log(
        f"[iopo] method={cfg.method} players={list(session.players)} lora={cfg.model.lora} steps={len(schedule)} "
        f"global_batch={global_batch}x{cfg.optim.gradient_accumulation_steps} processes={accelerator.num_processes} "
        f"distributed={accelerator.distributed_type.value} "
        f"trainable/player={sum(p.numel() for p in policy.params):,}"
    )
    if sharding.sharded(cfg, accelerator):
        log(f"[iopo] fsdp: {shard_report(session)}")
    # The batching is chosen before the test split's reference log-probs, so they and the steps use the same.
    if session.step < len(schedule):
        choose_batching(session, next_sample(session, train_pairs))
    if resume_dir is not None:
        log(f"[iopo] resumed from {resume_dir} at step {session.step}/{len(schedule)}")

    # --- reference log-probs of the test split, from the starting model, once (so no third copy is kept)
    ref_file = run_dir / "eval_reference_logps.pt"
    eval_ref = None
    if (cfg.eval_at_end or cfg.eval_steps) and test_pairs:
        if ref_file.is_file():
            eval_ref = torch.load(ref_file, weights_only=True)
        if eval_ref is None or eval_ref["chosen_logps"].numel() != len(test_pairs):
            if session.step > 0:
                raise ConfigError(
                    f"{ref_file} is missing or stale; cannot recover the starting model's log-probs"
                )
            mark_phase("reference log-probs")
            eval_ref = refcache.reference_logps(
                session, test_pairs, lambda: session_logps(session, test_pairs), log
            )
            if accelerator.is_main_process:
                torch.save(eval_ref, ref_file)

    session.writer = _tensorboard(cfg, run_dir, accelerator)
    session.metrics_file = run_dir / "metrics.jsonl"
    session.bar = _progress(cfg, accelerator, len(schedule), session.step)

    def test_metrics(label: str | None) -> dict:
        """Margin reward and pairwise accuracy of the protagonist/policy vs the starting model on the test split."""
        mark_phase(f"eval at step {session.step}")
        return policy_metrics(session, test_pairs, eval_ref, label)

    def between_steps(s: Session) -> None:
        if cfg.save_steps and s.step % cfg.save_steps == 0 and s.step < len(schedule):
            save_session(s)
        if (
            eval_ref is not None
            and cfg.eval_steps
            and s.step % cfg.eval_steps == 0
            and s.step < len(schedule)
        ):
            log_eval(s, s.step, test_metrics(None))

    # --- the optimizer-step loop
    try:
        fit(session, train_pairs, schedule[session.step :], between_steps)
    except KeyboardInterrupt:
        if accelerator.num_processes == 1 and session.step > 0:
            log(f"\n[iopo] interrupted: saving step {session.step} so resume=true continues from it")
            save_session(session)
        raise
    if session.bar is not None:
        session.bar.close()
    if not (
        resume_state and resume_state["step"] == session.step
    ):  # else that checkpoint is this state already
        save_session(session)

    # --- export and evaluation
    if cfg.export:
        export_dir = export_policy(session, run_dir / "final")
        log(f"[iopo] exported {policy.name} to {export_dir}")
    results: dict = {}
    if eval_ref is not None and (cfg.eval_at_end or cfg.eval_steps):
        results = test_metrics(f"eval {policy.name}" if cfg.progress_bar else None)
        log_eval(session, session.step, results)
    if session.writer is not None:
        session.writer.close()
    if results and cfg.eval_at_end:
        results.update(method=cfg.method, player=policy.name, reference="starting model", step=session.step)
        if accelerator.is_main_process:
            text = json.dumps(json_safe(results), indent=2, allow_nan=False)  # strict JSON
            (run_dir / "eval.json").write_text(text, encoding="utf-8")
        title = f"{cfg.method}: {policy.name} vs the starting model on {len(test_pairs)} test pairs"
        log(format_table(results, title))
    mark_phase("done")
    log(f"[iopo] peak RSS per process (GB): {', '.join(f'{x:.2f}' for x in _peak_rss(accelerator))}")
    log(f"[iopo] done in {time.time() - started:.0f}s; run folder: {run_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def policy_metrics(session: Session, test_pairs, ref_logps: dict, label: str | None = None) -> dict:
    """Margin reward and pairwise accuracy of the policy vs the reference log-probs `ref_logps` of `test_pairs`."""
    policy = session_logps(session, test_pairs, label)
    return offline_metrics(
        policy["chosen_logps"],
        policy["rejected_logps"],
        ref_logps["chosen_logps"],
        ref_logps["rejected_logps"],
        session.cfg.loss.beta,
    )


def log_eval(session: Session, at_step: int, metrics: dict, **fields) -> None:
    keys = ("margin_reward", "pairwise_accuracy", "reward_chosen", "reward_rejected", "margin_reward_std")
    record = {"step": at_step, **{f"eval/{k}": metrics[k] for k in keys}, **fields}
    log_metrics(session, record)


# ---------------------------------------------------------------- helpers of the loop


def _has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu and xpu.is_available()) or torch.backends.mps.is_available()


def _other(agent_name: str) -> str:
    return "adversary" if agent_name == "protagonist" else "protagonist"


def _on_main(accelerator, decide):
    """`decide()` on the main process only, its result (a path or None) or its ConfigError given to every process.

    Deciding whether a run folder may be used must not race with the main process already writing into it."""
    if accelerator.num_processes == 1:
        return decide()
    answer: list = [None, None, False]
    failure = None
    if accelerator.is_main_process:
        try:
            found = decide()
            answer = [None if found is None else str(found), None, False]
        except Exception as e:  # every process must leave the broadcast, whatever went wrong
            failure = e
            answer = [None, str(e), isinstance(e, ConfigError)]
    torch.distributed.broadcast_object_list(answer, src=0)
    if failure is not None:
        raise failure
    if answer[1] is not None:
        raise ConfigError(answer[1]) if answer[2] else RuntimeError(f"the main process failed: {answer[1]}")
    return None if answer[0] is None else Path(answer[0])


def _gathered(accelerator, values: list[float]) -> list[list[float]]:
    """Every process's `values`, process by process (a collective)."""
    local = torch.tensor(values, dtype=torch.float64, device=accelerator.device)[None]
    table = accelerator.gather(local) if accelerator.num_processes > 1 else local
    return table.cpu().tolist()


def shard_report(session: Session) -> str:
    """How many of each player's parameters every process holds (a collective), e.g. 'protagonist 82,208 +
    82,208 of 164,416'."""
    players = list(session.players.values())
    table = _gathered(session.accelerator, [sharding.local_numel(p.params) for p in players])
    return "; ".join(
        f"{p.name} {' + '.join(f'{int(row[i]):,}' for row in table)} of {sharding.full_numel(p.params):,} "
        "parameters per process"
        for i, p in enumerate(players)
    )


def _peak_rss(accelerator) -> list[float]:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
    return [row[0] for row in _gathered(accelerator, [peak])]


# A file path: with it set, every phase mark of the run is appended to that file as one JSON line.
MEMORY_TRACE = "IOPO_MEMORY_TRACE"


def mark_phase(phase: str) -> None:
    """With IOPO_MEMORY_TRACE=<file> set, append {"t", "pid", "phase", "rss_gb", "hwm_gb"} to that file: the
    phase starting now, with this process's resident set and its high-water mark so far (benchmarks/
    memory_timeline.py lines its RSS samples up with these). Without the variable: one dictionary lookup."""
    path = os.environ.get(MEMORY_TRACE)
    if not path:
        return
    record = {"t": time.time(), "pid": os.getpid(), "phase": phase}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            record[f"{key[2:].lower()}_gb"] = int(value.split()[0]) * 1024 / 1e9  # the kernel counts in KiB
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _is_fsdp(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _autocast(accelerator, module):
    """accelerate's autocast, except for a sharded player: FSDP2's mixed-precision policy casts its weights."""
    return nullcontext() if _is_fsdp(module) else accelerator.autocast()


def _clip(accelerator, params, max_norm: float | None, fsdp: bool = False) -> float:
    if fsdp:  # the norm over all shards (a replicated DTensor); an infinite limit only measures it
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf))
    if max_norm:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _combine(key: str, acc: float | None, value: float, n_micro: int) -> float:
    """Fold one micro-batch's metric into the step's: min/max stay extremes, the rest average."""
    if key.endswith("_min"):
        return value if acc is None else min(acc, value)
    if key.endswith("_max"):
        return value if acc is None else max(acc, value)
    return (acc or 0.0) + value / n_micro


def _reduce(accelerator, sums: dict[str, float]) -> dict[str, float]:
    """Combine the step's metrics over processes (mean, or min/max for the extremes)."""
    if accelerator.num_processes == 1:
        return dict(sums)
    keys = sorted(sums)
    table = torch.tensor(_gathered(accelerator, [sums[k] for k in keys]), dtype=torch.float64)  # (world, K)
    out = {}
    for i, key in enumerate(keys):
        column = table[:, i]
        out[key] = float(
            column.min() if key.endswith("_min") else column.max() if key.endswith("_max") else column.mean()
        )
    return out


def _log_metrics(accelerator, record: dict, path: Path | None, writer) -> None:
    if not accelerator.is_main_process or path is None:
        return
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                writer.add_scalar(key if key.startswith("eval/") else f"train/{key}", value, record["step"])
        if "agent" in record:
            writer.add_scalar(
                "train/agent_is_adversary", float(record["agent"] == "adversary"), record["step"]
            )


def _tensorboard(cfg: TrainConfig, run_dir: Path, accelerator):
    if not (cfg.tensorboard and accelerator.is_main_process):
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _progress(cfg: TrainConfig, accelerator, total: int, done: int):
    if not (cfg.progress_bar and accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=f"{cfg.method}", unit="step", dynamic_ncols=True)


def _printer(accelerator):
    def log(message: str) -> None:
        if accelerator.is_main_process:
            print(message, flush=True)

    return log


def _test_logps(
    player,
    players,
    pairs: list[TokenizedPair],
    cfg,
    tokenizer,
    accelerator,
    progress: str | None = None,
    collate=collate_pairs,
) -> dict:
    def forward(batch):
        with _autocast(accelerator, player.module):
            return player_logps(player, batch, players, grad=False)

    return dataset_logps(
        forward, pairs, cfg.eval_batch_size, tokenizer.pad_token_id, accelerator, progress, collate
    )


def _export(cfg, accelerator, player: Player, tokenizer, out: Path) -> Path:
    """The protagonist/policy as a standard HF folder that AutoModelForCausalLM.from_pretrained loads."""
    accelerator.wait_for_everyone()
    full = None
    if _is_fsdp(player.module):  # every process takes part in gathering the whole weights onto process 0
        full = sharding.full_state_dict(player.module)
    if accelerator.is_main_process:
        inner = _unwrap(player.module).model
        if full is not None and player.adapter is not None:
            # An unsharded copy of the LoRA model (base + adapters) to merge from, built on process 0 only.
            inner = add_lora_adapters(load_model(cfg.model), cfg.model, player_names(cfg.method))
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
