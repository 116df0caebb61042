"""The settings of `iopo online`: rounds of prompts, generation, judging and training, resumable stage by stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from iopo.config.base import MAX_STEPS, check_output_dir
from iopo.config.evaluation import GenerationConfig, JudgeConfig
from iopo.config.train import DataConfig, TrainConfig, TrainingParts
from iopo.core.methods import METHODS, ONLINE_METHODS

OnlineMethodName = Literal[tuple(ONLINE_METHODS)]  # type: ignore[valid-type]


class OnlineGenerationConfig(GenerationConfig):
    """Generation in the online rounds: two answers per prompt at the paper's temperature 0.8."""

    n: int = Field(
        2, gt=0, le=64, description="Answers per prompt (iter_dpo needs at least 2 to make a pair)."
    )
    max_new_tokens: int = Field(128, gt=0, le=32768)
    engine: Literal["hf", "vllm"] = Field(
        "hf",
        description="hf: transformers generate on the live policy; vllm: vLLM in this process, the policy's weights "
        "pushed into it after each train stage (GPU, full fine-tuning; untested here).",
    )
    vllm_gpu_memory_utilization: float = Field(
        0.3, gt=0, lt=1, description="vllm: the GPU share vLLM may take (the players need the rest)."
    )


class OnlineConfig(TrainingParts):
    """`iopo online`: K rounds of {prompts -> generate -> judge -> pairs -> train -> score} (iter_dpo, the paper's
    costly baseline), or the same rounds and optimizer steps on the human pairs only (iopo: the game goes on with no
    judge; dpo: the offline control). Every stage leaves its files under round_k/ and the same command resumes."""

    method: OnlineMethodName = "iter_dpo"
    rounds: int = Field(3, gt=0, le=10000, description="Online rounds K.")
    steps_per_round: int = Field(
        8,
        gt=0,
        le=MAX_STEPS,
        description="Optimizer steps per round, the same for every method (IOPO: the steps of both players "
        "together, rounded up to whole game rounds of n_mu + n_nu).",
    )
    data: DataConfig = Field(
        default_factory=DataConfig,
        description="Human pairs: the prompt pool (its train split), the held-out split scored each round, and "
        "the training pairs of iopo/dpo.",
    )
    # --- iter_dpo: where the round's pairs come from
    prompts_per_round: int = Field(32, gt=0, description="P prompts per round from the pool.")
    prompt_split: Literal["train", "test", "all"] = Field("train", description="The prompt pool's split.")
    reuse_prompts: bool = Field(
        False, description="Draw every round from the whole pool (else no prompt is used twice)."
    )
    generation: OnlineGenerationConfig = Field(
        default_factory=OnlineGenerationConfig,
        description="Answers of the current policy (n per prompt; the paper's temperature 0.8); hf only.",
    )
    judge: JudgeConfig | None = Field(
        None,
        description="The annotating judge of iter_dpo (and the scoring judge unless score_judge is set).",
    )
    annotate_by: Literal["auto", "score", "pairwise"] = Field(
        "auto",
        description="score: best vs worst answer by score (reward model, 0-3 rubric); pairwise: A/B in both "
        "orders, kept when the orders agree; auto: score for a reward model, pairwise otherwise.",
    )
    keep_ratio: float = Field(
        0.2,
        gt=0,
        le=1,
        description="Keep this top share of the separated pairs by judged confidence (paper: 1:5 = 0.2).",
    )
    human_pairs_per_round: int = Field(
        0, ge=0, description="Human pairs from the train split mixed into each round's pairs."
    )
    reference: Literal["initial", "previous_round"] = Field(
        "initial",
        description="iter_dpo's DPO reference: the starting model, or the policy as the round began.",
    )
    # --- scoring each round
    score_judge: JudgeConfig | None = Field(
        None, description="Judge of the per-round win rate against the starting policy; unset = judge."
    )
    score_prompts: int = Field(
        32,
        ge=0,
        description="Held-out prompts answered and judged each round (0 = implicit-reward metrics only).",
    )
    bootstrap: int = Field(1000, ge=0, le=100000)
    confidence: float = Field(0.95, gt=0, lt=1)
    # --- budget
    max_judge_requests: int | None = Field(
        None, gt=0, description="Stop at the stage boundary before the judge requests would pass this."
    )
    max_cost: float | None = Field(
        None, gt=0, description="Stop at the first stage boundary where the judges' money reaches this."
    )
    # --- run
    output_dir: str = Field("runs/online-{method}", description="Run folder; {method} is filled in.")
    judge_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of in-process judges."
    )
    keep_checkpoints: int = Field(
        1,
        gt=0,
        description="Keep the newest N rounds' checkpoints (IOPO full fine-tuning: ~2x weights+Adam each).",
    )
    overwrite: bool = Field(
        False, description="Start over in an output_dir that holds an earlier online run."
    )

    @model_validator(mode="after")
    def _consistent(self) -> OnlineConfig:
        check_output_dir(self.output_dir, self.method)
        online = ONLINE_METHODS[self.method]
        if online.judged and self.judge is None:
            raise ValueError(
                f"method={self.method} needs a judge (judge.type=reward_model judge.model=runs/rm/final, ...)"
            )
        if online.reference_answer:
            # XPO: one answer of the policy against one of the starting model (OAT's XPOActor)
            if "n" not in self.generation.model_fields_set:
                self.generation.n = 1
            elif self.generation.n != 1:
                raise ValueError(
                    f"method={self.method} pairs one answer of the policy with one of the starting model: "
                    "generation.n must be 1"
                )
        elif online.judged and self.generation.n < 2:
            raise ValueError(
                f"method={self.method} needs generation.n >= 2 answers per prompt to make a pair"
            )
        if self.generation.backend != "hf":
            raise ValueError(
                "online rounds generate in process (generation.backend=hf): the policy changes every round"
            )
        if self.optim.max_steps is not None:
            raise ValueError("optim.max_steps is not used online; set rounds and steps_per_round")
        if self.rounds * self.round_steps > MAX_STEPS:
            raise ValueError(
                f"rounds x steps_per_round = {self.rounds * self.round_steps:,} optimizer steps; at most {MAX_STEPS:,}"
            )
        if self.generation.engine == "vllm" and self.model.lora:
            raise ValueError("generation.engine=vllm takes full weights; with model.lora use engine=hf")
        if self.generation.engine == "vllm" and self.generation.dtype != "model":
            raise ValueError(
                "generation.dtype applies to engine=hf; vLLM generates in the policy's precision"
            )
        if online.judged and self.reference == "previous_round" and self.model.lora:
            raise ValueError(
                "reference=previous_round is not supported with model.lora yet (the reference would need a third "
                "adapter); use full fine-tuning or reference=initial"
            )
        return self

    def train_config(self) -> TrainConfig:
        """The TrainConfig of the training stages: the row's offline method (dpo for iter_dpo), the whole run's
        steps as max_steps."""
        parts = self.training_parts() | {
            "iopo": self.iopo.model_copy(update={"n_iter": None}),
            "optim": self.optim.model_copy(update={"max_steps": self.rounds * self.round_steps}),
        }
        return TrainConfig(
            **parts,
            method=ONLINE_METHODS[self.method].trains,
            output_dir=str(self.run_dir).replace("{", "{{").replace("}", "}}"),
            save_total_limit=None,
        )

    @property
    def round_steps(self) -> int:
        """Optimizer steps of one round (a game: whole game rounds)."""
        method = METHODS[ONLINE_METHODS[self.method].trains]
        if not method.is_game:
            return self.steps_per_round
        game = len(method.game_round(self))
        return -(-self.steps_per_round // game) * game
