"""A training session: the accelerator, the tokenizer, the METHODS row, its players with their optimizer states,
the frozen reference, the per-agent losses, and where training stands; the schedule of optimizer steps and the
seeded order in which pairs are read.

`fit` (iopo.engine.fit) reads data only from its arguments, so a driver (the `train` command, the online rounds)
may hand it new pairs and a new schedule again and again on the same players.
"""

from __future__ import annotations

import functools
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from iopo.config import MAX_STEPS, ConfigError, TrainConfig
from iopo.core import losses
from iopo.core.methods import METHODS, Method, game_schedule
from iopo.data.loading import tokenized_data
from iopo.data.tokenize import TokenizedPair
from iopo.engine import sharding
from iopo.engine.players import Blend, Player, build_players
from iopo.io import checkpoint, runfolder
from iopo.io.log import get_logger, set_main_process
from iopo.io.models import check_model, load_tokenizer

log = get_logger(__name__)


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
    method: Method  # the METHODS row of cfg.method
    players: dict[str, Player]
    reference: Player | None
    previous: Player | None  # online rounds of a "previous"/"mixed" env: the policy as the round began
    loss_fns: dict[str, object]  # per agent: the row's loss with its options for that agent
    global_batch: int
    total_steps: int  # of the whole run, for the logging of the last step
    step: int = 0  # optimizer steps done
    position: int = 0  # micro-batches read of the current data stream
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

    def env_of(self, agent: str) -> Player | Blend | None:
        """What the agent's loss measures it against, as its METHODS row says: the other player of a game, the
        frozen reference, the previous policy of an online round, a blend of the two (INPO), or nothing. Offline
        (no previous policy) the previous policy is the starting model, and so is the blend."""
        env = self.method.env
        if env == "other":
            return self.players[self.method.other(agent)]
        if env == "none":
            return None
        if self.previous is None or env == "reference":
            return self.reference
        if env == "previous":
            return self.previous
        weight = self.method.mix(self.cfg)
        return Blend(((weight, self.reference), (1.0 - weight, self.previous)))


def has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu and xpu.is_available()) or torch.backends.mps.is_available()


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
    # Under LoRA a game's one DDP module holds both adapters and only the agent's gets gradients in a phase.
    ddp = DistributedDataParallelKwargs(
        find_unused_parameters=cfg.model.lora and len(METHODS[cfg.method].players) > 1
    )
    # A second run in one process (a notebook, the tests) may ask for another precision: accelerate keeps its
    # settings in a process-wide singleton, so drop them first (the process group, in PartialState, stays).
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True on a machine without accelerators: accelerate then treats torchrun's processes as MULTI_CPU (gloo).
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, kwargs_handlers=[ddp], cpu=not has_accelerator()
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
    set_main_process(accelerator.is_main_process)
    return accelerator


def plain_accelerator(mixed_precision: str):
    """An accelerator with accelerate's defaults (one model, one optimizer: the reward model's training)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not has_accelerator())
    set_main_process(accelerator.is_main_process)
    return accelerator


def load_inputs(cfg, accelerator) -> tuple:
    """Every input of a training run, checked before its folder is made or touched: the model (its configuration
    loads), then the data, tokenized. Returns (tokenizer, train pairs, test pairs, rejects, data report)."""
    check_model(cfg.model)
    tokenizer = open_tokenizer(cfg, accelerator)
    train_pairs, test_pairs, rejects, report = tokenized_data(cfg.data, tokenizer)
    if not train_pairs:
        raise ConfigError("no training pairs left after loading; check data.path and the rejects file")
    return tokenizer, train_pairs, test_pairs, rejects, report


def open_tokenizer(cfg: TrainConfig, accelerator):
    with accelerator.main_process_first():  # the first call converts the embedded model into the cache
        return load_tokenizer(cfg.model)


def make_optimizer(params, cfg, fused: bool = False):
    """AdamW over `params` with the run's optim settings (each player has its own). `fused`: torch's fused kernel
    (one pass over each parameter, on CPU and CUDA; 6.4x less time in the step than the per-tensor loop here,
    benchmarks/optimizer_step.py), the same update up to float rounding; not for sharded (DTensor) parameters."""
    o = cfg.optim
    return torch.optim.AdamW(
        params,
        lr=o.learning_rate,
        betas=(o.adam_beta1, o.adam_beta2),
        eps=o.adam_epsilon,
        weight_decay=o.weight_decay,
        fused=fused or None,
    )


def make_scheduler(optimizer, cfg, n_steps: int):
    """The learning-rate schedule over a player's own `n_steps` optimizer steps."""
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
        cfg.optim.lr_scheduler
    ]
    warmup = math.ceil(cfg.optim.warmup_ratio * n_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(n_steps, 1))


