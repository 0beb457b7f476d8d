"""Figures for docs/benchmarks.md: grouping 81,446 hashes, the CPU cost of hashing per sharded image, and
the recall/precision of the hashes and the copy descriptor on copies planted among real pictures.

    python benchmarks/duplicates.py [IMAGE_FOLDER]   (default: ../shared/wikiart_sample, any folder of JPEGs)
"""
from __future__ import annotations

import itertools
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from artdist.bench import build_real_corpus
from artdist.config import TASKS, DataConfig, DuplicatesConfig, ModelConfig, ShardConfig
from artdist.data import duplicates
from artdist.data.image import encode_image, eval_pixels, prepare_image, read_source
from artdist.data.shard import shard_dataset
from artdist.data.synth import COPY_KINDS, _copy_picture
from artdist.data.transforms import DeviceTransform
from artdist.model import build_model
from artdist.outliers.duplicates import descriptor_pairs, merge_groups

IMAGES = 81_446  # the real label files' images
MULTI_FILED = 1_349  # their file names in two style folders
NEAR = 2_000  # near copies planted beside them
MAX_SHORT_SIDE = 448  # the WikiArt jobs' shard.max_short_side
PLANTED = 100  # real pictures given one copy each, the kinds in turn


def grouping(max_distance: int) -> None:
    rng = np.random.default_rng(0)
    # pHash-like codes: exactly half of the 256 bits set (median threshold); exact and near copies planted
    bits = np.zeros((IMAGES, duplicates.PHASH_BITS), np.uint8)
    np.put_along_axis(bits, np.argsort(rng.random(bits.shape), axis=1)[:, :duplicates.PHASH_BITS // 2], 1, axis=1)
    bits[-MULTI_FILED:] = bits[:MULTI_FILED]
    near = bits[MULTI_FILED:MULTI_FILED + NEAR].copy()
    for row in near:
        row[rng.choice(duplicates.PHASH_BITS, max_distance, replace=False)] ^= 1
    bits[-MULTI_FILED - NEAR:-MULTI_FILED] = near
    hexes = [b.tobytes().hex() for b in np.packbits(bits, axis=1)]
    samples = [{"path": f"S/{i}.jpg", "id": i, "painting_id": i, "split": "train", "style": 0, "artist": -1,
                "genre": -1, "sha256": f"{i % (IMAGES - MULTI_FILED):064x}", "phash": h} for i, h in enumerate(hexes)]
    start = time.process_time()
    groups = duplicates.group_samples(samples, max_distance)
    cpu = time.process_time() - start
    print(f"group_samples: {IMAGES:,} 256-bit hashes, dup_hamming {max_distance} -> {len(groups):,} groups "
          f"in {cpu:.2f} CPU s")


def hashing(paths: list[Path]) -> None:
    rounds = 3
    base = hashed = 0.0
    for _ in range(rounds):
        for path in paths:
            start = time.process_time()
            source = read_source(path)
            pixels = prepare_image(source, MAX_SHORT_SIDE, 200_000_000)
            encode_image(pixels, "jpeg", 85)
            mid = time.process_time()
            duplicates.sample_hashes(source, pixels)
            end = time.process_time()
            base += mid - start
            hashed += end - mid
    n = rounds * len(paths)
    print(f"{len(paths)} images x {rounds}: read+decode+resize+encode {1000 * base / n:.2f} ms CPU/image, "
          f"sha256+pHash {1000 * hashed / n:.3f} ms ({100 * hashed / base:.1f} %)")


def whole_sharder(folder: Path) -> None:
    """`artdist shard` in this process (1 worker: tar, json and manifest included) with the hashes, and with
    them replaced by constants: the CPU the hashes add to sharding, per image."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        build_real_corpus(corpus, folder)
        cfg = ShardConfig(images=str(corpus / "images"), labels=str(corpus / "labels"), max_short_side=MAX_SHORT_SIDE,
                          workers=1)
        best = {}
        for _ in range(5):  # alternating, best of five: the difference is a few % of noisy CPU times
            for name in ("without", "with"):
                out = Path(tmp) / "shards"
                shutil.rmtree(out, ignore_errors=True)
                # Distinct stand-ins: equal ones would make every image one exact-copy group to report and move.
                unique = itertools.count()
                stub = mock.patch("artdist.data.duplicates.sample_hashes",
                                  lambda source, pixels: [f"{next(unique):064x}", "0" * 64])
                if name == "without":
                    stub.start()
                start = time.process_time()
                shard_dataset(replace(cfg, out=str(out)), progress=False)
                cpu = time.process_time() - start
                if name == "without":
                    stub.stop()
                best[name] = min(best.get(name, cpu), cpu)
        images = len(list((corpus / "images").rglob("*.jpg")))
        per = {k: 1000 * v / images for k, v in best.items()}
    print(f"artdist shard, 1 worker, {images} images: {per['without']:.2f} ms CPU/image without hashes, "
          f"{per['with']:.2f} with (+{100 * (per['with'] / per['without'] - 1):.1f} %)")


def copy_descriptors(files: list[Path], image_size: int = 224) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Copy descriptors of image files and their parts' widths, as `artdist duplicates` computes them from
    their shard members (eval pixels), here with an untrained ResNet-18: no trained model needed for copies."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", weights="none"), {t: 2 for t in TASKS}).eval()
    data_cfg, shard_cfg = DataConfig(image_size=image_size), ShardConfig(max_short_side=MAX_SHORT_SIDE)
    transform = DeviceTransform(data_cfg, "cpu", train=False, channels_last=False)
    parts = []
    with torch.no_grad():
        for start in range(0, len(files), 32):
            batch = np.stack([eval_pixels(path, shard_cfg, data_cfg) for path in files[start:start + 32]])
            parts.append(model.copy_descriptor(transform(torch.from_numpy(batch).permute(0, 3, 1, 2))))
    return torch.cat(parts), model.copy_widths


def planted_real(paths: list[Path], root: Path, max_distance: int) -> None:
    """Copies of real pictures made as `artdist synth --duplicates` makes them, found by the hashes as
    `artdist shard` computes them and by the copy descriptor as `artdist duplicates` does."""
    rng = np.random.default_rng(0)
    planted, samples = [], []
    with tempfile.TemporaryDirectory() as tmp:
        files = {str(p.relative_to(root)): p for p in paths}
        for n, i in enumerate(sorted(rng.choice(len(paths), min(PLANTED, len(paths)), replace=False).tolist())):
            kind, original = COPY_KINDS[n % len(COPY_KINDS)], paths[i]
            copy = Path(tmp) / f"{n}-{kind}.jpg"
            _copy_picture(original, copy, kind, rng)
            files[copy.name] = copy
            planted.append({"path": copy.name, "original": str(original.relative_to(root)), "kind": kind})
        for i, (name, path) in enumerate(files.items()):
            source = read_source(path)
            pixels = prepare_image(source, MAX_SHORT_SIDE, 200_000_000)
            samples.append({"path": name, "id": i, "split": "train", "style": 0, "artist": -1, "genre": -1,
                            **dict(zip(duplicates.HASH_FIELDS, duplicates.sample_hashes(source, pixels)))})
        names = list(files)
        dc = DuplicatesConfig()
        pairs, _ = descriptor_pairs(*copy_descriptors(list(files.values())), dc.ratio, dc.neighbours, dc.chunk)
    by_hash = [[m["path"] for m in g["members"]] for g in duplicates.group_samples(samples, max_distance)]
    by_descriptor = [[names[i] for i in members] for members in duplicates.components(len(names), pairs)]
    found = {"hashes": by_hash, "embeddings": by_descriptor, "either": merge_groups(by_hash + by_descriptor)}
    scores = {name: duplicates.score_planted(groups, planted, set(files)) for name, groups in found.items()}
    print(f"{len(paths)} real pictures + {len(planted)} planted copies, dup_hamming {max_distance}, copy "
          f"descriptor of an untrained ResNet-18 at 224 px:")
    print(duplicates.planted_table(scores))


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "wikiart_sample"
    images = sorted(folder.rglob("*.jpg"))
    distance = ShardConfig().dup_hamming
    grouping(distance)
    hashing(images)
    whole_sharder(folder)
    planted_real(images, folder, distance)
