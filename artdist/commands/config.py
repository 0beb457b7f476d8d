"""`artdist config`: print a job's resolved config (YAML + --set overrides), checked as a run would check it."""
from __future__ import annotations

import argparse

from artdist.commands.common import add_config_arguments
from artdist.config import load_config, to_yaml


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


def run(args: argparse.Namespace) -> int:
    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0
