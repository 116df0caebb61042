"""A function judge: any Python callable `f(prompt, answer) -> float` scores answers (a rule, a lexicon, a
classifier of your own), as TRL's reward functions do; the pairwise verdict comes from the score gap, as for a
reward model. Named `module:callable` (an importable module) or `path/to/file.py:callable`. Its verdicts are keyed
by the name and the bytes of the file that defines it, so an edited function is asked again. A score that is not a
finite number stops the run with the prompt's index: a NaN is an error, not a verdict."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from iopo.eval.judges.base import usage


def load_function(spec: str, name: str):
    """The callable named by `module:attr` or `file.py:attr`, and what its verdicts depend on (its source's hash)."""
    from iopo.config import ConfigError

    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ConfigError(
            f"judge '{name}': function '{spec}' must be 'module:callable' or 'file.py:callable'"
        )
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"judge '{name}': function file {path} not found")
            if str(path.parent) not in sys.path:  # its own imports of files beside it
                sys.path.insert(0, str(path.parent))
            loaded = importlib.util.spec_from_file_location(f"iopo_judge_{path.stem}", path)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as e:  # the user's module failed to import: say which and why, in one line
        raise ConfigError(f"judge '{name}': cannot import '{module_name}': {type(e).__name__}: {e}") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ConfigError(f"judge '{name}': '{module_name}' has no callable '{attr}'")
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        source = spec
    return function, hashlib.sha256(source.encode()).hexdigest()[:16]


class FunctionJudge:
    def __init__(self, name: str, cfg):
        self.name, self.cfg, self.modes = name, cfg, ["score"]
        self.function, digest = load_function(cfg.function, name)
        self.judge_id = f"function:{cfg.function}:{digest}"

    def pairwise(self, items):
        raise NotImplementedError("a function judge scores answers; its verdicts come from the score gap")

    def score(self, items) -> Iterator[tuple[int, dict, dict]]:
        from iopo.config import ConfigError

        for i, (prompt, answer) in enumerate(items):
            tick = time.perf_counter()
            value = self.function(prompt, answer)
            try:
                value = float(value)
            except (TypeError, ValueError):
                value = math.nan
            if not math.isfinite(value):
                raise ConfigError(
                    f"judge '{self.name}': {self.cfg.function} returned {value!r} for item {i}; a score must be "
                    "a finite number"
                )
            yield i, {"score": value, "valid": True}, usage(1, 0, 0, time.perf_counter() - tick)

    def close(self) -> None:
        self.function = None
