"""Figures for docs/benchmarks.md: grouping 81,446 hashes, and the CPU cost of hashing per sharded image.

    python benchmarks/duplicates.py [IMAGE_FOLDER]   (default: ../shared/wikiart_sample, any folder of JPEGs)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from artdist.data import duplicates
from artdist.data.shard import _decode, _encode, _resize

IMAGES = 81_446  # the real label files' images
MULTI_FILED = 1_349  # their file names in two style folders
NEAR = 2_000  # near copies planted beside them (2 bits flipped)


def grouping() -> None:
    rng = np.random.default_rng(0)
    # pHash-like codes: exactly 32 of 64 bits set (median threshold); 1,349 exact copies, 2,000 near ones
    bits = np.argsort(rng.random((IMAGES, 64)), axis=1)[:, :32]
    codes = (np.uint64(1) << bits.astype(np.uint64)).sum(axis=1, dtype=np.uint64)
    codes[-MULTI_FILED:] = codes[:MULTI_FILED]
    near = slice(-MULTI_FILED - NEAR, -MULTI_FILED)
    codes[near] = codes[MULTI_FILED:MULTI_FILED + NEAR] ^ (np.uint64(3) << rng.integers(0, 62, NEAR).astype(np.uint64))
    samples = [{"path": f"S/{i}.jpg", "id": i, "painting_id": i, "split": "train", "style": 0, "artist": -1,
                "genre": -1, "sha256": f"{i % (IMAGES - MULTI_FILED):064x}", "phash": f"{int(c):016x}",
                "dhash": f"{int(c):016x}"} for i, c in enumerate(codes)]
    start = time.process_time()
    groups = duplicates.group_samples(samples, 3)
    cpu = time.process_time() - start
    print(f"group_samples: {IMAGES:,} hashes, dup_hamming 3 -> {len(groups):,} groups in {cpu:.2f} CPU s")


def hashing(folder: Path) -> None:
    paths = sorted(folder.rglob("*.jpg"))
    rounds = 3
    base = hashed = 0.0
    for _ in range(rounds):
        for path in paths:
            start = time.process_time()
            im = _resize(_decode(path, 448, 200_000_000), 448)
            _encode(im, "jpeg", 85)
            mid = time.process_time()
            duplicates.file_sha256(path), duplicates.perceptual_hashes(im)
            end = time.process_time()
            base += mid - start
            hashed += end - mid
    n = rounds * len(paths)
    print(f"{len(paths)} images x {rounds}: decode+resize+encode {1000 * base / n:.1f} ms CPU/image, "
          f"sha256+pHash+dHash {1000 * hashed / n:.2f} ms ({100 * hashed / base:.1f} %)")


if __name__ == "__main__":
    grouping()
    hashing(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "wikiart_sample")
