"""`iopo COMMAND [--config FILE.yaml] [key=value ...] [--print-config]`: a name table of commands, each a typed config
and a plain function. The same rules everywhere: defaults < YAML file < overrides, unknown keys and bad values stop
with one line naming the key, and bad input in general is one line on stderr with exit status 2."""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from iopo import config as C
from iopo.config import ConfigError, load_config
from iopo.config.loading import commented_config
from iopo.data.files import DataError


@dataclass(frozen=True)
class Command:
    schema: type
    target: str  # "module:function", imported only when the command runs (plots and reports never load torch)
    help: str
    positional: str | None = None  # config list field that bare (non key=value) arguments fill
    example: str = ""


COMMANDS = {
    "train": Command(
        C.TrainConfig,
        "iopo.commands.train:train",
        "train with IOPO or a baseline, then export and evaluate",
        example="iopo train --config configs/quickstart.yaml method=dpo optim.learning_rate=1e-6 model.lora=true",
    ),
    "train-rm": Command(
        C.TrainRMConfig,
        "iopo.commands.train_rm:train_rm",
        "train a Bradley-Terry reward model (a judge) on preference data",
        example="iopo train-rm --config configs/rm.yaml data=my_pairs.jsonl",
    ),
    "generate": Command(
        C.GenerateConfig,
        "iopo.commands.generate:generate_command",
        "answers to a split's prompts from a model or an OpenAI-compatible server, as JSON Lines",
        example="iopo generate model=runs/quickstart generation.temperature=0 output=answers.jsonl",
    ),
    "eval": Command(
        C.EvalConfig,
        "iopo.commands.evaluate:evaluate",
        "models vs a baseline: implicit-reward metrics, generations, judges, win/tie/lose with intervals",
        positional="models",
        example="iopo eval runs/quickstart judges.rm.type=reward_model judges.rm.model=runs/rm/final",
    ),
    "online": Command(
        C.OnlineConfig,
        "iopo.commands.online:online",
        "online rounds: Iter-DPO with a judge, or IOPO / DPO on the human pairs, resumable stage by stage",
        example="iopo online --config configs/online.yaml method=iter_dpo judge.model=runs/rm/final",
    ),
    "rate": Command(
        C.RateConfig,
        "iopo.commands.rate:rate_command",
        "a local page where people rate an eval's answers blind (0-3 scores, a preference), then human tables",
        positional="eval_dir",
        example="iopo rate evals/quickstart   (then open the printed URL; Ctrl-C writes the tables)",
    ),
    "plot": Command(
        C.PlotConfig,
        "iopo.commands.plot:plot_command",
        "PNGs from run and eval folders (margin distributions, curves, win/tie/lose bars)",
        positional="inputs",
        example="iopo plot runs/quickstart runs/dpo evals/eval output_dir=plots",
    ),
    "report": Command(
        C.ReportConfig,
        "iopo.commands.report:report_command",
        "one Markdown report from run and eval folders",
        positional="inputs",
        example="iopo report runs/quickstart evals/eval output=report.md",
    ),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iopo",
        description="Preference optimization: IOPO and its baselines, their evaluation and reports.",
        epilog="each command takes --config FILE.yaml, key=value overrides and --print-config; "
        "`iopo COMMAND --help` shows an example",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=command.help,
            description=command.help,
            epilog=f"example:\n  {command.example}\nevery setting, with its help: iopo {name} --print-config",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", "-c", help="YAML config file (see configs/)")
        p.add_argument(
            "--print-config",
            action="store_true",
            help="print the resolved config as YAML, each setting's help above it, and exit",
        )
        what = f"key=value overrides; bare arguments are {command.positional}" if command.positional else None
        p.add_argument("overrides", nargs="*", metavar="key=value", help=what)
    return parser


def _is_labelled_path(command: Command, item: str) -> bool:
    """`label=path` given as a bare argument (iopo eval mine=runs/iopo): a key that is no setting of the command
    (and has no dot), a value that is an existing folder or file (or "embedded")."""
    from pathlib import Path

    key, _, value = item.partition("=")
    if "." in key or key.lstrip("-") in command.schema.model_fields:
        return False
    return value == "embedded" or Path(value).expanduser().exists()


def _split_positional(command: Command, overrides: list[str]) -> list[str]:
    """Bare arguments (no '=', or `label=path`) of commands that take them become one list override, e.g.
    models=["a", "mine=runs/b"]."""
    import json

    if command.positional is None:
        return overrides
    bare = [o for o in overrides if "=" not in o or _is_labelled_path(command, o)]
    if not bare:
        return overrides
    return [*(o for o in overrides if o not in bare), f"{command.positional}={json.dumps(bare)}"]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = COMMANDS[args.command]
    try:
        cfg = load_config(args.config, _split_positional(command, args.overrides), command.schema)
        if args.print_config:
            print(commented_config(cfg), end="")
            return 0
        module, function = command.target.split(":")
        getattr(importlib.import_module(module), function)(cfg)
    except (ConfigError, DataError, FileNotFoundError) as e:  # the user's input, said in one line
        print(f"iopo: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable output folder, a full disk: the place and the reason, in one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"iopo: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:  # a judge server that fails, a run that diverges: one line, not a traceback
        from iopo.engine.fit import NonFiniteError
        from iopo.io.openai_client import ServerError

        if isinstance(e, ServerError | NonFiniteError):
            print(f"iopo: error: {e}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
