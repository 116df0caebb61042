"""`iopo report`: one Markdown report (settings, metrics, judged tables with intervals, ledgers, figures) from run
and eval folders. Reads files only; never imports torch."""

from __future__ import annotations

from pathlib import Path

from iopo.config import ConfigError, ReportConfig
from iopo.io.log import get_logger
from iopo.report.markdown import write_report

log = get_logger(__name__)


def report_command(cfg: ReportConfig) -> Path:
    if not cfg.inputs:
        raise ConfigError(
            "name run or eval folders: iopo report runs/quickstart evals/eval [output=report.md]"
        )
    path = write_report(cfg.inputs, cfg.output, cfg.title)
    log.info(f"report written to {path}")
    return path
