"""Arguments shared by the commands, and opening the trained run that --run/--checkpoint name."""
from __future__ import annotations

import argparse
from pathlib import Path

from artdist.config import JobConfig, apply_overrides, from_dict
from artdist.errors import UserError
from artdist.rundir import BEST, RunDir
from artdist.train.checkpoint import load_checkpoint


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


def add_run_arguments(p: argparse.ArgumentParser, default_split: str | None) -> None:
    """--run, --split, --checkpoint and --set: the arguments of every command that reads a trained run
    (no --split when `default_split` is None: the command reads every split)."""
    # --run-dir too: under torchrun, whose parser reads "--run" as an ambiguous prefix of its --run-path
    p.add_argument("--run", "--run-dir", dest="run", required=True, metavar="DIR",
                   help="run directory written by `artdist train` (spell it --run-dir under torchrun)")
    if default_split is not None:
        p.add_argument("--split", default=default_split, help="split of the shards, any in their manifest.json: "
                       f"train, val, test... (default: {default_split})")
    p.add_argument("--checkpoint", default=BEST, metavar="FILE",
                   help=f"checkpoint file name inside DIR, or a path (default: {BEST})")
    add_override_argument(p)  # applies to the checkpoint's config, e.g. --set data.shards=shards/other


def open_run(args: argparse.Namespace, extra_overrides: tuple[str, ...] = ()) -> tuple[Path, dict, JobConfig]:
    """(checkpoint path, checkpoint, its config with --set and `extra_overrides` applied) of add_run_arguments."""
    run_dir = RunDir(args.run)
    if not run_dir.path.is_dir():
        raise UserError(f"--run {run_dir}: no such directory; pass a run dir written by `artdist train` (runs/<name>)")
    path = run_dir.checkpoint(args.checkpoint)
    ckpt = load_checkpoint(path)
    cfg = from_dict(apply_overrides(ckpt["config"], [*args.overrides, *extra_overrides]), f"{path} config")
    return path, ckpt, cfg
