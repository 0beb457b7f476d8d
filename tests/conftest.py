"""Shared session fixtures: the real ArtGAN label files, a small synthetic corpus and its shards."""
from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

import pytest

from artdist.config import ShardConfig, SynthConfig
from artdist.data.shard import shard_dataset
from artdist.data.synth import make_corpus

# Shard-verification markers (artdist.data.verify) of test shards go to a throwaway folder, not ~/.cache;
# set at import so that spawned ranks inherit it.
os.environ.setdefault("ARTDIST_CACHE_DIR", tempfile.mkdtemp(prefix="artdist-cache-"))

# The nine real ArtGAN label files, byte for byte (1.3 MB of xz instead of 11 MB), so that a clean
# clone tests against them wherever it is checked out.
REAL_LABELS_ARCHIVE = Path(__file__).parent / "data" / "wikiart_csv.tar.xz"


@pytest.fixture(scope="session")
def real_labels(tmp_path_factory) -> Path:
    """The folder of the real ArtGAN WikiArt label files (81,446 images), unpacked from tests/data."""
    out = tmp_path_factory.mktemp("real")
    with tarfile.open(REAL_LABELS_ARCHIVE) as tar:
        tar.extractall(out, filter="data")
    return out / "wikiart_csv"


# The 214 real WikiArt JPEGs beside the checkout (../shared/wikiart_sample), where it has them.
REAL_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "wikiart_sample"


@pytest.fixture(scope="session")
def real_sample() -> list[Path]:
    """The real sample's JPEG files, sorted; empty where this checkout has no sample beside it."""
    return sorted(REAL_SAMPLE.rglob("*.jpg"))


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> Path:
    """400 pictures of 64 px, seed 0, 10% planted label noise: DIR with images/, labels/, planted_noise.csv."""
    out = tmp_path_factory.mktemp("synth")
    make_corpus(SynthConfig(out=str(out), images=400, seed=0, noise=0.1, size=64))
    return out


@pytest.fixture(scope="session")
def demo_shards(synth_corpus, tmp_path_factory) -> Path:
    """synth_corpus packed into shards (64 px, 40 samples per shard, at least 8 per split)."""
    out = tmp_path_factory.mktemp("shards")
    shard_dataset(ShardConfig(images=str(synth_corpus / "images"), labels=str(synth_corpus / "labels"),
                              out=str(out), max_short_side=64, samples_per_shard=40, workers=1), progress=False)
    return out
