"""`artdist evaluate`: a trained checkpoint on one split: accuracy, top-5, macro-F1, per-class P/R/F1, confusion."""
from __future__ import annotations

import argparse

from artdist.commands.common import add_run_arguments, open_run
from artdist.data.manifest import read_manifest
from artdist.dist import cleanup, init_distributed, is_main_process
from artdist.rundir import RunDir
from artdist.train.checkpoint import check_classes, load_trained_model
from artdist.train.evaluation import evaluate_split, write_report
from artdist.train.numerics import resolve_amp


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, default_split="test")


def run(args: argparse.Namespace) -> int:
    path, ckpt, cfg = open_run(args)
    device = init_distributed(cfg.train.device)
    try:
        manifest = read_manifest(cfg.data.shards)
        check_classes(manifest, ckpt, cfg, path)
        model = load_trained_model(ckpt, cfg, device)
        report = evaluate_split(model, cfg, manifest, args.split, device, resolve_amp(cfg.train.amp, device),
                                progress="evaluate")
        if is_main_process():
            write_report(report, RunDir(args.run).eval_report(args.split), str(path))
    finally:
        cleanup()
    return 0
