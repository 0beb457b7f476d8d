"""A reviewer's decisions (the outlier page's CSV export) applied as label corrections to a new shard set."""
from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from artdist.config import TASKS
from artdist.data.manifest import MANIFEST_NAME, Manifest, SplitInfo, read_manifest
from artdist.data.shard import _write_atomic
from artdist.data.tarwriter import TarWriter
from artdist.data.verify import verify_split
from artdist.errors import UserError

DECISION_FIELDS = ("path", "task", "assigned", "decision", "suggested_label")
DECISIONS = ("wrong", "fine", "unsure")


@dataclass(frozen=True)
class Correction:
    path: str
    task: str
    assigned: str  # the label the reviewer saw on file
    new: str  # the label they suggested


def read_decisions(path: str | Path, classes: dict[str, list[str]]) -> tuple[list[Correction], Counter]:
    """The 'wrong' rows with a suggested label as corrections, and a count of the rows left as they are
    ('fine', 'unsure', 'wrong without a suggested label')."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"decisions file {path} does not exist; export it from the outlier page "
                        "(outliers/<split>/index.html, 'Export decisions')")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = set(DECISION_FIELDS) - set(reader.fieldnames or ())
        if missing:
            raise UserError(f"{path} lacks column(s) {sorted(missing)}; expected the header "
                            f"{','.join(DECISION_FIELDS)} as the outlier page exports it")
        rows = list(reader)
    corrections: dict[tuple[str, str], Correction] = {}
    kept: Counter = Counter()
    for line, row in enumerate(rows, start=2):
        where = f"{path}:{line}"
        task, decision, new = row["task"], row["decision"], row["suggested_label"].strip()
        if task not in TASKS:
            raise UserError(f"{where}: unknown task {task!r}; valid: {list(TASKS)}")
        if decision not in DECISIONS:
            raise UserError(f"{where}: unknown decision {decision!r}; valid: {list(DECISIONS)}")
        if decision != "wrong" or not new:
            kept[decision if decision != "wrong" else "wrong without a suggested label"] += 1
            continue
        if new not in classes[task]:
            raise UserError(f"{where}: suggested label {new!r} is not a {task} class of these shards "
                            f"(see class_names_{task}.txt)")
        fix = Correction(row["path"], task, row["assigned"], new)
        if corrections.get((fix.path, task), fix) != fix:
            raise UserError(f"{where}: {fix.path} has two different {task} corrections; keep one")
        corrections[(fix.path, task)] = fix
    return list(corrections.values()), kept


def relabel_shards(shards: str | Path, decisions: str | Path, out: str | Path) -> dict:
    """Copy the shard set `shards` to `out` with the corrections of `decisions` applied to the labels.

    Images are copied byte for byte; only the json members of corrected samples change. The new
    manifest lists every correction (and keeps those of earlier relabels) under "relabels".
    Returns the new manifest.json tree.
    """
    shards, out = Path(shards), Path(out)
    manifest = read_manifest(shards)
    if out.exists() and (out.resolve() == shards.resolve() or any(out.iterdir())):
        raise UserError(f"--out {out} is not empty; give a new folder (the source shards stay as they are)")
    corrections, kept = read_decisions(decisions, manifest.classes)
    for split in manifest.splits:  # the copies get fresh checksums: a damaged source must not pass as sound
        verify_split(shards, manifest, split)
    todo = {(c.path, c.task): c for c in corrections}
    out.mkdir(parents=True, exist_ok=True)
    try:  # everything in `out` is ours (it was empty): a failure leaves no half-written shard set
        splits, applied = _copy_shards(shards, out, manifest, todo)
    except BaseException:
        shutil.rmtree(out)
        raise
    missing = sorted(set(todo) - {(c["path"], c["task"]) for c in applied})
    if missing:
        shutil.rmtree(out)
        path, task = missing[0]
        raise UserError(f"{len(missing)} correction(s) name paintings not in {shards}, e.g. {path} ({task}); "
                        "were the decisions exported from a report on these shards?")
    for task in TASKS:
        shutil.copyfile(shards / f"class_names_{task}.txt", out / f"class_names_{task}.txt")
    relabels = [*manifest.extra.get("relabels", []), {
        "source": str(shards), "decisions": str(decisions), "corrections": applied,
        "not_applied": dict(sorted(kept.items())),
    }]
    tree = dataclasses.replace(manifest, shards_dir=out, splits=splits,
                               extra={**manifest.extra, "relabels": relabels}).to_json()
    _write_atomic(out / MANIFEST_NAME, json.dumps(tree) + "\n")
    return tree


def _copy_shards(shards: Path, out: Path, manifest: Manifest, todo: dict[tuple[str, str], Correction]
                 ) -> tuple[dict[str, SplitInfo], list[dict]]:
    """Every shard of `manifest` rewritten into `out` with `todo` applied; the splits with the new
    shards' sha256s, and the record of each correction applied."""
    applied: list[dict] = []
    splits = {}
    for split, info in manifest.splits.items():
        new_shards = []
        for shard in info.shards:
            src, dst = shards / shard.name, out / shard.name
            tmp = dst.with_name(dst.name + ".tmp")
            with tarfile.open(src) as tar_in, TarWriter(tmp) as tar_out:
                for member in tar_in:
                    data = tar_in.extractfile(member).read()
                    if member.name.endswith(".json"):
                        data, changes = _apply(json.loads(data), todo, manifest.classes, split)
                        applied += changes
                    tar_out.add(member.name, data)
            tmp.replace(dst)
            new_shards.append(dataclasses.replace(shard, sha256=tar_out.sha256))
        splits[split] = dataclasses.replace(info, shards=tuple(new_shards))
    return splits, applied


def _apply(meta: dict, todo: dict[tuple[str, str], Correction], classes: dict[str, list[str]],
           split: str) -> tuple[bytes, list[dict]]:
    """One sample's json member with its corrections applied, and the record of each."""
    changes = []
    for task in TASKS:
        fix = todo.get((meta["path"], task))
        if fix is None:
            continue
        names = classes[task]
        current = names[meta[task]] if meta[task] >= 0 else ""
        if current != fix.assigned:
            raise UserError(f"{meta['path']}: the decisions say its {task} label is {fix.assigned!r} but the "
                            f"shards say {current!r}; were they exported from a report on these shards?")
        meta[task] = names.index(fix.new)
        changes.append({"path": meta["path"], "task": task, "split": split, "from": fix.assigned, "to": fix.new})
    return json.dumps(meta).encode("utf-8"), changes
