"""Typed settings for `iopo train`: defaults < YAML file < `key.sub=value` overrides.

One config per command, composed one level deep of small parts (model, data, loss, iopo, optim). Validation is
pydantic's; unknown keys and bad values fail with a message that names the key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

METHODS = ("iopo", "dpo", "ipo", "hinge", "kto_pair", "sft")


class ConfigError(ValueError):
    """A bad setting; its message names the key."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    split_seed: int = Field(42, description="Seed of the prompt-grouped train/test split.")
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
    max_train_samples: int | None = Field(None, gt=0)
    max_eval_samples: int | None = Field(None, gt=0)
    skip_invalid: bool | None = Field(
        None,
        description="Count bad rows, write them to rejects.jsonl and go on; unset = true for the embedded data "
        "(its 4 known empty replies are reported), false for yours (the first bad row stops the run).",
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
        None, gt=0, description="Game rounds (Alg. 1 N_iter); unset = enough to cover optim.num_epochs."
    )
    n_mu: int = Field(1, gt=0, description="Protagonist optimizer steps per round (N_mu).")
    n_nu: int = Field(1, gt=0, description="Adversary optimizer steps per round (N_nu).")
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
    num_epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(
        None, gt=0, description="Optimizer steps (baselines); overrides num_epochs."
    )


class TrainConfig(_Part):
    method: Literal["iopo", "dpo", "ipo", "hinge", "kto_pair", "sft"] = "iopo"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    iopo: IOPOConfig = Field(default_factory=IOPOConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    output_dir: str = Field("runs/{method}", description="Run folder; {method} is filled in.")
    seed: int = 42
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
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
    eval_at_end: bool = True
    export: bool = Field(True, description="Write the protagonist/policy as a from_pretrained folder.")
    merge_lora: bool = Field(True, description="LoRA: export merged weights (else the adapter folder).")
    logps_chunk_tokens: int = Field(1024, gt=0, description="Completion tokens per log-softmax chunk.")
    tensorboard: bool = True
    progress_bar: bool = True

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, values: Any) -> Any:
        # `model=path` and `data=path` are shorthands for model.name_or_path / data.path.
        if isinstance(values, dict):
            values = dict(values)
            if isinstance(values.get("model"), str):
                values["model"] = {"name_or_path": values["model"]}
            if isinstance(values.get("data"), str):
                values["data"] = {"path": values["data"]}
        return values

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(method=self.method))


_SHORTHANDS = {"model": "name_or_path", "data": "path"}
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
        if key in ("output_dir", "data.path", "model.name_or_path", "model", "data", "data.test_path"):
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
            parts.append(f"'{loc or '(top)'}': {e['msg']} (got {e.get('input')!r})")
    return f"bad config{source}: " + "; ".join(parts)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Resolve defaults < YAML file < overrides into a validated TrainConfig."""
    tree: dict = {}
    source = ""
    if path is not None:
        source = f" ({path})"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of keys, got {type(loaded).__name__}")
        tree = TrainConfig._shorthands(loaded or {})
    if overrides:
        tree = _merge(tree, TrainConfig._shorthands(parse_overrides(overrides)))
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
