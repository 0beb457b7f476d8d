"""The shard folder's manifest.json as a typed Manifest, and the one reader of the shards' per-sample json members."""
from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from artdist.config import TASKS
from artdist.errors import UserError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "artdist-shards/1"


@dataclass(frozen=True)
class ShardInfo:
    """One tar file of a split."""

    name: str  # file name inside the shard folder
    num_samples: int
    sha256: str = ""


@dataclass(frozen=True)
class SplitInfo:
    """The shards of one split, in the order the loaders concatenate them."""

    num_samples: int
    shards: tuple[ShardInfo, ...]
    # A file beside manifest.json with one sample key per line: the split is then those samples of its
    # shards only (num_samples count just them). How an audit fold reads some samples of shared shards.
    keep: str = ""


@dataclass(frozen=True)
class SampleMeta:
    """A sample's json member (docs/design.md "Shard format") and where it lives."""

    shard: str
    key: str  # WebDataset's key: the member name up to its first dot
    meta: dict


@dataclass(frozen=True)
class Manifest:
    """What `artdist shard` wrote to DIR/manifest.json; `extra` keeps the keys loaders do not use
    (options, anomalies, skipped) so that to_json() gives back the file's content."""

    shards_dir: Path
    splits: dict[str, SplitInfo]
    classes: dict[str, list[str]]  # class names per task, index = label
    image_ext: str
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, tree: dict, shards_dir: str | Path) -> Manifest:
        splits = {name: SplitInfo(int(s["num_samples"]),
                                  tuple(ShardInfo(sh["name"], int(sh["num_samples"]), sh.get("sha256", ""))
                                        for sh in s["shards"]), s.get("keep", ""))
                  for name, s in tree["splits"].items()}
        extra = {k: v for k, v in tree.items() if k not in ("format", "splits", "classes", "image_ext")}
        return cls(Path(shards_dir), splits, tree["classes"], tree["image_ext"], extra)

    def to_json(self) -> dict:
        """The manifest.json tree, keys in the order `artdist shard` writes them."""
        splits = {name: {"num_samples": s.num_samples,
                         "shards": [{"name": sh.name, "num_samples": sh.num_samples, "sha256": sh.sha256}
                                    for sh in s.shards], **({"keep": s.keep} if s.keep else {})}
                  for name, s in self.splits.items()}
        return {"format": MANIFEST_FORMAT, "splits": splits, "classes": self.classes, "image_ext": self.image_ext,
                **self.extra}

    @property
    def num_classes(self) -> dict[str, int]:
        """Number of classes per task (the heads' sizes)."""
        return {task: len(self.classes[task]) for task in TASKS}

    def num_samples(self, split: str) -> int:
        """Samples in `split`; 0 when the manifest has no such split."""
        info = self.splits.get(split)
        return info.num_samples if info else 0

    def split(self, split: str) -> SplitInfo:
        """The split's info; a UserError naming the splits there are when it is absent."""
        if split not in self.splits:
            raise UserError(f"split {split!r} is not in {self.shards_dir / MANIFEST_NAME} (it has "
                            f"{sorted(self.splits)}); set data.train_split/val_split/test_split to one of those")
        return self.splits[split]

    def keep(self, split: str) -> frozenset[str] | None:
        """The sample keys `split` is restricted to (SplitInfo.keep), or None for all its shards' samples."""
        name = self.split(split).keep
        if not name:
            return None
        path = self.shards_dir / name
        try:
            return frozenset(path.read_text().split())
        except OSError as exc:
            raise UserError(f"{path} (the sample keys of split {split!r}) cannot be read ({exc}); "
                            "re-run the command that wrote it") from None

    def samples(self, split: str) -> Iterator[SampleMeta]:
        """Every sample's json member in `split` (those it keeps), in shard order; image bytes are seeked past, not read."""
        keep = self.keep(split)
        for shard in self.split(split).shards:
            with tarfile.open(self.shards_dir / shard.name) as tar:
                for member in tar:
                    key, ext = member_key(member.name)
                    if ext == "json" and (keep is None or key in keep):
                        meta = sample_meta(tar.extractfile(member).read(), shard.name, key, self.classes)
                        yield SampleMeta(shard.name, key, meta)

    def label_counts(self, split: str) -> dict[str, list[int]]:
        """Samples per class and task in `split` (labels of -1, unknown, are not counted)."""
        counts = {task: [0] * n for task, n in self.num_classes.items()}
        for sample in self.samples(split):
            for task, task_counts in counts.items():
                if sample.meta[task] >= 0:
                    task_counts[sample.meta[task]] += 1
        return counts


def member_key(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member, by WebDataset's rule: the key ends at the first dot of the base name."""
    key, _, ext = name.rpartition("/")[2].partition(".")
    return key, ext


def read_manifest(shards_dir: str | Path) -> Manifest:
    """The shard folder's manifest.json, checked for the keys loaders use."""
    path = Path(shards_dir) / MANIFEST_NAME
    hint = f"run `artdist shard --out {shards_dir}` first, or point data.shards at a folder it made"
    if not path.is_file():
        raise UserError(f"no shards in {shards_dir}: {path} does not exist; {hint}")
    try:
        tree = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} cannot be read ({exc}); {hint}") from None
    if not isinstance(tree, dict) or tree.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path} is not an artdist shard manifest (format {MANIFEST_FORMAT!r}); {hint}")
    missing = [key for key in ("splits", "classes", "image_ext") if key not in tree]
    missing += [f"classes.{task}" for task in TASKS if task not in tree.get("classes", {})]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; {hint}")
    _check_splits(path, tree["splits"], hint)
    return Manifest.from_json(tree, shards_dir)


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
            # A name is a file of the shard folder: never a path that leaves it; an audit fold's view
            # (a split with a "keep" file) names the shared shards by absolute path.
            view = bool(entry.get("keep")) and isinstance(name, str) and Path(name).is_absolute()
            if not isinstance(name, str) or not name or name in (".", "..") or (
                    not view and ("/" in name or "\\" in name)):
                raise UserError(f"{where}: shard name {name!r} is not a file name inside the shard folder; {hint}")
            if not _is_count(shard.get("num_samples")):
                raise UserError(f"{where}: shard {name} has num_samples {shard.get('num_samples')!r}, "
                                f"not a whole number >= 0; {hint}")
            if not isinstance(shard.get("sha256"), str):
                raise UserError(f"{where}: shard {name} has no sha256; {hint}")
        if sum(shard["num_samples"] for shard in entry["shards"]) != entry["num_samples"]:
            raise UserError(f"{where}: num_samples {entry['num_samples']} is not the sum of its shards' counts; {hint}")


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
