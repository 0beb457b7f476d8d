"""The shard folder's manifest.json (written by `artdist shard`) and the per-sample metadata in the shards."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

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
    _check_splits(path, manifest["splits"], hint)
    return manifest


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_splits(path: Path, splits: object, hint: str) -> None:
    """Each split: {"num_samples": int >= 0, "shards": [{"name": plain file name, "num_samples", "sha256"}]}."""
    if not isinstance(splits, dict):
        raise UserError(f"{path}: 'splits' is not a mapping of split names; {hint}")
    for split, entry in splits.items():
        where = f"{path}: split {split!r}"
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
            raise UserError(f"{where} has no 'shards' list; {hint}")
        if not _is_count(entry.get("num_samples")):
            raise UserError(f"{where}: num_samples {entry.get('num_samples')!r} is not a whole number >= 0; {hint}")
        for shard in entry["shards"]:
            name = shard.get("name") if isinstance(shard, dict) else None
            # A name is a file of the shard folder: never a path that leaves it.
            if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
                raise UserError(f"{where}: shard name {name!r} is not a file name inside the shard folder; {hint}")
            if not _is_count(shard.get("num_samples")):
                raise UserError(f"{where}: shard {name} has num_samples {shard.get('num_samples')!r}, "
                                f"not a whole number >= 0; {hint}")
            if not isinstance(shard.get("sha256"), str):
                raise UserError(f"{where}: shard {name} has no sha256; {hint}")
        if sum(shard["num_samples"] for shard in entry["shards"]) != entry["num_samples"]:
            raise UserError(f"{where}: num_samples {entry['num_samples']} is not the sum of its shards' counts; {hint}")


def num_classes(manifest: dict) -> dict[str, int]:
    return {task: len(manifest["classes"][task]) for task in TASKS}



def sample_meta(raw: bytes, shard: str, key: str, classes: dict[str, list[str]]) -> dict:
    """The json member of one sample, checked: id, path and one label per task inside its class list."""
    where = f"{shard}: sample {key}"
    fix = "the shard is damaged or not made by `artdist shard` with these class lists: re-run `artdist shard`"
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{where} has an invalid .json member ({exc}); {fix}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{where}: its .json member is not an object; {fix}")
    absent = [k for k in ("id", "path", *TASKS) if k not in meta]
    if absent:
        raise UserError(f"{where}: its .json member lacks {', '.join(absent)}; {fix}")
    if not _is_count(meta["id"]) or not isinstance(meta["path"], str):
        raise UserError(f"{where}: id {meta['id']!r} / path {meta['path']!r} are not an int >= 0 and a text; {fix}")
    for task in TASKS:
        label, n = meta[task], len(classes[task])
        if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < n:
            raise UserError(f"{where}: {task} label {label!r} is outside -1..{n - 1} of the {n} {task} classes in "
                            f"{MANIFEST_NAME}; {fix}")
    return meta


def label_counts(shards_dir: str | Path, manifest: dict, split: str,
                 num_classes: dict[str, int]) -> dict[str, list[int]]:
    """Samples per class and task in a split, read from the shards' json members (image bytes are seeked past)."""
    counts = {task: [0] * n for task, n in num_classes.items()}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(Path(shards_dir) / shard["name"]) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = sample_meta(tar.extractfile(member).read(), shard["name"], member.name,
                                       manifest["classes"])
                    for task, task_counts in counts.items():
                        if meta[task] >= 0:
                            task_counts[meta[task]] += 1
    return counts
