"""An LLM judge behind any OpenAI-compatible chat-completions server (OpenAI, vLLM, llama.cpp's llama-server).

Pairwise verdicts and 0-3 rubric scores at temperature 0, `concurrency` requests at a time, each yielded as it
arrives. The reply is held to a JSON schema where the server supports one (a server that refuses `response_format`
is asked again without it, once, and the fallback parser is used from then on). Money = tokens x the configured
prices. The API key comes from the environment variable the config names and is never logged or written.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed

from iopo.data.tokenize import prompt_as_text
from iopo.eval.judges import prompts as P
from iopo.eval.judges.base import usage
from iopo.io.openai_client import Endpoint, RequestAllowance, ServerError, chat_text, usage_of
from iopo.io.store import text_key


class OpenAIJudge:
    def __init__(self, name: str, cfg):
        self.name, self.cfg = name, cfg
        self.modes = cfg.effective_modes()
        self.endpoint = Endpoint(cfg.base_url, cfg.api_key_env, cfg.timeout_s, cfg.max_retries)
        # Who answers: the model name when given (the same model behind another URL or port gives the same
        # verdicts), else the server's URL.
        who = cfg.api_model or cfg.base_url.rstrip("/")
        identity = [who, cfg.max_tokens, cfg.json_schema, P.TEMPLATE_VERSION]
        self.judge_id = "openai:" + text_key(*identity)[:20]
        self._schema_ok = cfg.json_schema != "off"
        self._lock = threading.Lock()

    def limit_requests(self, n: int | None) -> None:
        """Send at most n more HTTP requests, retries included (None: no limit); past it, BudgetSpent."""
        self.endpoint.allowance = None if n is None else RequestAllowance(n)

    def _ask(self, user: str, schema_name: str, schema: dict) -> tuple[str | None, dict]:
        payload = {
            "messages": [{"role": "system", "content": P.SYSTEM}, {"role": "user", "content": user}],
            "temperature": 0.0,
            "max_tokens": self.cfg.max_tokens,
            "seed": 0,
        }
        if self.cfg.api_model:
            payload["model"] = self.cfg.api_model
        started, attempts = time.perf_counter(), 0
        if self._schema_ok:
            if self.cfg.json_schema == "enum":  # the bare value, as a string: "A" / "2" (a few tokens)
                field = schema["properties"][next(iter(schema["properties"]))]
                schema = {"type": "string", "enum": [str(v) for v in field["enum"]]}
            with_schema = {
                **payload,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": schema_name, "schema": schema, "strict": True},
                },
            }
            try:
                reply = self.endpoint.post("chat/completions", with_schema)
            except ServerError as e:
                if "HTTP 400" not in str(e) and "HTTP 422" not in str(e):
                    raise
                with self._lock:  # the server does not take response_format: parse free text from now on
                    self._schema_ok = False
                attempts += 1
                reply = self.endpoint.post("chat/completions", payload)
        else:
            reply = self.endpoint.post("chat/completions", payload)
        text, _ = chat_text(reply.body)
        n_prompt, n_completion = usage_of(reply.body)
        cost = (
            n_prompt / 1000 * self.cfg.price_per_1k_prompt_tokens
            + n_completion / 1000 * self.cfg.price_per_1k_completion_tokens
        )
        spent = usage(attempts + reply.attempts, n_prompt, n_completion, time.perf_counter() - started, cost)
        return text, spent

    def _run(self, jobs: list, ask) -> Iterator[tuple[int, dict, dict]]:
        """Each job's result as it is ready. When one fails for good, no job not yet sent is sent, but the answers
        of those already in flight are still handed on (to be stored: they are paid for) before the failure is
        raised."""
        failed = threading.Event()

        def guarded(*job):
            if failed.is_set():
                return None  # not sent
            try:
                return ask(*job)
            except Exception:
                failed.set()
                raise

        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            futures = {pool.submit(guarded, *job): i for i, job in enumerate(jobs)}
            failure = None
            try:
                for future in as_completed(futures):
                    try:
                        outcome = future.result()
                    except Exception as error:
                        failure = failure or error
                        continue
                    if outcome is not None:
                        yield futures[future], *outcome
            finally:
                for future in futures:
                    future.cancel()
            if failure is not None:
                raise failure

    def pairwise(self, items) -> Iterator[tuple[int, dict, dict]]:
        def ask(prompt, answer_a, answer_b):
            user = P.PAIRWISE.format(prompt=prompt_as_text(prompt), answer_a=answer_a, answer_b=answer_b)
            text, spent = self._ask(user, "verdict", P.PAIRWISE_SCHEMA)
            winner = P.parse_winner(text)
            return {"winner": winner, "valid": winner is not None, "raw": text}, spent

        yield from self._run(items, ask)

    def score(self, items) -> Iterator[tuple[int, dict, dict]]:
        def ask(prompt, answer):
            user = P.SCORE.format(prompt=prompt_as_text(prompt), answer=answer, rubric=P.RUBRIC)
            text, spent = self._ask(user, "score", P.SCORE_SCHEMA)
            value = P.parse_score(text)
            return {"score": value, "valid": value is not None, "raw": text}, spent

        yield from self._run(items, ask)

    def close(self) -> None:
        pass
