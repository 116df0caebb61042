"""A small client for OpenAI-compatible servers (OpenAI, vLLM, llama.cpp's llama-server): one POST with timeouts,
retries with exponential backoff and jitter on 429 / 5xx / timeouts / refused or reset connections / garbled
replies, and one-line errors that
name the URL. Standard library only; thread-safe (one request per call).

The API key is read from the environment variable the config names, at request time; it is never logged, stored or
put in an error message.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class ServerError(RuntimeError):
    """The server could not be reached or kept failing; the message is one line naming the URL. `attempts` and
    `seconds` say what the failure cost (the ledger counts failed requests too)."""

    def __init__(self, message: str, attempts: int = 0, seconds: float = 0.0):
        super().__init__(message)
        self.attempts, self.seconds = attempts, seconds


class BudgetSpent(ServerError):
    """The request allowance is used up: no more requests are sent (retries included)."""


class RequestAllowance:
    """How many more HTTP requests may be sent (a budget's remainder), shared by every thread of a judge."""

    def __init__(self, n: int):
        self.left = n
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.left <= 0:
                return False
            self.left -= 1
            return True


@dataclass
class Reply:
    body: dict
    attempts: int  # HTTP requests made, retries included
    seconds: float


@dataclass
class Endpoint:
    base_url: str
    api_key_env: str | None = None
    timeout_s: float = 120.0
    max_retries: int = 4
    backoff_s: float = 0.5  # first retry's wait; doubles each time, with jitter
    allowance: RequestAllowance | None = None  # a budget: no request (nor retry) is sent past it

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + "/" + path.lstrip("/")

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ServerError(f"the environment variable {self.api_key_env} (the API key) is not set")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def post(self, path: str, payload: dict) -> Reply:
        """POST JSON, return the parsed JSON reply. Retries what may pass on a retry; raises ServerError else."""
        url = self.url(path)
        data = json.dumps(payload).encode("utf-8")
        started = time.perf_counter()
        last = ""
        for attempt in range(1, self.max_retries + 2):
            if self.allowance is not None and not self.allowance.take():
                raise BudgetSpent(
                    f"{url}: the judges' request budget is spent", attempt - 1, time.perf_counter() - started
                )
            request = urllib.request.Request(url, data=data, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
                try:  # a garbled reply (a proxy's error page, a reply cut short) may pass on a retry
                    body = json.loads(raw.decode("utf-8"))
                except (ValueError, UnicodeDecodeError):
                    body = None
                if isinstance(body, dict):
                    return Reply(body, attempt, time.perf_counter() - started)
                last = "the reply is not JSON" if body is None else "the reply is not a JSON object"
                retry_after = None
            except urllib.error.HTTPError as e:
                detail = _error_text(e)
                if e.code not in RETRY_STATUS:
                    raise ServerError(
                        f"{url}: HTTP {e.code}: {detail}", attempt, time.perf_counter() - started
                    ) from None
                last = f"HTTP {e.code}: {detail}"
                retry_after = _retry_after(e)
            except TimeoutError:
                last, retry_after = f"no reply within {self.timeout_s:g} s", None
            except urllib.error.URLError as e:
                reason = e.reason
                if isinstance(reason, TimeoutError):
                    last = f"no reply within {self.timeout_s:g} s"
                else:
                    last = f"cannot connect ({_reason_text(reason)})"
                retry_after = None
            except (ConnectionError, OSError) as e:  # reset mid-reply, refused
                last, retry_after = f"connection failed ({_reason_text(e)})", None
            if attempt <= self.max_retries:
                wait = retry_after if retry_after is not None else self.backoff_s * 2 ** (attempt - 1)
                time.sleep(min(wait, 60.0) * (0.75 + 0.5 * random.random()))
        raise ServerError(
            f"{url}: {last} (after {self.max_retries + 1} attempts)",
            self.max_retries + 1,
            time.perf_counter() - started,
        )

    def get(self, path: str) -> dict:
        url = self.url(path)
        request = urllib.request.Request(url, headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            raise ServerError(f"{url}: HTTP {e.code}: {_error_text(e)}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(f"{url}: cannot connect ({_reason_text(getattr(e, 'reason', e))})") from None
        except ValueError:
            raise ServerError(f"{url}: the reply is not JSON") from None


def _reason_text(reason) -> str:
    text = str(getattr(reason, "strerror", None) or reason).strip()
    return text.splitlines()[0][:200] if text else type(reason).__name__


def _error_text(error: urllib.error.HTTPError) -> str:
    try:
        raw = error.read().decode("utf-8", "replace")
    except OSError:
        raw = ""
    try:
        message = json.loads(raw).get("error", raw)
        if isinstance(message, dict):
            message = message.get("message", message)
        raw = str(message)
    except (ValueError, AttributeError):
        pass
    raw = " ".join(raw.split())
    return (raw[:200] + "…") if len(raw) > 200 else (raw or error.reason or "error")


def _retry_after(error: urllib.error.HTTPError) -> float | None:
    value = error.headers.get("Retry-After") if error.headers else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def chat_text(body: dict) -> tuple[str | None, str | None]:
    """(message content, finish_reason) of the first choice of a chat or text completion reply."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None, None
    choice = choices[0]
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    return (text if isinstance(text, str) else None), choice.get("finish_reason")


def usage_of(body: dict) -> tuple[int, int]:
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
