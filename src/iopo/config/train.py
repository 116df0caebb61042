"""The settings of training: the model, the data, the loss, IOPO's game, the optimizer, the distribution, and the
`iopo train` and `iopo train-rm` configs built from them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from iopo.config.base import MAX_STEPS, Part, check_output_dir, expand_shorthands
from iopo.core.methods import METHODS


class ModelConfig(Part):
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


class DataConfig(Part):
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


class LossConfig(Part):
    beta: float = Field(0.1, gt=0, description="KL strength (paper: 0.1).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Conservative DPO; 0 = off.")
    ipo_average: Literal["sum", "mean"] = Field(
        "sum", description="IPO on summed (paper) or per-token mean log-probs."
    )


class IOPOConfig(Part):
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


class INPOConfig(Part):
    """INPO (Zhang et al., ICLR 2025): the loss regresses h to 1/(2 eta), h measured against a reference that is
    tau/eta of the starting model and (eta - tau)/eta of the round's previous policy."""

    eta: float = Field(
        0.075,
        gt=0,
        description="eta: the target of h is 1/(2 eta) (an IPO with beta = eta offline); the ENPO reproduction's "
        "7.5e-3 x 10, on the scale of loss.beta=0.1.",
    )
    tau: float = Field(
        0.025,
        gt=0,
        description="tau, the KL strength toward the starting model: its share of the reference is tau/eta.",
    )

    @model_validator(mode="after")
    def _share(self) -> INPOConfig:
        if self.tau > self.eta:
            raise ValueError(
                f"inpo.tau ({self.tau:g}) must not exceed inpo.eta ({self.eta:g}): the starting model's share of the "
                "reference is tau/eta, the previous policy's (eta - tau)/eta"
            )
        return self


class SPINConfig(Part):
    loss: Literal["logistic", "hinge", "ipo"] = Field(
        "logistic",
        description="SPIN's loss on (data answer, own answer): logistic -log sigma(beta h) (the paper's), hinge "
        "max(0, 1 - beta h) or IPO (h - 1/(2 beta))^2, h against the previous round's policy.",
    )


class XPOConfig(Part):
    alpha: float = Field(
        5e-6,
        ge=0,
        description="XPO's exploration weight: the loss adds alpha * log pi(y_ref) for the reference model's answer "
        "in each pair (OAT's xpo_alpha).",
    )


class OptimConfig(Part):
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


class DistributedConfig(Part):
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


# The method choices are the METHODS table's rows (iopo.core.methods): a new row is a new choice here.
MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]


def _no_is_no(value: Any) -> Any:
    """YAML 1.1 reads `no` (mixed_precision=no, `mixed_precision: no`) as false: it means "no"."""
    return "no" if value is False else value


Precision = Annotated[Literal["no", "bf16", "fp16"], BeforeValidator(_no_is_no)]
Tracker = Literal["tensorboard", "wandb", "mlflow"]

# The trackers and the Hub push, set alike by iopo train, online and train-rm (one definition each).
TensorBoard = Annotated[
    bool, Field(description="Log to TensorBoard (run_dir/tensorboard); false drops it from report_to.")
]
ReportTo = Annotated[
    list[Tracker],
    Field(
        description="Trackers, with the same metric names: tensorboard, wandb (under run_dir/wandb; "
        "WANDB_MODE=offline needs no network), mlflow (MLFLOW_TRACKING_URI, e.g. a local file: store).",
    ),
]
PushToHub = Annotated[
    bool, Field(description="Upload the export (final/, with its model card) to hub_model_id at the end.")
]
HubModelId = Annotated[str | None, Field(description="The Hub repository to push to, e.g. my-org/my-model.")]
HubPrivate = Annotated[bool, Field(description="Create the repository private (when it does not exist yet).")]


def check_push(cfg) -> None:
    if cfg.push_to_hub and not cfg.hub_model_id:
        raise ValueError("push_to_hub=true needs hub_model_id (the Hub repository, e.g. my-org/my-model)")


class TrainingParts(Part):
    """What `iopo train` and `iopo online` both set: the model, data, loss, game and optimizer parts, the seed,
    the precision and the logging and export switches (one definition, the same keys in both commands)."""

    method: str = "iopo"  # each command narrows it to its own table's names
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    iopo: IOPOConfig = Field(default_factory=IOPOConfig)
    inpo: INPOConfig = Field(default_factory=INPOConfig)
    spin: SPINConfig = Field(default_factory=SPINConfig)
    xpo: XPOConfig = Field(default_factory=XPOConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    seed: int = Field(42, ge=0, lt=2**32, description="Seed of every RNG (numpy's range).")
    mixed_precision: Precision = "no"
    logging_steps: int = Field(1, gt=0)
    eval_batch_size: int = Field(8, gt=0)
    export: bool = Field(True, description="Write the protagonist/policy as a from_pretrained folder.")
    merge_lora: bool = Field(True, description="LoRA: export merged weights (else the adapter folder).")
    logps_chunk_tokens: int = Field(1024, gt=0, description="Completion tokens per log-softmax chunk.")
    tensorboard: TensorBoard = True
    report_to: ReportTo = ["tensorboard"]
    push_to_hub: PushToHub = False
    hub_model_id: HubModelId = None
    hub_private: HubPrivate = True
    progress_bar: bool = True

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, values: Any) -> Any:
        # `model=path` and `data=path` are shorthands for model.name_or_path / data.path.
        return expand_shorthands(values, model="name_or_path", data="path")

    @model_validator(mode="after")
    def _push(self) -> TrainingParts:
        check_push(self)
        return self

    @property
    def run_dir(self) -> Path:
        """The run folder: output_dir (each command's own field) with {method} filled in."""
        return Path(self.output_dir.format(method=self.method))

    def training_parts(self) -> dict:
        """This config's TrainingParts fields, by name (to build the other command's config from)."""
        return {name: getattr(self, name) for name in TrainingParts.model_fields if name != "method"}


