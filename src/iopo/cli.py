"""`iopo train [--config FILE.yaml] [key=value ...] [--print-config]`: a thin shell over iopo.trainer.train."""

from __future__ import annotations

import argparse
import sys

from iopo.config import ConfigError, dump_config, load_config
from iopo.data_formats import DataError

USAGE_EPILOG = """\
overrides are key=value pairs over the YAML file, e.g.
  iopo train --config configs/quickstart.yaml method=dpo optim.learning_rate=1e-6 model.lora=true
  iopo train model=HuggingFaceTB/SmolLM2-360M-Instruct data=my_pairs.jsonl
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iopo", description="Preference optimization: IOPO and its baselines."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train with IOPO or a baseline, then export and evaluate",
        epilog=USAGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", "-c", help="YAML config file (see configs/)")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        from iopo.trainer import train

        train(cfg)
    except (ConfigError, DataError, FileNotFoundError) as e:  # the user's input, said in one line
        print(f"iopo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
