"""`artdist train`: train (or resume) a job config, one process or one per device under torchrun."""
from __future__ import annotations

import argparse

from artdist.commands.common import add_config_arguments
from artdist.config import load_config
from artdist.job import main
from artdist.train.trainer import TERMINATED_EXIT


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, required=True)


def run(args: argparse.Namespace) -> int:
    # Stopped by SIGTERM/SIGUSR2 after saving: not 0, so that a scheduler restarts the job (which resumes).
    return TERMINATED_EXIT if main(load_config(args.config, args.overrides)) == "terminated" else 0
