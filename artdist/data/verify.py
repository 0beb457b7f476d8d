"""Shard checks against manifest.json (sha256 and sample count), once per shard file per machine (cached)."""
from __future__ import annotations

import hashlib
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from artdist.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, member_key
from artdist.errors import UserError
from artdist.progress import Progress

BLOCK = 1 << 20
CACHE_ENV = "ARTDIST_CACHE_DIR"  # where "this file was verified" markers live; default ~/.cache/artdist
FIX = "re-run `artdist shard` (or copy the folder again)"


class _Hashing:
    """A read-only file object that hashes every byte read through it."""

    def __init__(self, fh):
        self.fh, self.digest = fh, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.digest.update(data)
        return data


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "artdist") / "verified"


def _marker(path: Path, entry: ShardInfo, keep_tag: str) -> Path | None:
    """The cache marker of this file as it is now (path, size, mtime) against this manifest entry."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{entry.sha256}\0{entry.num_samples}\0{keep_tag}"
    return _cache_dir() / hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def check_shard(shards_dir: str | Path, entry: ShardInfo, keep: frozenset[str] | None = None) -> str | None:
    """None when the shard named by manifest `entry` has its sha256 and sample count, else what is wrong.

    One pass: the tar is listed while its bytes are hashed. Samples are counted as WebDataset
    groups them, by key (a member's name up to the first dot of its base name).
    """
    path = Path(shards_dir) / entry.name
    keys: set[str] = set()
    try:
        with open(path, "rb") as fh:
            stream = _Hashing(fh)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    keys.add(member_key(member.name)[0])
            while stream.read(BLOCK):
                pass
    except FileNotFoundError:
        return f"{path} is missing"
    except (OSError, tarfile.TarError) as exc:
        return f"{path} is not a readable tar ({type(exc).__name__}: {exc}); it may be cut short"
    if stream.digest.hexdigest() != entry.sha256:
        return f"{path} has sha256 {stream.digest.hexdigest()[:16]}..., {MANIFEST_NAME} says {entry.sha256[:16]}..."
    held = len(keys if keep is None else keys & keep)  # a split with a keep file counts only those
    if held != entry.num_samples:
        return f"{path} holds {held} samples, {MANIFEST_NAME} says {entry.num_samples}"
    return None


def _check_cached(shards_dir: str | Path, entry: ShardInfo, reuse: bool, keep: frozenset[str] | None,
                  keep_tag: str) -> str | None:
    """check_shard, skipped when `reuse` and this file was verified before; a success is remembered."""
    path = Path(shards_dir) / entry.name
    marker = _marker(path, entry, keep_tag)
    if reuse and marker is not None and marker.exists():
        return None
    problem = check_shard(shards_dir, entry, keep)
    if problem is None and marker is not None:
        try:  # a read-only home only costs a re-check next time
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass
    return problem


def verify_shards(shards_dir: str | Path, entries: list[ShardInfo], workers: int = 4, reuse: bool = True,
                  progress: bool = False, keep: frozenset[str] | None = None) -> list[str]:
    """Check every entry's shard (`workers` threads: hashing releases the GIL); -> the problems found.

    reuse: skip a file already verified on this machine with the same path, size and mtime.
    progress: a `verified: N/M shards` line on stderr (artdist.progress), redrawn on a terminal.
    """
    # A shard listed more than once (artdist bench tiles a split) is read once (ShardInfo is hashable).
    entries = list(dict.fromkeys(entries))
    problems: list[str] = []
    keep_tag = "" if keep is None else hashlib.sha256("\n".join(sorted(keep)).encode()).hexdigest()
    bar = Progress(len(entries), "shards", label="verified", enabled=progress)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for entry, problem in zip(entries, pool.map(lambda e: _check_cached(shards_dir, e, reuse, keep, keep_tag), entries)):
            if problem:
                problems.append(problem)
            bar.update(entry.num_samples)
    return problems


def verify_split(shards_dir: str | Path, manifest: Manifest, split: str) -> None:
    """UserError naming the first bad shard of `split` (all checked; cached per machine): every reader calls this
    before a sample reaches a model."""
    problems = verify_shards(shards_dir, list(manifest.split(split).shards), keep=manifest.keep(split))
    if problems:
        more = f" (and {len(problems) - 1} more shard(s); `artdist verify {shards_dir}` lists them)" \
            if len(problems) > 1 else ""
        raise UserError(f"split {split!r}: {problems[0]}{more}; {FIX}")
