"""`artdist verify`: check every shard of a shard folder against its manifest.json (sha256 and sample count)."""
from __future__ import annotations

import argparse
import os
import sys

from artdist.data.manifest import read_manifest
from artdist.data.verify import FIX, verify_shards


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", metavar="SHARDS", help="shard folder written by `artdist shard`")
    p.add_argument("--split", action="append", default=[], metavar="NAME",
                   help="check only this split (repeatable; default: every split in the manifest)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                   help="shards hashed at once (default: min(8, CPU cores))")


def run(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.shards)
    splits = args.split or list(manifest.splits)
    unknown = [s for s in splits if s not in manifest.splits]
    if unknown:
        print(f"artdist verify: error: no split {unknown[0]!r} in {args.shards} (it has {sorted(manifest.splits)})",
              file=sys.stderr)
        return 2
    entries = [entry for split in splits for entry in manifest.splits[split].shards]
    # Every file is read again (this is how a user re-checks what a cache entry vouches for).
    keeps = {split: manifest.keep(split) for split in splits}
    if all(keep is None for keep in keeps.values()):
        problems = verify_shards(args.shards, entries, workers=args.workers, reuse=False, progress=True)
    else:  # an audit fold's view: each split counts only the samples it keeps
        problems = [problem for split in splits
                    for problem in verify_shards(args.shards, list(manifest.splits[split].shards), workers=args.workers,
                                                 reuse=False, progress=True, keep=keeps[split])]
    for problem in problems:
        print(f"BAD {problem}")
    if problems:
        print(f"artdist verify: {len(problems)} of {len(entries)} shards do not match the manifest; {FIX}",
              file=sys.stderr)
        return 1
    print(f"{len(entries)} shards OK ({', '.join(splits)})")
    return 0
