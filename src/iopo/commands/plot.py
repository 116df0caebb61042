"""`iopo plot`: PNGs from run and eval folders (margin distributions, curves, win/tie/lose bars, training, online
rounds). Reads files only; never imports torch."""

from __future__ import annotations

from pathlib import Path

from iopo.config import ConfigError, PlotConfig
from iopo.io.log import get_logger
from iopo.report.plots import make_plots

log = get_logger(__name__)


def plot_command(cfg: PlotConfig) -> dict:
    if not cfg.inputs:
        raise ConfigError("name run or eval folders: iopo plot runs/quickstart evals/eval [output_dir=plots]")
    made = make_plots(cfg.inputs, cfg.output_dir)
    if not made:
        log.info("nothing to plot: no margins, eval curves, judged tables or training metrics in the inputs")
    for name, info in made.items():
        log.info(f"{Path(cfg.output_dir) / name}: {', '.join(info['series'])}")
    return made
