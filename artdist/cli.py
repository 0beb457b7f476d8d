"""The `artdist` command line: one subcommand per module, imported only when it runs."""
from __future__ import annotations

import argparse
import importlib
import sys

from artdist.config import ConfigError


class UserError(Exception):
    """Bad input (missing folder, wrong file...): printed as one clear line, never a traceback."""


# name -> (module implementing add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "synth": ("artdist.synth", "generate a synthetic WikiArt-like corpus in the ArtGAN layout"),
    "shard": ("artdist.shard", "pack images + ArtGAN label files into WebDataset tar shards"),
    "train": ("artdist.train", "train the CNN-LSTM (plain python, or N processes under torchrun)"),
    "evaluate": ("artdist.evaluate", "evaluate a run's model_best.pt on a split"),
    "predict": ("artdist.predict", "top-k style, artist and genre for image files"),
    "outliers": ("artdist.outliers", "rank the paintings that do not fit their assigned labels"),
    "submit": ("artdist.submit", "submit a training job to SLURM through submitit"),
    "bench": ("artdist.bench", "measure loader, model and end-to-end throughput"),
    "config": ("artdist.cli", "print a job's resolved config (YAML + --set overrides)"),
}


def add_config_arguments(p: argparse.ArgumentParser, required: bool = False) -> None:
    """--config and --set, shared by every command that reads a job config."""
    p.add_argument("--config", "-c", required=required, metavar="YAML",
                   help="job config, e.g. jobs/demo.yaml (defaults apply to keys it leaves out)")
    add_override_argument(p)


def add_override_argument(p: argparse.ArgumentParser) -> None:
    """--set alone, for commands whose config comes from a run or checkpoint."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key with a dotted path, e.g. --set data.image_size=256 "
                        "(repeatable; values are read as YAML)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


def run(args: argparse.Namespace) -> int:
    from artdist.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only `command`'s module is imported (so `artdist --help` stays instant)."""
    parser = argparse.ArgumentParser(
        prog="artdist",
        description="Train ResNet+LSTM classifiers of painting style, artist and genre on WikiArt "
                    "across GPUs, and find the paintings that do not fit their labels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    mod = importlib.import_module(args._module)
    try:
        return int(mod.run(args) or 0)
    except ConfigError as exc:
        print(f"artdist {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"artdist {args.command}: error: {exc}", file=sys.stderr)
        return 2
