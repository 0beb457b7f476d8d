"""Figures for docs/benchmarks.md: the sharder's per-image work against the naive way and the draft-decode
floor, by source file size (the ratio to the naive way grows with the file).

    python benchmarks/shard_sizes.py [IMAGE_FOLDER]   (default: ../shared/wikiart_sample, any folder of JPEGs)
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from artdist.bench import cpu_ms, draft_decode, naive_shard_image
from artdist.config import ShardConfig
from artdist.data import duplicates
from artdist.data.image import prepare_image, read_source, shard_member

CLASSES = [(0, 0.3), (0.3, 0.5), (0.5, 1), (1, 1e9), (0, 1e9), (0.47, 1e9)]  # MP; 0.47: WikiArt's median


def sharder_work(path: Path, cfg: ShardConfig, resample: str) -> None:
    """What `artdist shard` does per image, less the tar: read, prepare, hash, encode (or keep the bytes)."""
    source = read_source(path)
    pixels = prepare_image(source, cfg.max_short_side, cfg.max_pixels, resample)
    duplicates.sample_hashes(source, pixels)
    shard_member(source, pixels, cfg.format, cfg.quality, cfg.passthrough)


def main(folder: Path) -> None:
    cfg = ShardConfig()
    rows = []
    for path in sorted(folder.rglob("*.jpg")):
        with Image.open(path) as im:
            megapixels = im.width * im.height / 1e6
        rows.append((megapixels, cpu_ms(lambda p: draft_decode(p, cfg.max_short_side), [path], 3),
                     cpu_ms(lambda p: naive_shard_image(p, cfg.max_short_side, cfg.quality), [path], 3),
                     cpu_ms(lambda p: sharder_work(p, cfg, cfg.resample), [path], 3),
                     cpu_ms(lambda p: sharder_work(p, cfg, "hamming"), [path], 3)))
    print(f"{len(rows)} files of {folder}, CPU ms per image (best of 3), shard.resample={cfg.resample}")
    for lo, hi in CLASSES:
        sel = [r for r in rows if lo <= r[0] < hi]
        if not sel:
            continue
        floor, naive, ours, hamming = (sum(r[i] for r in sel) / len(sel) for i in (1, 2, 3, 4))
        label = f"{lo}-{hi} MP" if hi < 1e9 else f">= {lo} MP"
        print(f"{label:>12}: {len(sel):4d} files  floor {floor:5.2f}  naive {naive:6.2f}  sharder {ours:5.2f} "
              f"= {naive / ours:.2f}x naive, {ours / floor:.2f}x floor  (hamming: {naive / hamming:.2f}x naive)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "wikiart_sample")
