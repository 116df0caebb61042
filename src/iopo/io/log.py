"""The package's one logger: `logging.getLogger("iopo")` and its children (each module logs under its `__name__`).

Messages go to the terminal as "[iopo] message" (information on stdout, warnings on stderr as "[iopo] warning:
..."), from the main process only: under torchrun the other processes say nothing but warnings. Tables and
summaries are logged with `extra=PLAIN` and print as they are. Progress bars (tqdm) are apart. The stream is looked
up at each message, so pytest's capture and notebooks see what a terminal would; to silence iopo, raise the level
of `logging.getLogger("iopo")`.
"""

from __future__ import annotations

import logging
import sys

PLAIN = {"plain": True}  # extra= of a message printed without the prefix (a table, a summary)
_state = {"main": True}


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if getattr(record, "plain", False):
            return text
        return f"[iopo] warning: {text}" if record.levelno >= logging.WARNING else f"[iopo] {text}"


class _Handler(logging.Handler):
    """stdout for information, stderr for warnings and errors, each looked up when a message comes."""

    def __init__(self):
        super().__init__()
        self.setFormatter(_Formatter())

    def filter(self, record: logging.LogRecord) -> bool:
        return _state["main"] or record.levelno >= logging.WARNING

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # a closed stream must not stop a run
            self.handleError(record)


def _install() -> logging.Logger:
    root = logging.getLogger("iopo")
    if not any(isinstance(h, _Handler) for h in root.handlers):
        root.addHandler(_Handler())
        root.setLevel(logging.INFO)
        root.propagate = False  # one copy of each message, whatever the application's own logging does
    return root


logger = _install()


def set_main_process(is_main: bool) -> None:
    """Say whether this process is the main one (rank 0): only it prints information."""
    _state["main"] = bool(is_main)


def get_logger(name: str) -> logging.Logger:
    """The logger of a module of iopo (`get_logger(__name__)`), under the package's one handler."""
    return logging.getLogger(name)
