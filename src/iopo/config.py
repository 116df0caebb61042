"""Typed settings, one config per command (train, train-rm, generate, eval, plot, report): defaults < YAML file <
`key.sub=value` overrides.

Each config is composed one level deep of small parts (model, data, loss, iopo, optim, generation, judges).
Validation is pydantic's; unknown keys and bad values fail with a message that names the key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

METHODS = ("iopo", "dpo", "ipo", "hinge", "kto_pair", "sft")
MAX_STEPS = (
    1_000_000  # optimizer steps of one run: far beyond any real run, far below what a schedule list can hold
)


class ConfigError(ValueError):
    """A bad setting; its message names the key."""


def _expand(values: Any, **fields: str) -> Any:
    """Shorthands: a string given for a section (e.g. `data=pairs.jsonl`) sets that section's main field."""
    if not isinstance(values, dict):
        return values
    values = dict(values)
    for section, field in fields.items():
        if isinstance(values.get(section), str):
            values[section] = {field: values[section]}
    return values


class _Part(BaseModel):
    # inf and nan are refused everywhere: no setting can train with them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Part):
    name_or_path: str | None = Field(
        None, description="Hub id or local folder of a causal LM; unset = the embedded SmolLM2-135M-Instruct."
    )
    gguf_file: str | None = Field(
        None, description="Load this GGUF file from `name_or_path` (dequantised to dense)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Dtype the weights are stored in. Keep float32 and use mixed_precision=bf16 to train.",
    )
    trust_remote_code: bool = False
    attn_implementation: str | None = Field(None, description="e.g. 'sdpa', 'eager', 'flash_attention_2'.")
    gradient_checkpointing: bool = False
    disable_dropout: bool = Field(
        True,
        description="Set every dropout of the model (LoRA's too) to 0, as TRL's DPO does: the policy's and the "
        "reference's log-probs then come from the same function. false = the trained player's forward uses the "
        "model's dropout (the frozen env/reference always runs without).",
    )
    lora: bool = Field(
        False, description="Train LoRA adapters (IOPO: two adapters on one shared frozen base)."
    )
    lora_r: int = Field(16, gt=0)
    lora_alpha: float = Field(32.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] | str = Field("all-linear", description="peft target_modules.")


class DataConfig(_Part):
    path: str | None = Field(
        None,
        description="Local JSON/JSONL(.gz)/parquet file or a `datasets` name; unset = the embedded hh-rlhf harmless-base.",
    )
    name: str | None = Field(None, description="`datasets` configuration name.")
    split: str = Field("train", description="`datasets` split of `path`.")
    test_path: str | None = Field(
        None, description="Separate test file/dataset; unset = split `path` by prompt."
    )
    test_split: str = Field("test", description="`datasets` split of `test_path`.")
    test_size: float = Field(
        0.1, gt=0, description="Held-out share (<1) or number of pairs (>=1), split by prompt."
    )
    split_seed: int = Field(42, ge=0, lt=2**32, description="Seed of the prompt-grouped train/test split.")
    format: Literal["auto", "standard", "conversational", "implicit", "hh", "sharegpt"] = "auto"
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map our fields (prompt, chosen, rejected) to yours; dotted paths and list indices work, "
        "e.g. {chosen: response.0, rejected: response.1}.",
    )
    max_length: int = Field(
        512, gt=0, description="Prompt + completion tokens; completions are cut at the end."
    )
    max_prompt_length: int = Field(
        256, gt=0, description="Prompt tokens; prompts are cut at the start (left)."
    )
    max_field_chars: int = Field(
        1_000_000,
        gt=0,
        description="A text field longer than this (characters, before tokenization) is a bad row, not a memory blow-up.",
    )
    max_rows: int = Field(10_000_000, gt=0, description="A data file (or folder) with more rows is refused.")
    max_train_samples: int | None = Field(None, gt=0)
    max_eval_samples: int | None = Field(None, gt=0)
    annotator: Literal["data", "longer"] = Field(
        "data",
        description="Who labels the training pairs: the data's own labels, or 'longer', a length-biased annotator "
        "that prefers the longer answer. The test split keeps the data's labels.",
    )
    flip_labels: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of the training pairs (after max_train_samples and annotator) whose chosen and rejected "
        "are swapped: an annotator that errs at random. Seeded by split_seed; the test split is never changed.",
    )
    skip_invalid: bool | None = Field(
        None,
        description="Count bad rows, write them to rejects.jsonl and go on; unset = true for the embedded data "
        "(its 9 known bad rows are reported), false for yours (the first bad row stops the run).",
    )

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})"
            )
        return self


