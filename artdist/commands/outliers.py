"""`artdist outliers`: rank the paintings of a split that do not fit their assigned labels."""
from __future__ import annotations

import argparse
from pathlib import Path

from artdist import dist
from artdist.commands.common import add_run_arguments, open_run
from artdist.data.manifest import read_manifest
from artdist.outliers.pipeline import run_outliers
from artdist.rundir import RunDir, hold
from artdist.train.checkpoint import check_classes, load_trained_model
from artdist.train.numerics import resolve_amp
from artdist.train.tensorboard import open_writer


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, default_split="val")
    p.add_argument("--planted", default="", metavar="CSV",
                   help="planted_noise.csv from artdist synth: report AUROC/precision@k against it")


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    extra = (f"out_dir={run_dir}",  # reports go to --run even if the run dir moved
             *((f"outliers.planted={args.planted}",) if args.planted else ()))
    path, ckpt, cfg = open_run(args, extra)
    device = dist.init_distributed(cfg.train.device)
    try:
        manifest = read_manifest(cfg.data.shards)
        check_classes(manifest, ckpt, cfg, path)
        model = load_trained_model(ckpt, cfg, device)
        with hold(run_dir, "outlier audit"):  # not while a training (or another audit) writes there
            writer = open_writer(RunDir(run_dir)) if dist.is_main_process() else None
            if run_outliers(model, cfg, manifest, args.split, device, resolve_amp(cfg.train.amp, device), writer):
                writer.close()
    finally:
        dist.cleanup()
    return 0
