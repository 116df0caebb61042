"""Defaults < YAML file < `key.sub=value` overrides, validated into a command's config; and the comparison of a
saved config with a new one (resume, continue)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from iopo.config.base import ConfigError
from iopo.config.train import TrainConfig

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


def commented_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (it loads back as the same config) with each field's help above it as a comment:
    what `iopo COMMAND --print-config` shows."""
    lines: list[str] = []

    def walk(model: BaseModel, pad: str) -> None:
        data = model.model_dump(mode="json")
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if field.description:
                lines.append(f"{pad}# {' '.join(field.description.split())}")
            if isinstance(value, BaseModel):
                lines.append(f"{pad}{name}:")
                walk(value, pad + "  ")
            elif isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
                lines.append(f"{pad}{name}:")
                for key, item in value.items():
                    lines.append(f"{pad}  {yaml.safe_dump(key).splitlines()[0]}:")
                    walk(item, pad + "    ")
            else:
                dumped = yaml.safe_dump({name: data[name]}, sort_keys=False, allow_unicode=True, width=1000)
                lines.extend(pad + line for line in dumped.rstrip("\n").splitlines())

    walk(cfg, "")
    return "\n".join(lines) + "\n"