class LossConfig(_Part):
    beta: float = Field(0.1, gt=0, description="KL strength (paper: 0.1).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Conservative DPO; 0 = off.")
    ipo_average: Literal["sum", "mean"] = Field(
        "sum", description="IPO on summed (paper) or per-token mean log-probs."
    )


class IOPOConfig(_Part):
    n_iter: int | None = Field(
        None,
        gt=0,
        le=MAX_STEPS,
        description="Game rounds (Alg. 1 N_iter); unset = enough to cover optim.num_epochs.",
    )
    n_mu: int = Field(1, gt=0, le=MAX_STEPS, description="Protagonist optimizer steps per round (N_mu).")
    n_nu: int = Field(1, gt=0, le=MAX_STEPS, description="Adversary optimizer steps per round (N_nu).")
    epsilon: float = Field(0.3, gt=0, lt=1, description="IS clip (paper: 0.3).")
    adversary: Literal["symmetric", "reversed"] = "symmetric"
    is_clip: Literal["paper", "symmetric"] = "paper"
    is_logp: Literal["sum", "mean"] = "sum"


class OptimConfig(_Part):
    learning_rate: float = Field(5e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    batch_size: int = Field(4, gt=0, description="Pairs per device per micro-batch.")
    gradient_accumulation_steps: int = Field(1, gt=0)
    num_epochs: float = Field(1.0, gt=0, le=100_000)
    max_steps: int | None = Field(
        None, gt=0, le=MAX_STEPS, description="Optimizer steps (baselines); overrides num_epochs."
    )


def _check_output_dir(output_dir: str, method: str) -> None:
    if not output_dir.strip():
        raise ValueError("output_dir must name a folder (an empty one would make the current folder the run)")
    try:
        output_dir.format(method=method)
    except (KeyError, IndexError, ValueError):
        raise ValueError(
            "output_dir may use {method} and no other braces (write {{ and }} for literal ones)"
        ) from None


class DistributedConfig(_Part):
    """How the processes share the work (docs/distributed.md). One process trains as it is under either strategy."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every process holds whole players, gradients are averaged. fsdp: FSDP2 "
        "(torch fully_shard, per decoder layer then the whole model) shards each player's weights, gradients and "
        "its own optimizer state over the processes; checkpoints are torch.distributed.checkpoint folders.",
    )
    fsdp_offload: bool = Field(
        False,
        description="fsdp: keep the sharded weights, gradients and optimizer states in CPU memory (FSDP2 "
        "CPUOffloadPolicy; the optimizer step runs on the CPU).",
    )
    fsdp_reshard_after_forward: bool = Field(
        True,
        description="fsdp: free each layer's gathered weights after its forward (less memory, one more "
        "all-gather in the backward).",
    )
    fsdp_layers: list[str] = Field(
        default_factory=list,
        description="fsdp: class names of the modules sharded one by one (the decoder layers); empty = the "
        "model's own _no_split_modules.",
    )


class TrainConfig(_Part):
    method: Literal["iopo", "dpo", "ipo", "hinge", "kto_pair", "sft"] = "iopo"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    iopo: IOPOConfig = Field(default_factory=IOPOConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    output_dir: str = Field("runs/{method}", description="Run folder; {method} is filled in.")
    seed: int = Field(42, ge=0, lt=2**32, description="Seed of every RNG (numpy's range).")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    batching: Literal["auto", "shared", "plain"] = Field(
        "auto",
        description="shared: each pair is one [prompt, chosen, rejected] sequence (the prompt computed once) with a "
        "block attention mask, and pairs are packed into rows of up to 2 x data.max_length tokens (little padding). "
        "plain: prompt+chosen and prompt+rejected rows, right-padded. auto: shared when the model's attention takes "
        "a 4D mask (sdpa, eager), has no sliding window, and the first batch gives the plain log-probs; else plain.",
    )
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    logging_steps: int = Field(1, gt=0)
    save_steps: int | None = Field(
        None, gt=0, description="Checkpoint every N optimizer steps (and always at the end)."
    )
    save_total_limit: int | None = Field(2, gt=0, description="Keep this many newest checkpoints.")
    resume: bool | str = Field(
        False, description="true = newest checkpoint in output_dir, or a checkpoint path."
    )
    overwrite: bool = Field(False, description="Allow a fresh run into an output_dir that has checkpoints.")
    eval_batch_size: int = Field(8, gt=0)
    eval_reference_cache: str | None = Field(
        None,
        description="Folder where runs from the same starting model share its test-split log-probs (sweeps, "
        "seeds): computed once, reused only on an exact match of weights, test tokens, batching and precision.",
    )
    eval_at_end: bool = True
    export: bool = Field(True, description="Write the protagonist/policy as a from_pretrained folder.")
    merge_lora: bool = Field(True, description="LoRA: export merged weights (else the adapter folder).")
    logps_chunk_tokens: int = Field(1024, gt=0, description="Completion tokens per log-softmax chunk.")
    eval_steps: int | None = Field(
        None,
        gt=0,
        description="Every N optimizer steps, log margin reward and pairwise accuracy of the protagonist/policy "
        "on the test split (metrics.jsonl and TensorBoard eval/*): the curves of the paper's Fig. 5.",
    )
    tensorboard: bool = True
    progress_bar: bool = True

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, values: Any) -> Any:
        # `model=path` and `data=path` are shorthands for model.name_or_path / data.path.
        return _expand(values, model="name_or_path", data="path")

    @model_validator(mode="after")
    def _plain_output_dir(self) -> TrainConfig:
        _check_output_dir(self.output_dir, self.method)
        if self.distributed.strategy == "fsdp" and self.mixed_precision == "fp16":
            raise ValueError(
                "distributed.strategy=fsdp trains in float32 or mixed_precision=bf16 (fp16 needs a loss scaler "
                "FSDP2 does not provide here)"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(method=self.method))


# ---------------------------------------------------------------- generation, judges, evaluation


class GenerationConfig(_Part):
    backend: Literal["hf", "openai"] = Field(
        "hf", description="hf: transformers generate in this process; openai: any OpenAI-compatible server."
    )
    temperature: float = Field(
        0.8, ge=0, le=10, description="0 = greedy (paper: 0.8 for Table 1, 0 for Table 2)."
    )
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(256, gt=0, le=32768)
    n: int = Field(1, gt=0, le=64, description="Answers per prompt.")
    seed: int = Field(0, ge=0, lt=2**32)
    batch_size: int = Field(8, gt=0, description="hf: prompts per generate call (left-padded, KV cache).")
    # backend=openai
    base_url: str | None = Field(None, description="e.g. http://127.0.0.1:8080/v1")
    api_model: str | None = Field(None, description="The server's model name.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (the key is never stored)."
    )
    concurrency: int = Field(4, gt=0, le=256)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(4, ge=0, le=20)


JUDGE_TYPES = ("reward_model", "openai", "local")


class JudgeConfig(_Part):
    type: Literal["reward_model", "openai", "local"] = Field(
        description="reward_model: a sequence-classification reward model; openai: an LLM behind an "
        "OpenAI-compatible server; local: a causal LM in process, from its next-token probabilities of A and B."
    )
    model: str | None = Field(
        None, description="reward_model/local: hub id or folder (an `iopo train-rm` output for reward_model)."
    )
    modes: list[Literal["pairwise", "score"]] | None = Field(
        None,
        description="pairwise: A/B verdicts in both orders (Table 1); score: a 0-3 rubric per answer (Table 2). "
        "Unset: openai both, local pairwise; reward_model always scores (its score gap gives the verdict).",
    )
    tie_margin: float = Field(
        0.0, ge=0, description="reward_model: |score gap| <= this is a tie; local: |P(A) - 0.5| <= this."
    )
    base_url: str | None = Field(None, description="openai: e.g. http://127.0.0.1:8080/v1")
    api_model: str | None = Field(
        None,
        description="openai: the model name sent to the server; with it, stored verdicts are reused whatever the "
        "URL (without it, the URL is the judge's identity).",
    )
    api_key_env: str | None = Field(
        None, description="openai: environment variable holding the API key (never logged, never written)."
    )
    concurrency: int = Field(4, gt=0, le=256)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(4, ge=0, le=20)
    max_tokens: int = Field(64, gt=0, le=4096, description="openai: reply length limit.")
    json_schema: Literal["object", "enum", "off"] = Field(
        "object",
        description='openai: constrain the reply by a JSON schema - object: {"winner": "A"} (OpenAI\'s '
        'structured outputs need an object); enum: the bare value "A" / 2 (vLLM, llama.cpp: a few tokens '
        "instead of dozens); off: free text. The strict fallback parser reads every form.",
    )
    price_per_1k_prompt_tokens: float = Field(
        0.0, ge=0, description="Money per 1k prompt tokens (paper: ERNIE at 0.0174)."
    )
    price_per_1k_completion_tokens: float = Field(0.0, ge=0)
    batch_size: int = Field(8, gt=0, description="reward_model/local: answers per forward.")
    max_length: int = Field(1024, gt=0, description="reward_model/local: tokens per judged text (left-cut).")

    @model_validator(mode="after")
    def _needs(self) -> JudgeConfig:
        if self.type == "openai" and not self.base_url:
            raise ValueError("an openai judge needs base_url")
        if self.type == "reward_model" and not self.model:
            raise ValueError("a reward_model judge needs model (e.g. the final/ folder of `iopo train-rm`)")
        return self

    def effective_modes(self) -> list[str]:
        if self.type == "reward_model":
            return ["score"]
        if self.modes:
            return list(dict.fromkeys(self.modes))
        return ["pairwise", "score"] if self.type == "openai" else ["pairwise"]


class GenerateConfig(_Part):
    """`iopo generate`: answers to a split's prompts, as JSON Lines written as they come."""

    model: str | None = Field(
        None,
        description="A run folder (its final/), a checkpoint, a local folder, a LoRA adapter folder or a hub "
        "id; unset = the embedded SmolLM2-135M-Instruct.",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    split: Literal["test", "train", "all"] = "test"
    max_prompts: int | None = Field(None, gt=0, description="The first N distinct prompts of the split.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    output: str = Field("generations.jsonl", description="JSON Lines file; an existing one is continued.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    progress_bar: bool = True

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, values: Any) -> Any:
        return _expand(values, data="path")


class EvalConfig(_Part):
    """`iopo eval`: models against a baseline on a split -> implicit-reward metrics, generations, judgments."""

    models: list[str] = Field(
        default_factory=list,
        description="Models to evaluate (run folders, checkpoints, folders, adapters, hub ids); `label=path` "
        "names one. Positional arguments of `iopo eval` land here.",
    )
    baseline: str | None = Field(
        None,
        description="What each model is compared with and the reference of the implicit reward; unset = the "
        "starting model of the first run given (else the embedded model).",
    )
    data: DataConfig | None = Field(
        None,
        description="The split; unset = the first run's data settings (its test split), else the defaults.",
    )
    split: Literal["test", "train", "all"] = "test"
    max_prompts: int | None = Field(
        None, gt=0, description="Generate and judge the first N distinct prompts (metrics use every pair)."
    )
    beta: float | None = Field(
        None, gt=0, description="β of the implicit reward; unset = the run's loss.beta."
    )
    metrics: bool = Field(True, description="Margin reward and pairwise accuracy vs the baseline.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    judges: dict[str, JudgeConfig] = Field(
        default_factory=dict,
        description="Named judges, e.g. {rm: {type: reward_model, model: runs/rm/final}, "
        "llm: {type: openai, base_url: ...}}.",
    )
    bootstrap: int = Field(
        1000, ge=0, le=100000, description="Bootstrap resamples (over prompts) for the CIs."
    )
    confidence: float = Field(0.95, gt=0, lt=1)
    output_dir: str = Field("evals/eval", description="Eval folder: store.sqlite, generations/, eval.json.")
    batch_size: int = Field(8, gt=0, description="Pairs per forward for the implicit-reward metrics.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    seed: int = Field(0, ge=0, lt=2**32, description="Seed of the bootstrap.")
    progress_bar: bool = True

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, values: Any) -> Any:
        values = _expand(values, data="path")
        if isinstance(values, dict) and isinstance(values.get("models"), str):
            values = {**values, "models": [values["models"]]}  # one model given as a string
        return values


class RMOptimConfig(OptimConfig):
    """The optimizer settings of `iopo train-rm` (a new head on a pretrained backbone: a larger rate, no warm-up)."""

    learning_rate: float = Field(1e-5, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)


class TrainRMConfig(_Part):
    """`iopo train-rm`: a Bradley-Terry reward model (paper Eq. 2), saved as AutoModelForSequenceClassification."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: RMOptimConfig = Field(default_factory=RMOptimConfig)
    output_dir: str = Field("runs/rm", min_length=1, description="Run folder; the model goes to final/.")
    seed: int = Field(42, ge=0, lt=2**32)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    logging_steps: int = Field(1, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="Log held-out accuracy every N steps.")
    eval_batch_size: int = Field(8, gt=0)
    overwrite: bool = Field(
        False, description="Allow writing into an output_dir that holds a finished model."
    )
    tensorboard: bool = True
    progress_bar: bool = True

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, values: Any) -> Any:
        return TrainConfig._shorthands(values)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)


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


class OnlineConfig(_Part):
    """`iopo online`: K rounds of {prompts -> generate -> judge -> pairs -> train -> score} (iter_dpo, the paper's
    costly baseline), or the same rounds and optimizer steps on the human pairs only (iopo: the game goes on with no
    judge; dpo: the offline control). Every stage leaves its files under round_k/ and the same command resumes."""

    method: Literal["iter_dpo", "iopo", "dpo"] = "iter_dpo"
    rounds: int = Field(3, gt=0, le=10000, description="Online rounds K.")
    steps_per_round: int = Field(
        8,
        gt=0,
        le=MAX_STEPS,
        description="Optimizer steps per round, the same for every method (IOPO: the steps of both players "
        "together, rounded up to whole game rounds of n_mu + n_nu).",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(
        default_factory=DataConfig,
        description="Human pairs: the prompt pool (its train split), the held-out split scored each round, and "
        "the training pairs of iopo/dpo.",
    )
    loss: LossConfig = Field(default_factory=LossConfig)
    iopo: IOPOConfig = Field(default_factory=IOPOConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
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
    seed: int = Field(42, ge=0, lt=2**32)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
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
    logging_steps: int = Field(1, gt=0)
    eval_batch_size: int = Field(8, gt=0)
    logps_chunk_tokens: int = Field(1024, gt=0)
    export: bool = True
    merge_lora: bool = True
    tensorboard: bool = True
    progress_bar: bool = True

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, values: Any) -> Any:
        return TrainConfig._shorthands(values)

    @model_validator(mode="after")
    def _consistent(self) -> OnlineConfig:
        _check_output_dir(self.output_dir, self.method)
        if self.method == "iter_dpo" and self.judge is None:
            raise ValueError(
                "method=iter_dpo needs a judge (judge.type=reward_model judge.model=runs/rm/final, ...)"
            )
        if self.method == "iter_dpo" and self.generation.n < 2:
            raise ValueError("method=iter_dpo needs generation.n >= 2 answers per prompt to make a pair")
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
        if self.method == "iter_dpo" and self.reference == "previous_round" and self.model.lora:
            raise ValueError(
                "reference=previous_round is not supported with model.lora yet (the reference would need a third "
                "adapter); use full fine-tuning or reference=initial"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(method=self.method))

    def train_config(self) -> TrainConfig:
        """The TrainConfig of the training stages: dpo for iter_dpo, the whole run's steps as max_steps."""
        method = "dpo" if self.method == "iter_dpo" else self.method
        steps = self.rounds * self.round_steps
        return TrainConfig(
            method=method,
            model=self.model,
            data=self.data,
            loss=self.loss,
            iopo=self.iopo.model_copy(update={"n_iter": None}),
            optim=self.optim.model_copy(update={"max_steps": steps}),
            output_dir=str(self.run_dir).replace("{", "{{").replace("}", "}}"),
            seed=self.seed,
            mixed_precision=self.mixed_precision,
            logging_steps=self.logging_steps,
            save_total_limit=None,
            eval_batch_size=self.eval_batch_size,
            logps_chunk_tokens=self.logps_chunk_tokens,
            merge_lora=self.merge_lora,
            tensorboard=self.tensorboard,
            progress_bar=self.progress_bar,
        )

    @property
    def round_steps(self) -> int:
        """Optimizer steps of one round (IOPO: whole game rounds)."""
        if self.method != "iopo":
            return self.steps_per_round
        game = self.iopo.n_mu + self.iopo.n_nu
        return -(-self.steps_per_round // game) * game


class PlotConfig(_Part):
    """`iopo plot`: PNGs from run and eval folders."""

    inputs: list[str] = Field(
        default_factory=list, description="Run and eval folders (positional arguments land here)."
    )
    output_dir: str = Field("plots", description="Where the PNGs go.")


class ReportConfig(_Part):
    """`iopo report`: one Markdown file from run and eval folders."""

    inputs: list[str] = Field(
        default_factory=list, description="Run and eval folders (positional arguments land here)."
    )
    output: str = Field("report.md", description="The Markdown file; its PNGs go to a folder beside it.")
    title: str = "iopo report"


class RateConfig(_Part):
    """`iopo rate EVAL_DIR`: a local page where people rate an eval's answers blind (0-3 scores and a preference)."""

    eval_dir: str | None = Field(
        None, description="The eval folder (of `iopo eval`) whose answers are rated; the positional argument."
    )
    models: list[str] = Field(
        default_factory=list,
        description="Rate these of the eval's models against its baseline; empty = every model.",
    )
    host: str = Field(
        "127.0.0.1",
        description="Address to bind; the default serves this machine only. 0.0.0.0 shares the page with the "
        "network (anyone who can reach it can rate).",
    )
    port: int = Field(8808, ge=0, le=65535, description="Port; 0 = any free port (printed).")
    overlap: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Share of the pairs every rater is shown (for inter-rater agreement); each other pair goes "
        "to one rater only.",
    )
    max_pairs: int | None = Field(
        None, gt=0, description="Rate only the first N pairs of the fixed shuffled order."
    )
    seed: int = Field(
        0, ge=0, lt=2**32, description="Seed of the pair order, the overlap draw and left/right."
    )
    claim_minutes: float = Field(
        30.0,
        gt=0,
        le=7 * 24 * 60,
        description="A pair shown to a rater is held for them this long before another rater may get it.",
    )
    serve: bool = Field(
        True,
        description="false: do not serve; recompute the human tables into eval.json and write the exports.",
    )
    bootstrap: int = Field(1000, ge=0, le=100000, description="Bootstrap resamples for the CIs.")
    confidence: float = Field(0.95, gt=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _one_folder(cls, values: Any) -> Any:
        if isinstance(values, dict) and isinstance(values.get("eval_dir"), list):
            folders = values["eval_dir"]
            if len(folders) != 1:
                raise ValueError(f"rate one eval folder at a time (got {len(folders)})")
            values = {**values, "eval_dir": folders[0]}
        return values


_SHORTHANDS = {"model": "name_or_path", "data": "path"}
# Override values under these final keys stay strings even when they look like numbers or YAML.
_PATH_KEYS = {
    "output_dir",
    "path",
    "name_or_path",
    "model",
    "data",
    "test_path",
    "baseline",
    "output",
    "base_url",
    "eval_dir",
}
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if isinstance(child, str) and key in _SHORTHANDS:
            child = {_SHORTHANDS[key]: child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(
                f"config key '{'.'.join(keys[: i + 1])}' is not a section, cannot set '{dotted}'"
            )
        node[key] = child
        node = child
    last = keys[-1]
    if len(keys) == 1 and last in _SHORTHANDS and isinstance(value, str) and isinstance(node.get(last), dict):
        node[last][_SHORTHANDS[last]] = value  # `model=x` after `model.lora=true` keeps the lora setting
    else:
        node[last] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["optim.learning_rate=1e-6", "model.lora=true"]` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and _FLOAT_RE.match(value):
            value = float(value)  # YAML 1.1 reads "1e-6" as a string
        if isinstance(value, dict) and not raw.lstrip().startswith("{"):
            value = raw  # title="a: b" is text; a mapping is written {key: value}
        if key.rsplit(".", 1)[-1] in _PATH_KEYS and isinstance(value, str | int | float | bool | None):
            value = raw  # paths stay strings even if they look like numbers
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        else:
            parts.append(f"'{loc or '(top)'}': {e['msg']} (got {_short(e.get('input'))})")
    message = f"bad config{source}: " + "; ".join(parts)
    return message if len(message) <= 1000 else message[:1000] + f"… ({len(parts)} problems)"


def _short(value: Any) -> str:
    """The offending value, bounded: a huge or deeply nested input never floods the one-line error."""
    import reprlib

    bounded = reprlib.Repr()  # never builds the full repr of a huge or aliased structure
    bounded.maxstring, bounded.maxother, bounded.maxlist, bounded.maxdict, bounded.maxlevel = 80, 80, 4, 4, 3
    text = bounded.repr(value)
    return text if len(text) <= 160 else text[:160] + "…"


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, schema: type[BaseModel] = None
) -> Any:
    """Resolve defaults < YAML file < overrides into a validated config of `schema` (default TrainConfig)."""
    schema = schema or TrainConfig
    shorthands = getattr(schema, "_shorthands", lambda values: values)
    tree: dict = {}
    source = ""
    if path is not None:
        source = f" ({path})"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of keys, got {type(loaded).__name__}")
        tree = shorthands(loaded or {})
    if overrides:
        tree = _merge(tree, shorthands(parse_overrides(overrides)))
    try:
        return schema.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def changed_settings(
    saved: dict, cfg: BaseModel, free: set[str] = frozenset(), then: str = "was"
) -> list[str]:
    """The settings (one level deep, "section.key") where a saved config differs from `cfg`, as "key (then X, now
    Y)", `then` naming the saved side; `free` names keys ("key" or "section.key") that may differ.
    A key the saved config lacks counts as unchanged when `cfg` has it at its default: a setting added to iopo
    after the run was written does not block its resumption."""
    now = cfg.model_dump(mode="json")
    defaults = type(cfg).model_construct().model_dump(mode="json")
    missing = object()
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if key in free or saved.get(key, missing) == now.get(key):
            continue
        was, value = saved.get(key, missing), now.get(key)
        if was is missing and value == defaults.get(key):
            continue
        if isinstance(was, dict) and isinstance(value, dict):
            base = defaults.get(key) if isinstance(defaults.get(key), dict) else {}
            for sub in sorted(set(was) | set(value)):
                old = was.get(sub, missing)
                if f"{key}.{sub}" in free:
                    continue
                if old == value.get(sub) or (old is missing and sub in base and value.get(sub) == base[sub]):
                    continue
                shown = None if old is missing else old
                diffs.append(f"{key}.{sub} ({then} {shown!r}, now {value.get(sub)!r})")
        else:
            diffs.append(f"{key} ({then} {None if was is missing else was!r}, now {value!r})")
    return diffs


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
