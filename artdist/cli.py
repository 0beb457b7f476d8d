"""The `artdist` command line: one subcommand per module of artdist.commands, imported only when it runs."""
from __future__ import annotations

import argparse
import importlib
import sys

import artdist
from artdist.errors import ConfigError, UserError

# name -> one-line help; artdist.commands.<name> implements add_arguments(parser) and run(args) -> int
COMMANDS = {
    "synth": "generate a synthetic WikiArt-like corpus in the ArtGAN layout",
    "shard": "pack images + ArtGAN label files into WebDataset tar shards",
    "verify": "check shards against their manifest.json (sha256 and sample counts)",
    "train": "train the CNN-LSTM (plain python, or N processes under torchrun)",
    "evaluate": "evaluate a run's model_best.pt on a split",
    "predict": "top-k style, artist and genre for image files",
    "outliers": "rank the paintings that do not fit their assigned labels",
    "relabel": "apply a review's exported decisions as label corrections to a new shard set",
    "audit": "score every painting out of sample: K fold trainings (here, or a SLURM array), one ranked report",
    "duplicates": "find copies of one painting by embedding similarity, beside the shard-time hash groups",
    "submit": "submit a training job to SLURM through submitit",
    "bench": "measure loader, model and end-to-end throughput",
    "config": "print a job's resolved config (YAML + --set overrides)",
}


def _module(command: str) -> str:
    return f"artdist.commands.{command}"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only `command`'s module is imported (so `artdist --help` stays instant)."""
    parser = argparse.ArgumentParser(
        prog="artdist",
        description="Train ResNet+LSTM classifiers of painting style, artist and genre on WikiArt "
                    "across GPUs, and find the paintings that do not fit their labels.",
    )
    parser.add_argument("--version", action="version", version=f"artdist {artdist.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(_module(name)).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    mod = importlib.import_module(_module(args.command))
    try:
        return int(mod.run(args) or 0)
    except ConfigError as exc:
        print(f"artdist {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"artdist {args.command}: error: {exc}", file=sys.stderr)
        return 2
