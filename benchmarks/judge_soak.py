"""Judges under a soak: `iopo eval` and `iopo online` asking over a thousand judgments of a local OpenAI-compatible
server that fails on purpose, while iopo itself is killed with -9 at random moments and the server is killed and
started again midway; then the store, the ledger and the server's own log are set side by side.

    python benchmarks/judge_soak.py [--seed 0] [--prompts 400] [--out benchmarks/results/judge_soak.json]

The server (this file, run as `... serve PORT LOG SEED`) answers each chat completion with a verdict or a 0-3 score
fixed by the question's text, or, by a seeded draw per request: a reply slower than the client's timeout, HTTP 500,
503, 429 with Retry-After, a garbled body, a connection closed without a reply, or a slow but timely reply. It
appends one line per request to its log (the question's hash, what it did, whether an answer went out), so its
count survives its own kill. The figures:
- questions asked and answers stored (each command must end with every question answered and stored once);
- answers the server gave more than once for one question (paid twice) and answers it gave that are not stored;
- the ledger's requests against the server's count of requests received (the difference is requests in flight
  when a kill -9 landed: sent, never recorded);
- the most requests one judgment took (bounded by max_retries + 1);
- an online run under max_judge_requests: its ledger never passes the budget, retries included.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIENT_TIMEOUT = 1.0  # judges.llm.timeout_s of the commands below
MAX_RETRIES = 4
FAULTS = {  # what the server does with a request, and how often
    "answer": 0.62,
    "slow": 0.08,  # answers after 0.4 s (within the client's timeout)
    "timeout": 0.05,  # answers after the client has given up
    "http500": 0.05,
    "http503": 0.05,
    "http429": 0.05,  # with Retry-After: 0.2
    "garbled": 0.05,  # 200 with a body that is not JSON
    "reset": 0.05,  # the connection closed without a reply
}


# ---------------------------------------------------------------- the server


def question_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class FaultyJudge(BaseHTTPRequestHandler):
    seed = 0
    log_path: Path
    counter = 0
    lock = threading.Lock()

    def log_message(self, *args) -> None:
        pass

    def _log(self, key: str, fault: str, answered: bool) -> None:
        with type(self).lock, open(type(self).log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "fault": fault, "answered": answered, "pid": os.getpid()}) + "\n")

    def do_POST(self) -> None:  # noqa: N802
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = payload["messages"][-1]["content"]
        key = question_key(question)
        with type(self).lock:
            type(self).counter += 1
            n = type(self).counter
        draw = random.Random(f"{type(self).seed}:{os.getpid()}:{n}").random()
        fault = "answer"
        for name, share in FAULTS.items():
            if draw < share:
                fault = name
                break
            draw -= share
        if fault in ("http500", "http503", "http429"):
            self.send_response(int(fault[4:]))
            if fault == "http429":
                self.send_header("Retry-After", "0.2")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "soak"}}')
            return self._log(key, fault, False)
        if fault == "reset":
            self.close_connection = True
            return self._log(key, fault, False)
        if fault == "garbled":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>502 Bad Gateway</html>")
            return self._log(key, fault, False)
        if fault in ("slow", "timeout"):
            time.sleep(0.4 if fault == "slow" else CLIENT_TIMEOUT + 0.6)
        schema = ((payload.get("response_format") or {}).get("json_schema") or {}).get("name")
        value = int(key, 16)
        content = {"winner": "AB"[value % 2]} if schema == "verdict" else {"score": value % 4}
        body = json.dumps(
            {
                "choices": [{"message": {"content": json.dumps(content)}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(question) // 4, "completion_tokens": 6},
            }
        ).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            answered = fault != "timeout"  # a late answer reaches no one
        except OSError:
            answered = False
        self._log(key, fault, answered)


def serve(port: int, log: Path, seed: int) -> None:
    FaultyJudge.seed, FaultyJudge.log_path = seed, log
    server = ThreadingHTTPServer(("127.0.0.1", port), FaultyJudge)
    server.daemon_threads = True
    server.serve_forever()


class Server:
    started: list = []  # every server process this soak started, stopped at its end whatever happens

    def __init__(self, port: int, log: Path, seed: int):
        self.port, self.log, self.seed, self.proc = port, log, seed, None
        self.url = f"http://127.0.0.1:{port}/v1"

    def start(self) -> None:
        args = [sys.executable, __file__, "serve", str(self.port), str(self.log), str(self.seed)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        Server.started.append(self.proc)
        time.sleep(0.5)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


# ---------------------------------------------------------------- the soak


def run_until_done(args: list[str], rng: random.Random, server: Server, kills: int, restart_at: int) -> dict:
    """Run `iopo *args` again and again until it ends well: the first `kills` runs are killed with -9 at a random
    moment; during run `restart_at` the server is killed and started again. Returns what happened."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    happened = {"runs": 0, "killed": 0, "failed": 0, "server_restarts": 0, "last_stdout": ""}
    while True:
        happened["runs"] += 1
        run = happened["runs"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "iopo", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if run == restart_at:
            time.sleep(rng.uniform(4, 8))
            server.kill()
            time.sleep(1.5)
            server.start()
            happened["server_restarts"] += 1
        if run <= kills:
            try:
                proc.wait(timeout=rng.uniform(4, 14))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                happened["killed"] += 1
        out, err = proc.communicate()
        if proc.returncode == 0:
            happened["last_stdout"] = out[-3000:]
            return happened
        if proc.returncode not in (-signal.SIGKILL, 1):
            raise SystemExit(f"iopo {' '.join(args[:1])} ended with {proc.returncode}:\n{err[-3000:]}")
        if proc.returncode == 1:
            happened["failed"] += 1  # a judgment that failed for good (one line); the rerun goes on
        if run > 60:
            raise SystemExit("no end after 60 runs")


def stored_questions(store: Path) -> tuple[dict[str, int], dict]:
    """The questions the store holds answers to (hashed as the server hashes them), and its ledger."""
    sys.path.insert(0, str(ROOT / "src"))
    from iopo.data.tokenize import prompt_as_text
    from iopo.eval.judges import prompts as P

    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    held: dict[str, int] = {}
    for kind, prompt, a, b in db.execute("SELECT kind, prompt, answer_a, answer_b FROM judgments"):
        try:
            prompt = json.loads(prompt)
        except ValueError:
            pass
        text = prompt_as_text(prompt)
        if kind == "pairwise":
            user = P.PAIRWISE.format(prompt=text, answer_a=a, answer_b=b)
        else:
            user = P.SCORE.format(prompt=text, answer=a, rubric=P.RUBRIC)
        key = question_key(user)
        held[key] = held.get(key, 0) + 1
    rows = db.execute("SELECT requests FROM ledger").fetchall()
    ledger = {
        "requests": sum(r[0] for r in rows),
        "rows": len(rows),
        "most_per_row": max((r[0] for r in rows), default=0),
    }
    db.close()
    return held, ledger


def figures(log_lines: list[dict], held: dict[str, int], ledger: dict) -> dict:
    asked = {line["key"] for line in log_lines}
    answered: dict[str, int] = {}
    faults: dict[str, int] = {}
    for line in log_lines:
        faults[line["fault"]] = faults.get(line["fault"], 0) + 1
        if line["answered"]:
            answered[line["key"]] = answered.get(line["key"], 0) + 1
    return {
        "questions_asked": len(asked),
        "answers_stored": sum(held.values()),
        "questions_stored_twice": sum(1 for n in held.values() if n > 1),
        "questions_unanswered_in_the_end": len(asked - set(held)),
        "server_requests": len(log_lines),
        "server_requests_by_what_it_did": dict(sorted(faults.items())),
        "server_answers": sum(answered.values()),
        "answers_paid_twice": sum(n - 1 for n in answered.values()),
        "answers_given_but_not_stored": len(set(answered) - set(held)),
        "ledger_requests": ledger["requests"],
        "requests_sent_but_not_in_the_ledger": len(log_lines) - ledger["requests"],
        "most_requests_for_one_judgment": ledger["most_per_row"],
        "retry_bound": MAX_RETRIES + 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prompts", type=int, default=400, help="held-out prompts of the eval (up to 4 questions each)"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "judge_soak.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import save_tiny, write_pairs

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="judge-soak-"))
    base, other = save_tiny(work / "base", seed=0), save_tiny(work / "other", seed=1)
    data = write_pairs(work / "pairs.jsonl", n=2 * args.prompts + 60)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Server(port, work / "server.jsonl", args.seed)
    server.start()
    judge = [
        f"judges.llm.base_url={server.url}",
        "judges.llm.type=openai",
        f"judges.llm.timeout_s={CLIENT_TIMEOUT}",
        f"judges.llm.max_retries={MAX_RETRIES}",
        "judges.llm.concurrency=4",
    ]
    tiny = ["data.max_length=64", "data.max_prompt_length=32", "progress_bar=false"]
    started = time.time()
    results: dict = {
        "seed": args.seed,
        "faults": FAULTS,
        "client": {"timeout_s": CLIENT_TIMEOUT, "max_retries": MAX_RETRIES, "concurrency": 4},
    }

    # --- iopo eval: pairwise verdicts in both orders and 0-3 scores of every answer
    mark = len(server.log.read_text().splitlines()) if server.log.is_file() else 0
    ev = work / "ev"
    eval_args = [
        "eval",
        str(other),
        f"baseline={base}",
        f"data={data}",
        f"data.test_size={args.prompts}",
        f"output_dir={ev}",
        "generation.max_new_tokens=4",
        "bootstrap=20",
        *tiny,
        *judge,
    ]
    happened = run_until_done(eval_args, rng, server, kills=4, restart_at=2)
    lines = [json.loads(x) for x in server.log.read_text().splitlines()][mark:]
    held, ledger = stored_questions(ev / "store.sqlite")
    results["eval"] = {
        **{k: v for k, v in happened.items() if k != "last_stdout"},
        **figures(lines, held, ledger),
    }

    # --- iopo online: 3 rounds of Iter-DPO annotated pairwise by the same server, scored by it each round
    mark = len(server.log.read_text().splitlines())
    on = work / "on"
    online = [
        "online",
        "method=iter_dpo",
        f"model={base}",
        f"data={data}",
        "data.test_size=40",
        f"output_dir={on}",
        "rounds=3",
        "steps_per_round=2",
        "prompts_per_round=40",
        "generation.n=2",
        "generation.max_new_tokens=4",
        "score_prompts=20",
        "bootstrap=20",
        "optim.batch_size=2",
        *tiny,
        *[a.replace("judges.llm.", "judge.") for a in judge],
    ]
    happened = run_until_done(online, rng, server, kills=4, restart_at=3)
    lines = [json.loads(x) for x in server.log.read_text().splitlines()][mark:]
    held, ledger = stored_questions(on / "store.sqlite")
    summary = json.loads((on / "online.json").read_text())
    results["online"] = {
        **{k: v for k, v in happened.items() if k != "last_stdout"},
        **figures(lines, held, ledger),
        "status": summary["status"],
    }

    # --- a budget: the same online run in a new folder under max_judge_requests, raised twice. 90 lets round 1's
    # judging (80 questions) start, and its retries reach the budget inside the stage. A judgment that fails for
    # good (five faults in a row) ends a run with status 1: it is run again under the same budget.
    budget_runs = []
    bud = work / "budget"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for budget in (90, 200, 100000):
        cmd = [a if not a.startswith("output_dir=") else f"output_dir={bud}" for a in online]
        for _ in range(10):
            done = subprocess.run(
                [sys.executable, "-m", "iopo", *cmd, f"max_judge_requests={budget}"],
                env=env,
                capture_output=True,
                text=True,
            )
            status = json.loads((bud / "online.json").read_text())["status"]
            _, ledger = stored_questions(bud / "store.sqlite")
            budget_runs.append(
                {
                    "budget": budget,
                    "exit": done.returncode,
                    "ledger_requests": ledger["requests"],
                    "within": ledger["requests"] <= budget,
                    "status": status[:200],
                }
            )
            if done.returncode == 0:
                break
    results["budget"] = budget_runs
    server.kill()
    results["seconds"] = round(time.time() - started)
    results["judgments_in_all"] = results["eval"]["questions_asked"] + results["online"]["questions_asked"]
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    else:
        try:
            main()
        finally:  # a soak that stops early (a run that never ends well) leaves no server behind
            for proc in Server.started:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