class TrainConfig(TrainingParts):
    method: MethodName = "iopo"
    output_dir: str = Field("runs/{method}", description="Run folder; {method} is filled in.")
    batching: Literal["auto", "shared", "plain"] = Field(
        "auto",
        description="shared: each pair is one [prompt, chosen, rejected] sequence (the prompt computed once) with a "
        "block attention mask, and pairs are packed into rows of up to 2 x data.max_length tokens (little padding). "
        "plain: prompt+chosen and prompt+rejected rows, right-padded. auto: shared when the model's attention takes "
        "a 4D mask (sdpa, eager), has no sliding window, and the first batch gives the plain log-probs; else plain.",
    )
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    save_steps: int | None = Field(
        None, gt=0, description="Checkpoint every N optimizer steps (and always at the end)."
    )
    save_total_limit: int | None = Field(2, gt=0, description="Keep this many newest checkpoints.")
    resume: bool | str = Field(
        False, description="true = newest checkpoint in output_dir, or a checkpoint path."
    )
    overwrite: bool = Field(False, description="Allow a fresh run into an output_dir that has checkpoints.")
    eval_reference_cache: str | None = Field(
        None,
        description="Folder where runs from the same starting model share its test-split log-probs (sweeps, "
        "seeds): computed once, reused only on an exact match of weights, test tokens, batching and precision.",
    )
    eval_at_end: bool = True
    eval_steps: int | None = Field(
        None,
        gt=0,
        description="Every N optimizer steps, log margin reward and pairwise accuracy of the protagonist/policy "
        "on the test split (metrics.jsonl and TensorBoard eval/*): the curves of the paper's Fig. 5.",
    )

    @model_validator(mode="after")
    def _plain_output_dir(self) -> TrainConfig:
        check_output_dir(self.output_dir, self.method)
        if self.distributed.strategy == "fsdp" and self.mixed_precision == "fp16":
            raise ValueError(
                "distributed.strategy=fsdp trains in float32 or mixed_precision=bf16 (fp16 needs a loss scaler "
                "FSDP2 does not provide here)"
            )
        return self


class RMOptimConfig(OptimConfig):
    """The optimizer settings of `iopo train-rm` (a new head on a pretrained backbone: a larger rate, no warm-up)."""

    learning_rate: float = Field(1e-5, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)


class TrainRMConfig(Part):
    """`iopo train-rm`: a Bradley-Terry reward model (paper Eq. 2), saved as AutoModelForSequenceClassification."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: RMOptimConfig = Field(default_factory=RMOptimConfig)
    output_dir: str = Field("runs/rm", min_length=1, description="Run folder; the model goes to final/.")
    batching: Literal["auto", "shared", "plain"] = Field(
        "auto",
        description="As iopo train's: shared computes each pair's prompt once and packs pairs into rows of up to "
        "2 x data.max_length tokens, the head reading each answer's last token; auto uses it when the model allows "
        "it and the first batch's rewards agree with the plain forward's.",
    )
    trainable_layers: int | None = Field(
        None,
        gt=0,
        description="Train the score head, the final norm and only the top N decoder blocks; the embeddings and "
        "the blocks below stay frozen, so the backward stops N blocks from the top (LLaMA-Factory's freeze "
        "tuning). Unset = every parameter. Not with model.lora.",
    )
    seed: int = Field(42, ge=0, lt=2**32)
    mixed_precision: Precision = "no"
    logging_steps: int = Field(1, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="Log held-out accuracy every N steps.")
    eval_batch_size: int = Field(8, gt=0)
    overwrite: bool = Field(
        False, description="Allow writing into an output_dir that holds a finished model."
    )
    tensorboard: TensorBoard = True
    report_to: ReportTo = ["tensorboard"]
    push_to_hub: PushToHub = False
    hub_model_id: HubModelId = None
    hub_private: HubPrivate = True
    progress_bar: bool = True

    @model_validator(mode="after")
    def _push(self) -> TrainRMConfig:
        check_push(self)
        if self.trainable_layers is not None and self.model.lora:
            raise ValueError(
                "trainable_layers freezes the lower blocks of a full model; model.lora trains adapters"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, values: Any) -> Any:
        return TrainingParts._shorthands(values)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)
