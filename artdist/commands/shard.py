"""`artdist shard`: pack images + ArtGAN label files into WebDataset tar shards with a manifest."""
from __future__ import annotations

import argparse
import sys

from artdist.commands.common import add_config_arguments
from artdist.config import load_config, override_section
from artdist.data.shard import EXTENSIONS, shard_dataset


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Pack the images named by the ArtGAN label files into WebDataset tar shards (train/val/test) "
        "with a manifest.json; skipped images are listed there. Rerun the same command to resume. "
        "How many shards to aim for: docs/design.md \"Shard format\"."
    )
    add_config_arguments(p)
    p.add_argument("--images", metavar="DIR", help="folder holding the style folders of images (shard.images)")
    p.add_argument("--labels", metavar="DIR", help="folder holding the nine ArtGAN label files (shard.labels)")
    p.add_argument("--out", metavar="DIR", help="output folder for shards and manifest.json (shard.out)")
    p.add_argument("--split", choices=["artgan", "random"],
                   help="artgan: official train/val with test carved from train; random: stratified "
                        "60/20/20 (shard.split)")
    p.add_argument("--max-short-side", type=int, metavar="PX", help="shorter side at most this many px, never upscaled "
                                                      "(shard.max_short_side)")
    p.add_argument("--format", choices=list(EXTENSIONS), help="image encoding in the shards (shard.format)")
    p.add_argument("--quality", type=int, metavar="Q", help="jpeg/webp quality 1..100 (shard.quality)")
    p.add_argument("--samples-per-shard", type=int, metavar="N",
                   help="target images per shard; small splits still get shard.min_shards shards "
                        "(shard.samples_per_shard)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="processes writing shards; 0: one per 1,000 images, at most every CPU core this process may use (shard.workers)")


def run(args: argparse.Namespace) -> int:
    names = ("images", "labels", "out", "split", "max_short_side", "format", "quality", "samples_per_shard", "workers")
    job = override_section(load_config(args.config, args.overrides), "shard", {k: getattr(args, k) for k in names})
    try:
        shard_dataset(job.shard)
    except KeyboardInterrupt:
        print(f"\nartdist shard: interrupted; run the same command again to resume: finished shards in "
              f"{job.shard.out} are kept", file=sys.stderr)
        return 130
    return 0
