"""iopo: Indirect Online Preference Optimization (Wang et al., IJCAI 2025) and its baselines.

The package's layers, lowest first (each imports only those below it; tests/test_layers.py checks it):
core (pure math) < config < data, io (edges) < engine, eval < online, rate, report < commands < cli.

The names below are the Python API, handed on lazily (importing iopo loads neither torch nor transformers):
`iopo.train(cfg)`, `iopo.evaluate(cfg)`, `iopo.online(cfg)`, `iopo.train_rm(cfg)`, `iopo.load_config(...)`, the
config classes, `iopo.load_model`, and the modules `iopo.losses` and `iopo.methods`.
"""

import importlib

__version__ = "0.1.0"

_HOMES = {
    "train": ("iopo.commands.train", "train"),
    "train_rm": ("iopo.commands.train_rm", "train_rm"),
    "evaluate": ("iopo.commands.evaluate", "evaluate"),
    "online": ("iopo.commands.online", "online"),
    "generate": ("iopo.commands.generate", "generate_command"),
    "load_config": ("iopo.config", "load_config"),
    "ConfigError": ("iopo.config", "ConfigError"),
    "TrainConfig": ("iopo.config", "TrainConfig"),
    "TrainRMConfig": ("iopo.config", "TrainRMConfig"),
    "EvalConfig": ("iopo.config", "EvalConfig"),
    "OnlineConfig": ("iopo.config", "OnlineConfig"),
    "load_model": ("iopo.io.models", "load_model"),
    "load_tokenizer": ("iopo.io.models", "load_tokenizer"),
    "losses": ("iopo.core.losses", None),
    "methods": ("iopo.core.methods", None),
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'iopo' has no attribute {name!r}")
    module, attr = _HOMES[name]
    found = importlib.import_module(module)
    return found if attr is None else getattr(found, attr)
