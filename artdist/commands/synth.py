"""`artdist synth`: a synthetic WikiArt-like corpus in the ArtGAN layout, optionally with planted label noise."""
from __future__ import annotations

import argparse

from artdist.commands.common import add_config_arguments
from artdist.config import load_config, override_section
from artdist.data.synth import ARTISTS, DEFAULT_COUNTS, GENRES, STYLES, make_corpus


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--out", metavar="DIR",
                   help="output folder: gets images/, labels/ and planted_noise.csv (synth.out)")
    p.add_argument("--images", type=int, metavar="N", help="number of pictures (synth.images)")
    p.add_argument("--seed", type=int, metavar="S",
                   help="random seed; the same seed gives byte-identical files (synth.seed)")
    p.add_argument("--noise", type=float, metavar="F",
                   help="fraction of labelled (image, task) pairs written with a wrong label, listed in "
                        "planted_noise.csv (synth.noise)")
    p.add_argument("--duplicates", type=float, metavar="F",
                   help="fraction of paintings given a copy (exact under another style folder, re-encoded, resized, "
                        "cropped, colour-jittered; some in the other split), listed in planted_duplicates.csv "
                        "(synth.duplicates)")
    p.add_argument("--size", type=int, metavar="PX", help="side of the square pictures in px (synth.size)")
    p.add_argument("--styles", type=int, metavar="K", default=DEFAULT_COUNTS["style"],
                   help=f"number of style classes (default {DEFAULT_COUNTS['style']}, at most {len(STYLES)})")
    p.add_argument("--artists", type=int, metavar="K", default=DEFAULT_COUNTS["artist"],
                   help=f"number of artist classes (default {DEFAULT_COUNTS['artist']}, at most {len(ARTISTS)})")
    p.add_argument("--genres", type=int, metavar="K", default=DEFAULT_COUNTS["genre"],
                   help=f"number of genre classes (default {DEFAULT_COUNTS['genre']}, at most {len(GENRES)})")


def run(args: argparse.Namespace) -> int:
    job = override_section(load_config(args.config, args.overrides), "synth",
                           {k: getattr(args, k) for k in ("out", "images", "seed", "noise", "duplicates", "size")})
    summary = make_corpus(job.synth, args.styles, args.artists, args.genres)
    labelled = ", ".join(f"{t} {v['train']}+{v['val']}" for t, v in summary["labelled"].items())
    print(f"wrote {summary['images']} images ({summary['size']} px) to {summary['out']} in "
          f"{summary['seconds']} s; labelled train+val: {labelled}; planted noise: {summary['planted_noise']}; "
          f"planted copies: {summary['planted_duplicates']}")
    return 0
