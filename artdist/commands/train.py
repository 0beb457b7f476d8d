"""`artdist train`: train (or resume) a job config, one process or one per device under torchrun."""
from __future__ import annotations

import argparse

from artdist.commands.common import add_config_arguments
from artdist.config import load_config
from artdist.job import main


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, required=True)


def run(args: argparse.Namespace) -> int:
    main(load_config(args.config, args.overrides))
    return 0
