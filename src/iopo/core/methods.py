"""The methods as tables: an offline method is one row of METHODS, an online method one row of ONLINE_METHODS.

An offline row names its players (one policy, or IOPO's protagonist and adversary), what a trained player's loss
measures it against (`env`: the other player, a frozen copy of the starting model, or nothing), its loss (a
function of `iopo.core.losses`, by name), the loss's options read from the config for a given agent, how a step
reduces the per-pair losses (a mean over pairs, or over the chosen completions' tokens), and, for a game, the
agents of one game round (Alg. 1) and the number of game rounds the config asks for.

An online row names the offline method its train stage runs, its stages in order (functions of
`iopo.online.stages`, by name) and whether a judge labels its pairs.

Adding an offline loss: its function in core/losses.py and a row here (then tests and docs/algorithm.md). Adding an
online method: a row here and its stage functions. The config takes its `method` choices from these keys. Nothing
here imports torch (the config, which every command loads, imports this table).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

POLICY = ("policy",)
GAME_PLAYERS = ("protagonist", "adversary")

# ---------------------------------------------------------------- each loss's options, read from the config


def _no_options(cfg: Any, agent: str) -> dict:
    return {}


def _beta(cfg: Any, agent: str) -> dict:
    return {"beta": cfg.loss.beta}


def _dpo_options(cfg: Any, agent: str) -> dict:
    return {"beta": cfg.loss.beta, "label_smoothing": cfg.loss.label_smoothing}


def _ipo_options(cfg: Any, agent: str) -> dict:
    return {"beta": cfg.loss.beta, "average": cfg.loss.ipo_average}


def _iopo_options(cfg: Any, agent: str) -> dict:
    """Eq. 14/15 with Eq. 11/12's switches; adversary="reversed" reverses the adversary's preference (Sec. 4.1)."""
    game = cfg.iopo
    return {
        "beta": cfg.loss.beta,
        "epsilon": game.epsilon,
        "is_clip": game.is_clip,
        "is_logp": game.is_logp,
        "reverse_preference": game.adversary == "reversed" and agent == "adversary",
    }


def _inpo_options(cfg: Any, agent: str) -> dict:
    return {"eta": cfg.inpo.eta, "beta": cfg.loss.beta}


def _inpo_mix(cfg: Any) -> float:
    """INPO's reference: tau/eta of the starting model, the rest the round's previous policy."""
    return cfg.inpo.tau / cfg.inpo.eta


def _spin_options(cfg: Any, agent: str) -> dict:
    return {"beta": cfg.loss.beta, "form": cfg.spin.loss}


def _xpo_options(cfg: Any, agent: str) -> dict:
    return {"beta": cfg.loss.beta, "alpha": cfg.xpo.alpha}


def iopo_game_round(cfg: Any) -> list[str]:
    """Alg. 1: the agents of one game round, n_mu protagonist steps then n_nu adversary steps."""
    return ["protagonist"] * cfg.iopo.n_mu + ["adversary"] * cfg.iopo.n_nu


def _iopo_game_rounds(cfg: Any) -> int | None:
    """Alg. 1's N_iter when set (else the optimizer steps decide)."""
    return cfg.iopo.n_iter


# ---------------------------------------------------------------- offline methods


@dataclass(frozen=True)
class Method:
    """One offline method: see the module docstring."""

    loss: (
        str  # a function of iopo.core.losses: (policy/agent logps, reference/env logps, lengths) -> per pair
    )
    options: Callable[[Any, str], dict] = _no_options  # (config, agent) -> the loss's keyword options
    # What the loss measures the agent against: the frozen starting model ("reference"), the other player of a
    # game ("other"), nothing ("none"), the policy as the online round began ("previous"; offline, with no rounds,
    # the starting model), or a blend of the starting model (weight `mix(cfg)`) and the round's previous policy
    # (the rest) whose log-probs are the weighted sum of theirs ("mixed"; offline: the starting model).
    env: Literal["reference", "other", "none", "previous", "mixed"] = "reference"
    players: tuple[str, ...] = POLICY
    reduce: Literal["pairs", "chosen_tokens"] = "pairs"
    game_round: Callable[[Any], list[str]] | None = None  # a game: the agents of one round, in order
    game_rounds: Callable[[Any], int | None] | None = (
        None  # a game: the rounds the config sets (None: the steps)
    )
    mix: Callable[[Any], float] | None = None  # env "mixed": the starting model's weight
    # per-pair numbers the loss takes as keyword tensors when the batch carries them (an online round's pairs)
    pair_values: tuple[str, ...] = ()
    offline: bool = True  # `iopo train` runs it on a pair file (else only `iopo online` makes its pairs)

    @property
    def is_game(self) -> bool:
        return self.game_round is not None

    def other(self, agent: str) -> str:
        """The other player of a two-player game."""
        first, second = self.players
        return second if agent == first else first