def agent_loss(cfg: TrainConfig, agent: str):
    """The loss of cfg.method's METHODS row for one agent: its function of iopo.core.losses with its options."""
    method = METHODS[cfg.method]
    return functools.partial(getattr(losses, method.loss), **method.options(cfg, agent))


def open_session(
    cfg: TrainConfig,
    accelerator,
    tokenizer,
    schedule: list[tuple[str, int]],
    resume_dir: Path | None = None,
    rounds: bool = False,
) -> Session:
    """Players (from the starting model, or from the checkpoint `resume_dir` with its optimizer, scheduler and RNG
    states, step and data position), each with its own optimizer and a scheduler over its own steps of `schedule`
    (the whole run's). `rounds`: an online run, whose training each round may measure the policy against the
    policy as the round began (the METHODS row's env)."""
    method = METHODS[cfg.method]
    players, reference, previous = build_players(cfg, method, accelerator, resume_dir, rounds)
    global_batch = cfg.optim.batch_size * accelerator.num_processes
    for player in players.values():
        own_steps = sum(agent == player.name for agent, _ in schedule)
        optimizer = make_optimizer(player.params, cfg, fused=not sharding.sharded(cfg, accelerator))
        # Under fsdp the optimizer is the plain one over the player's own shards (DCP reads and writes its state).
        player.optimizer = optimizer if checkpoint.uses_dcp(cfg) else accelerator.prepare_optimizer(optimizer)
        player.scheduler = make_scheduler(player.optimizer, cfg, own_steps)
        if own_steps and player.scheduler.get_last_lr()[0] == 0.0:
            log.warning(
                f"the {player.name}'s first step runs at learning rate 0 (warm-up over "
                f"{own_steps} steps of its own); set optim.warmup_ratio=0 for short runs"
            )
    session = Session(
        cfg=cfg,
        accelerator=accelerator,
        tokenizer=tokenizer,
        method=method,
        players=players,
        reference=reference,
        previous=previous,
        loss_fns={name: agent_loss(cfg, name) for name in players},
        global_batch=global_batch,
        total_steps=len(schedule),
    )
    if resume_dir is not None:
        checkpoint.load_session(session, resume_dir)
    return session


def describe(session: Session, schedule: list[tuple[str, int]]) -> None:
    """Say what is about to be trained: the method, players, steps, batch and processes (and the shards)."""
    cfg, accelerator, method = session.cfg, session.accelerator, session.method
    rounds = method.game_rounds(cfg) if method.is_game else None
    if rounds and cfg.optim.max_steps and cfg.optim.max_steps != len(schedule):
        log.info(
            f"iopo.n_iter={rounds} sets the schedule ({len(schedule)} steps = n_iter x (n_mu + n_nu)); "
            f"optim.max_steps={cfg.optim.max_steps} is not used (unset n_iter to let max_steps decide)"
        )
    log.info(
        f"method={cfg.method} players={list(session.players)} lora={cfg.model.lora} steps={len(schedule)} "
        f"global_batch={session.global_batch}x{cfg.optim.gradient_accumulation_steps} "
        f"processes={accelerator.num_processes} distributed={accelerator.distributed_type.value} "
        f"trainable/player={sum(p.numel() for p in session.policy.params):,}"
    )
    if sharding.sharded(cfg, accelerator):
        log.info(f"fsdp: {shard_report(session)}")


