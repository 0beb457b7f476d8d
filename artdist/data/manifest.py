"""The shard folder's manifest.json (written by `artdist shard`) and the per-sample metadata in the shards."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Iterator

from artdist.config import TASKS
from artdist.errors import UserError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "artdist-shards/1"




def read_manifest(shards_dir: str | Path) -> dict:
    """The shard folder's manifest.json (docs/design.md "Shard format"), checked for the keys loaders use."""
    path = Path(shards_dir) / MANIFEST_NAME
    hint = f"run `artdist shard --out {shards_dir}` first, or point data.shards at a folder it made"
    if not path.is_file():
        raise UserError(f"no shards in {shards_dir}: {path} does not exist; {hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} cannot be read ({exc}); {hint}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path} is not an artdist shard manifest (format {MANIFEST_FORMAT!r}); {hint}")
    missing = [key for key in ("splits", "classes", "image_ext") if key not in manifest]
    missing += [f"classes.{task}" for task in TASKS if task not in manifest.get("classes", {})]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; {hint}")
    return manifest


def split_keep(shards_dir: str | Path, manifest: dict, split: str) -> frozenset[str] | None:
    """The sample keys a split is restricted to, or None for all its samples.

    A split entry may name, in "keep", a file beside manifest.json with one sample key per line: the
    split is then those samples of its shards only (its shard "num_samples" count just them). This is
    how an audit fold trains on some samples of shared shards without re-sharding them.
    """
    name = manifest["splits"][split].get("keep")
    if name is None:
        return None
    path = Path(shards_dir) / name
    try:
        return frozenset(path.read_text().split())
    except OSError as exc:
        raise UserError(f"{path} (the sample keys of split {split!r}) cannot be read ({exc}); "
                        "re-run the command that wrote it") from None


def num_classes(manifest: dict) -> dict[str, int]:
    return {task: len(manifest["classes"][task]) for task in TASKS}




def sample_metas(shards_dir: str | Path, manifest: dict, split: str) -> Iterator[tuple[str, str, dict]]:
    """(shard name, key, json metadata) of every sample a split keeps, in shard order; image bytes are seeked past."""
    keep = split_keep(shards_dir, manifest, split)
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(Path(shards_dir) / shard["name"]) as tar:
            for member in tar:
                # WebDataset's rule: the key ends at the first dot of the member's base name.
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                if ext == "json" and (keep is None or key in keep):
                    yield shard["name"], key, json.load(tar.extractfile(member))


def label_counts(shards_dir: str | Path, manifest: dict, split: str,
                 num_classes: dict[str, int]) -> dict[str, list[int]]:
    """Samples per class and task in a split, read from the shards' json members."""
    counts = {task: [0] * n for task, n in num_classes.items()}
    for _, _, meta in sample_metas(shards_dir, manifest, split):
        for task, task_counts in counts.items():
            if meta[task] >= 0:
                task_counts[meta[task]] += 1
    return counts
