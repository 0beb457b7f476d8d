"""`artdist train`: train (or resume) a job config, one process or one per device under torchrun."""
from __future__ import annotations

import argparse

from artdist.commands.common import add_config_arguments
from artdist.config import load_config
from artdist.job import main
from artdist.train.trainer import TERMINATED_EXIT


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, required=True)
    rerun = p.add_mutually_exclusive_group()
    rerun.add_argument("--fresh", action="store_true",
                       help="start over: an existing run dir is renamed to <dir>.replaced-<time> (nothing is deleted)")
    rerun.add_argument("--resume-with-changes", action="store_true",
                       help="resume even though the config changes what is trained (data, model, LR schedule...); "
                            "the changes are recorded in RUN_DIR/config_changes.yaml")


def run(args: argparse.Namespace) -> int:
    policy = "fresh" if args.fresh else "with_changes" if args.resume_with_changes else "check"
    # Stopped by SIGTERM/SIGUSR2 after saving: not 0, so that a scheduler restarts the job (which resumes).
    return TERMINATED_EXIT if main(load_config(args.config, args.overrides), policy) == "terminated" else 0