# ---------------------------------------------------------------- the schedule and the order of the pairs


def optimizer_steps(optim, n_train: int, global_batch: int) -> int:
    """optim.max_steps, else the steps that num_epochs over n_train pairs take (at least one)."""
    steps_per_epoch = max(1, math.ceil(n_train / (global_batch * optim.gradient_accumulation_steps)))
    return optim.max_steps or max(1, math.ceil(optim.num_epochs * steps_per_epoch))


def build_schedule(cfg: TrainConfig, n_train: int, global_batch: int) -> list[tuple[str, int]]:
    """The agent of every optimizer step: max_steps / num_epochs steps of the policy, or whole game rounds of a
    game (its configured rounds, else enough to cover the steps)."""
    method = METHODS[cfg.method]
    wanted = optimizer_steps(cfg.optim, n_train, global_batch)
    total = wanted
    if method.is_game:
        agents = method.game_round(cfg)
        n_rounds = method.game_rounds(cfg) or max(1, math.ceil(wanted / len(agents)))
        total = n_rounds * len(agents)
    if total > MAX_STEPS:  # refused before a list of that many steps is built
        raise ConfigError(
            f"the settings ask for {total:,} optimizer steps (optim.num_epochs={cfg.optim.num_epochs:g} over "
            f"{n_train} pairs, optim.max_steps, iopo.n_iter x (n_mu + n_nu)); at most {MAX_STEPS:,}"
        )
    if not method.is_game:
        return [(method.players[0], 0)] * wanted
    return game_schedule(agents, n_rounds)


def round_schedule(cfg: TrainConfig, steps: int, k: int) -> list[tuple[str, int]]:
    """The `steps` optimizer steps of online round k (from 1): whole game rounds of a game (numbered on from the
    earlier rounds'), else the policy's steps, all of round k - 1."""
    method = METHODS[cfg.method]
    if not method.is_game:
        return [(method.players[0], k - 1)] * steps
    agents = method.game_round(cfg)
    games = steps // len(agents)
    return game_schedule(agents, games, first_round=(k - 1) * games)


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


def next_sample(session: Session, pairs: list[TokenizedPair]) -> list[TokenizedPair]:
    """This process's pairs of the next micro-batch."""
    micro, rank = session.cfg.optim.batch_size, session.accelerator.process_index
    indices = micro_batch_indices(session.position, session.global_batch, len(pairs), session.cfg.seed)
    return [pairs[i] for i in indices[rank * micro : (rank + 1) * micro]]


# ---------------------------------------------------------------- across processes


def on_main(accelerator, decide):
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


@contextmanager
def holding(accelerator, run_dir: Path, command: str):
    """The run folder locked for this run (iopo.io.runfolder.hold) by the main process, its refusal said on every
    process; released when the block ends."""
    held = []
    on_main(accelerator, lambda: held.append(runfolder.hold(run_dir, command)))
    try:
        yield
    finally:
        for lock in held:
            lock.release()


def gathered(accelerator, values: list[float]) -> list[list[float]]:
    """Every process's `values`, process by process (a collective)."""
    local = torch.tensor(values, dtype=torch.float64, device=accelerator.device)[None]
    table = accelerator.gather(local) if accelerator.num_processes > 1 else local
    return table.cpu().tolist()


def shard_report(session: Session) -> str:
    """How many of each player's parameters every process holds (a collective), e.g. 'protagonist 82,208 +
    82,208 of 164,416'."""
    players = list(session.players.values())
    table = gathered(session.accelerator, [sharding.local_numel(p.params) for p in players])
    return "; ".join(
        f"{p.name} {' + '.join(f'{int(row[i]):,}' for row in table)} of {sharding.full_numel(p.params):,} "
        "parameters per process"
        for i, p in enumerate(players)
    )


def peak_rss(accelerator) -> list[float]:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
    return [row[0] for row in gathered(accelerator, [peak])]
