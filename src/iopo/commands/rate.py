"""`iopo rate EVAL_DIR`: serve the blind rating page until Ctrl-C / SIGTERM, then write the human tables into
eval.json and human/ratings.{csv,jsonl}; `serve=false` writes those without serving. Never imports torch."""

from __future__ import annotations

import errno
import signal
from pathlib import Path

from iopo.config import ConfigError, RateConfig
from iopo.io import runfolder
from iopo.io.log import PLAIN, get_logger
from iopo.rate.book import RatingBook
from iopo.rate.server import RatingServer
from iopo.rate.tables import format_human, write_outputs

log = get_logger(__name__)


def open_book(cfg: RateConfig) -> RatingBook:
    if not cfg.eval_dir:
        raise ConfigError("name the eval folder to rate: iopo rate evals/quickstart")
    return RatingBook(
        Path(cfg.eval_dir),
        models=cfg.models or None,
        overlap=cfg.overlap,
        seed=cfg.seed,
        max_pairs=cfg.max_pairs,
        claim_minutes=cfg.claim_minutes,
    )


def rate_command(cfg: RateConfig) -> dict:
    """Serve the rating page until Ctrl-C / SIGTERM, then write the human tables; or only write them. The eval
    folder is held for the whole time (no `iopo eval` or second `iopo rate` writes it meanwhile)."""
    if not cfg.eval_dir:
        raise ConfigError("name the eval folder to rate: iopo rate evals/quickstart")
    if not Path(cfg.eval_dir).is_dir():
        raise ConfigError(f"{cfg.eval_dir}: no such eval folder")
    with runfolder.hold(Path(cfg.eval_dir), "iopo rate", what="eval folder"):
        return _rate(cfg)


def _rate(cfg: RateConfig) -> dict:
    book = open_book(cfg)
    try:
        if cfg.serve:
            try:
                server = RatingServer(book, cfg.host, cfg.port)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"port {cfg.port} on {cfg.host} is in use: pass port=0 for any free port, or another port"
                    ) from None
                raise ConfigError(f"cannot serve on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
            # Ctrl-C and SIGTERM both end the serving and write the tables (SIGINT too when a shell started the
            # server in the background with SIGINT ignored).
            previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
            shared = (
                ""
                if server.allowed_hosts is not None
                else " (bound to a non-loopback address: anyone who reaches it can rate)"
            )
            log.info(
                f"rating {len(book.order)} pairs of {book.eval_dir} ({len(book.shared)} shown to every rater)"
            )
            log.info(f"open {server.url} in a browser{shared}; Ctrl-C stops the server and writes the tables")
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                pass
            finally:
                server.server_close()
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        summary = write_outputs(book, cfg.bootstrap, cfg.confidence)
        log.info(format_human(summary, book.results["baseline"]), extra=PLAIN)
        log.info(
            f"human tables in {book.eval_dir / 'eval.json'}; ratings in {book.eval_dir / 'human'}/ratings.{{csv,jsonl}}"
        )
        return summary
    finally:
        book.close()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
