"""The rating page of `iopo rate EVAL_DIR`: a local web page where people rate an eval's answers blind (0-3 and a
preference).

The standard library's threading HTTP server, one page and a small JSON API, nothing else served:

    GET  /               the page (its script and style inline, allowed by a per-response nonce)
    POST /api/hello      {rater}                                -> {rater, progress}
    POST /api/next       {rater}                                -> {pair | null, progress}
    POST /api/rate       {rater, item, score_a, score_b, preference, seconds} -> {id, progress}
    POST /api/skip       {rater, item, seconds}                 -> {id, progress}
    POST /api/previous   {rater, before}                        -> {pair | null, progress}

Every POST carries the page's token (header X-IOPO-Token, kept in the store so a restarted server accepts its
pages) and a JSON body; bound to a loopback address, requests must name that address as their Host (no DNS
rebinding). Prompts and answers go out as JSON strings and the page sets them as text, never as HTML. Each
rating is written to the eval's store.sqlite when it is submitted; on exit (Ctrl-C, SIGTERM) the human tables go
into eval.json and human/ratings.{csv,jsonl} (iopo.commands.rate). No torch.
"""

from __future__ import annotations

import hmac
import html
import json
import secrets
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from iopo.io.log import get_logger
from iopo.rate.book import RatingBook, RatingError, check_name

log = get_logger(__name__)

MAX_BODY = 64 * 1024
REQUEST_DEADLINE = 30.0  # seconds a whole request may take to arrive, however slowly it trickles in
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def page_template() -> str:
    return resources.files("iopo").joinpath("assets/rate/page.html").read_text(encoding="utf-8")


def rubric_html() -> str:
    from iopo.eval.judges.prompts import RUBRIC

    items = []
    for line in RUBRIC.splitlines():
        score, _, text = line.partition(" = ")
        items.append(f"<dt>{html.escape(score)}</dt><dd>{html.escape(text)}</dd>")
    return "".join(items)


class RatingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, book: RatingBook, host: str, port: int):
        self.book = book
        self.token = book.secret
        self.template = page_template().replace("{{rubric}}", rubric_html())
        self.bind_host = host
        family_host = host.strip("[]")
        if ":" in family_host:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__((family_host, port), Handler)
        self.port = self.server_address[1]
        shown = f"[{family_host}]" if ":" in family_host else family_host
        self.url = f"http://{'127.0.0.1' if family_host in ('0.0.0.0', '') else shown}:{self.port}/"
        self.allowed_hosts = (
            {f"{h}:{self.port}" for h in ("127.0.0.1", "localhost", "[::1]")}
            if family_host in LOOPBACK
            else None  # bound to a public address on purpose: any Host
        )
        self.request_deadline = REQUEST_DEADLINE

    def handle_error(self, request, client_address) -> None:
        """A connection that broke (a client gone, one cut at its deadline): one line, no traceback."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            log.warning(f"rate: a request from {client_address[0]} failed: {type(error).__name__}: {error}")


class Handler(BaseHTTPRequestHandler):
    server: RatingServer
    server_version = "iopo-rate"
    sys_version = ""
    timeout = 30  # a client that stops sending (a Content-Length larger than its body) frees its thread

    def setup(self) -> None:
        """A watchdog for the whole request: a client sending a byte now and then (each within `timeout`) is cut at
        the server's request deadline with a 408, before anything it sent is used."""
        super().setup()
        self._arrived = threading.Event()
        self._watchdog = threading.Timer(self.server.request_deadline, self._too_slow)
        self._watchdog.daemon = True
        self._watchdog.start()

    def finish(self) -> None:
        self._arrived.set()
        self._watchdog.cancel()
        super().finish()

    def _too_slow(self) -> None:
        if self._arrived.is_set():
            return
        self._arrived.set()
        body = json.dumps({"error": "the request took too long to arrive"}).encode("utf-8")
        head = (
            "HTTP/1.0 408 Request Timeout\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        try:
            self.request.sendall(head.encode("ascii") + body)
            self.request.shutdown(socket.SHUT_RDWR)
        except OSError:  # the client left already
            pass

    def log_message(self, format, *args) -> None:  # quiet: ratings are the log
        pass

    # ------------------------------------------------------------ responses

    def _headers(self, status: int, content_type: str, length: int, nonce: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header(
            "Content-Security-Policy",
            "default-src 'none'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            + (f"; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'" if nonce else ""),
        )
        self.end_headers()

    def _json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self._headers(status, "application/json; charset=utf-8", len(body))
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _host_ok(self) -> bool:
        allowed = self.server.allowed_hosts
        return allowed is None or self.headers.get("Host", "") in allowed

    # ------------------------------------------------------------ methods

    def _on_time(self) -> bool:
        """The request has arrived whole within the deadline (else the watchdog has answered it)."""
        if self._arrived.is_set():
            return False
        self._arrived.set()
        return True

    def do_GET(self) -> None:
        if not self._on_time():
            return
        if not self._host_ok():
            return self._error(421, "wrong host")
        if self.path.split("?", 1)[0] != "/":
            return self._error(404, "not found")
        nonce = secrets.token_urlsafe(16)
        body = (
            self.server.template.replace("{{nonce}}", nonce)
            .replace("{{token}}", self.server.token)
            .encode("utf-8")
        )
        self._headers(200, "text/html; charset=utf-8", len(body), nonce)
        self.wfile.write(body)

    def do_POST(self) -> None:
        if not self._host_ok():
            return self._error(421, "wrong host")
        action = {
            "/api/hello": self._hello,
            "/api/next": self._next,
            "/api/rate": self._rate,
            "/api/skip": self._skip,
            "/api/previous": self._previous,
        }.get(self.path)
        if action is None:
            return self._error(404, "not found")
        sent = self.headers.get("X-IOPO-Token", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(sent, self.server.token.encode("utf-8")):
            return self._error(403, "the page is out of date or not this server's: reload it")
        if not self.headers.get("Content-Type", "").startswith("application/json"):
            return self._error(415, "send JSON")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return self._error(400, "bad Content-Length")
        if not 0 < length <= MAX_BODY:
            return self._error(413, "request too large" if length > MAX_BODY else "empty request")
        raw = self.rfile.read(length)
        if not self._on_time():
            return
        try:
            body = json.loads(raw.decode("utf-8"))
            if not isinstance(body, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nesting thousands deep
            return self._error(400, "the request is not a JSON object")
        try:
            self._json(200, action(body))
        except RatingError as e:
            self._error(400, str(e))
        except Exception as e:  # a bug of ours: one line in the console, a JSON error for the page
            log.warning(f"rate: {self.path}: {type(e).__name__}: {e}")
            self._error(500, "the server failed on this request; see its console")

    def do_PUT(self) -> None:
        self._error(405, "method not allowed")

    do_DELETE = do_PATCH = do_PUT

    # ------------------------------------------------------------ API

    def _rater(self, body: dict) -> str:
        return check_name(body.get("rater"))

    def _hello(self, body: dict) -> dict:
        rater = self._rater(body)
        return {"rater": rater, "progress": self.server.book.progress(rater)}

    def _next(self, body: dict) -> dict:
        rater = self._rater(body)
        book = self.server.book
        pair = book.next_pair(rater)
        return {"pair": pair, "progress": book.progress(rater)}

    def _rate(self, body: dict) -> dict:
        rater = self._rater(body)
        book = self.server.book
        rid = book.rate(
            rater,
            str(body.get("item")),
            body.get("score_a"),
            body.get("score_b"),
            body.get("preference"),
            body.get("seconds"),
        )
        return {"id": rid, "progress": book.progress(rater)}

    def _skip(self, body: dict) -> dict:
        rater = self._rater(body)
        book = self.server.book
        rid = book.skip(rater, str(body.get("item")), body.get("seconds"))
        return {"id": rid, "progress": book.progress(rater)}

    def _previous(self, body: dict) -> dict:
        rater = self._rater(body)
        before = body.get("before")
        if before is not None and (isinstance(before, bool) or not isinstance(before, int)):
            raise RatingError("before is a rating id")
        book = self.server.book
        return {"pair": book.previous(rater, before), "progress": book.progress(rater)}