METHODS: dict[str, Method] = {
    "iopo": Method(
        "iopo_loss",
        _iopo_options,
        env="other",
        players=GAME_PLAYERS,
        game_round=iopo_game_round,
        game_rounds=_iopo_game_rounds,
    ),
    "dpo": Method("dpo_loss", _dpo_options),
    "ipo": Method("ipo_loss", _ipo_options),
    "hinge": Method("hinge_loss", _beta),
    "kto_pair": Method("kto_pair_loss", _beta),
    "sft": Method("sft_loss", env="none", reduce="chosen_tokens"),
    # the game-theoretic relatives: against the policy the round began with (offline: the starting model)
    "sppo": Method("sppo_loss", _beta, env="previous", pair_values=("chosen_win", "rejected_win")),
    "inpo": Method("inpo_loss", _inpo_options, env="mixed", mix=_inpo_mix),
    "spin": Method("spin_loss", _spin_options, env="previous", offline=False),
    "xpo": Method("xpo_loss", _xpo_options, pair_values=("reference_side",), offline=False),
}


# ---------------------------------------------------------------- online methods


@dataclass(frozen=True)
class OnlineMethod:
    """One online method: see the module docstring."""

    trains: str  # the METHODS row its train stage runs
    stages: tuple[str, ...]  # one round's stages in order (names of iopo.online.stages.STAGES)
    judged: bool = False  # a judge labels its pairs (it needs a judge and two answers or more per prompt)
    reference_answer: bool = False  # beside the policy's answer, one from the starting model per prompt (XPO)

    @property
    def own_pairs(self) -> bool:
        """Its train stage reads the round's pairs.jsonl (else the human pairs, the stream going on)."""
        return any(stage in PAIR_STAGES for stage in self.stages)


PAIR_STAGES = (
    "pairs",
    "win_rates",
    "self_pairs",
    "explore_pairs",
)  # the stages that write a round's pairs.jsonl
JUDGED = ("prompts", "generate", "judge", "pairs", "train", "score")

ONLINE_METHODS: dict[str, OnlineMethod] = {
    "iter_dpo": OnlineMethod("dpo", JUDGED, judged=True),
    "iopo": OnlineMethod("iopo", ("train", "score")),
    "dpo": OnlineMethod("dpo", ("train", "score")),
    "sppo": OnlineMethod(
        "sppo", ("prompts", "generate", "judge", "win_rates", "train", "score"), judged=True
    ),
    "inpo": OnlineMethod("inpo", JUDGED, judged=True),
    "spin": OnlineMethod("spin", ("prompts", "generate", "self_pairs", "train", "score")),
    "xpo": OnlineMethod(
        "xpo",
        ("prompts", "generate", "reference_answers", "judge", "explore_pairs", "train", "score"),
        judged=True,
        reference_answer=True,
    ),
}


# ---------------------------------------------------------------- schedules (one (agent, round) per optimizer step)


def game_schedule(agents: list[str], n_rounds: int, first_round: int = 0) -> list[tuple[str, int]]:
    """Alg. 1: `n_rounds` game rounds of `agents` (one round's agents in order), rounds numbered from first_round."""
    return [(agent, first_round + i) for i in range(n_rounds) for agent in agents]


def iopo_schedule(n_iter: int, n_mu: int, n_nu: int) -> list[tuple[str, int]]:
    """Alg. 1: for each of n_iter rounds, n_mu protagonist steps then n_nu adversary steps.

    Returns one (agent name, round index) per optimizer step.
    """
    return game_schedule(["protagonist"] * n_mu + ["adversary"] * n_nu, n_iter)
