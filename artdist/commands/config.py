"""`artdist config`: print a job's resolved config, or the reference of every config key."""
from __future__ import annotations

import argparse

from artdist.commands.common import add_config_arguments
from artdist.config import load_config, reference, to_yaml


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--reference", action="store_true",
                   help="print every config key with its type, default and meaning (docs/config.md) instead")


def run(args: argparse.Namespace) -> int:
    print(reference() if args.reference else to_yaml(load_config(args.config, args.overrides)), end="")
    return 0
