"""`artdist duplicates`: near-duplicate paintings of a trained run, by its copy descriptor."""
from __future__ import annotations

import argparse

from artdist import dist
from artdist.commands.common import add_run_arguments, open_run
from artdist.data.duplicates import read_planted
from artdist.data.manifest import read_manifest
from artdist.outliers.duplicates import find_groups, write_reports
from artdist.train.checkpoint import check_classes, load_trained_model
from artdist.train.numerics import resolve_amp


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, default_split=None)  # every split: copies are looked for across them
    p.add_argument("--ratio", type=float, metavar="R",
                   help="a copy's cosine distance is below R x the distance to the image's duplicates.neighbours-th "
                        "nearest (duplicates.ratio, default 0.2)")
    p.add_argument("--planted", default="", metavar="CSV",
                   help="planted_duplicates.csv from `artdist synth --duplicates`: recall per kind and precision "
                        "of the shard-time hashes and of the embeddings (duplicates.planted)")


def run(args: argparse.Namespace) -> int:
    extra = (f"out_dir={args.run}", *((f"duplicates.ratio={args.ratio}",) if args.ratio is not None else ()),
             *((f"duplicates.planted={args.planted}",) if args.planted else ()))
    path, ckpt, cfg = open_run(args, extra)
    planted = read_planted(cfg.duplicates.planted) if cfg.duplicates.planted else None  # a bad path fails first
    device = dist.init_distributed(cfg.train.device)
    try:
        manifest = read_manifest(cfg.data.shards)
        check_classes(manifest, ckpt, cfg, path)
        model = load_trained_model(ckpt, cfg, device)
        found = find_groups(model, cfg, manifest, device, resolve_amp(cfg.train.amp, device))
        if found is not None:
            write_reports(*found, cfg, manifest, planted)
    finally:
        dist.cleanup()
    return 0
