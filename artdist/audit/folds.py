"""Audit plan: K stratified folds of every labelled painting, and the shard views each fold run reads."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from artdist.config import JobConfig, apply_overrides, from_dict, to_dict
from artdist.data.manifest import MANIFEST_NAME, Manifest, SplitInfo, read_manifest
from artdist.errors import UserError
from artdist.rundir import dir_entry

# The splits of a fold's shard view: what model k trains on, what it scores out of sample (fold k),
# and what it scores in sample (fold k+1, for the in-sample vs out-of-sample comparison).
TRAIN, HELDOUT, INSAMPLE = "train", "heldout", "insample"
ALL = "all"  # the split of RUN_DIR/shards: every audited sample, for the merged report


@dataclass(frozen=True)
class Sample:
    """One audited sample: where it lives in the shards and what the fold assignment needs."""

    split: str
    shard: str  # file name in the shard folder
    key: str
    id: int
    path: str
    painting: int
    label: int  # primary task; -1 unknown


class AuditDir:
    """File names of an audit (RUN_DIR = the job's run dir): plan, fold table, one run dir per fold."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    plan = dir_entry("plan.json")
    table = dir_entry("folds.csv")
    shards = dir_entry("shards")
    summary = dir_entry("summary.json")
    probs = dir_entry("oos_probs.npz")  # out-of-sample softmax of every audited sample per task (a peer's input)

    def fold(self, k: int) -> Path:
        return self.path / "folds" / str(k)

    def fold_scores(self, k: int) -> Path:
        return self.fold(k) / "scores.npz"

    def fold_done(self, k: int) -> Path:
        """Written last by a fold run: the plan fingerprint it was trained and scored under."""
        return self.fold(k) / "done.json"

    def fold_log(self, k: int) -> Path:
        return self.fold(k) / "train.log"


def painting_id(meta: dict) -> int:
    """The painting a sample is a copy of: the shard's `painting_id`, else derived from the file name as
    `artdist shard` derives it (63 bits of sha1 of the path after its last '/')."""
    if "painting_id" in meta:
        return int(meta["painting_id"])
    name = meta["path"].rsplit("/", 1)[-1]
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") >> 1


def read_samples(manifest: Manifest, splits: list[str], primary_task: str) -> list[Sample]:
    """Every sample of `splits`, in split then shard order."""
    return [Sample(split, s.shard, s.key, int(s.meta["id"]), s.meta["path"], painting_id(s.meta),
                   int(s.meta[primary_task]))
            for split in splits for s in manifest.samples(split)]


def assign_folds(samples: list[Sample], k: int) -> list[int]:
    """Fold of each sample: all copies of a painting in one fold, stratified by the primary label.

    A painting's stratum is the primary label of its lowest-id copy. Strata are dealt in label order,
    each stratum's paintings in sha1(painting id) order, round robin over the folds with one counter
    for all strata: fold sizes differ by at most one painting and every class is spread evenly.
    Depends only on the painting ids and labels, so it is the same on every run and machine.
    """
    first: dict[int, Sample] = {}
    for s in samples:
        if s.painting not in first or s.id < first[s.painting].id:
            first[s.painting] = s

    def order(p: int) -> tuple[int, str]:
        return first[p].label, hashlib.sha1(f"fold:{p}".encode()).hexdigest()

    fold_of = {p: n % k for n, p in enumerate(sorted(first, key=order))}
    return [fold_of[s.painting] for s in samples]


def audit_splits(cfg: JobConfig, manifest: Manifest) -> list[str]:
    """audit.splits, or every split of the shards that holds samples."""
    available = [s for s in manifest.splits if manifest.num_samples(s) > 0]
    chosen = cfg.audit.splits or available
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise UserError(f"audit split(s) {unknown} are not in {cfg.data.shards}/{MANIFEST_NAME} or have no "
                        f"samples; it has {available}")
    return list(chosen)


def recipe(cfg: JobConfig) -> JobConfig:
    """The job with the audit section's changes for its fold runs (epochs, overrides)."""
    changes = [*((f"train.epochs={cfg.audit.epochs}",) if cfg.audit.epochs else ()), *cfg.audit.overrides]
    return from_dict(apply_overrides(to_dict(cfg), changes), "audit.overrides") if changes else cfg


def fold_config(cfg: JobConfig, k: int) -> JobConfig:
    """Fold k as an ordinary run: RUN_DIR/folds/k, reading its shard view (train on the other folds,
    validate on fold k); no test split and no end-of-run outlier reports (the fold's scores replace them)."""
    base = recipe(cfg)
    fold_dir = AuditDir(cfg.run_dir).fold(k)
    tree = to_dict(base)
    tree.update(name=f"{cfg.name}-fold{k}", out_dir=str(fold_dir))
    tree["data"].update(shards=str(fold_dir / "shards"), train_split=TRAIN, val_split=HELDOUT, test_split="test")
    tree["outliers"]["enabled"] = False
    return from_dict(tree, f"fold {k} of {cfg.run_dir}")


def fingerprint(cfg: JobConfig, samples: list[Sample], folds: list[int]) -> str:
    """What makes fold results comparable: the fold training recipe, how folds score, the fold of every sample."""
    tree = to_dict(recipe(cfg))
    kept = {section: tree[section] for section in ("data", "model", "train")}
    kept["audit"] = {"folds": cfg.audit.folds}
    kept["outliers"] = {"tta": cfg.outliers.tta}  # each fold scores its paintings at its end
    text = json.dumps({"recipe": kept, "folds": sorted((s.split, s.key, f) for s, f in zip(samples, folds))},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _view(manifest: Manifest, members: dict[str, list[Sample]], audit: dict) -> Manifest:
    """A manifest over the shared shards (named by absolute path): each split keeps only its samples
    (keys in <split>.keys); `extra` records the source folder and the audit (fingerprint, fold)."""
    entries = {(split, sh.name): sh for split, info in manifest.splits.items() for sh in info.shards}
    splits = {}
    for split, chosen in members.items():
        counts: dict[tuple[str, str], int] = {}
        for s in chosen:
            counts[(s.split, s.shard)] = counts.get((s.split, s.shard), 0) + 1
        shards = tuple(dataclasses.replace(entries[where], name=str((manifest.shards_dir / where[1]).resolve()),
                                           num_samples=n) for where, n in counts.items())
        splits[split] = SplitInfo(len(chosen), shards, keep=f"{split}.keys")
    extra = {**manifest.extra, "source": str(manifest.shards_dir.resolve()), "audit": audit}
    return dataclasses.replace(manifest, splits=splits, extra=extra)


def _write_view(out: Path, view: Manifest, members: dict[str, list[Sample]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, chosen in members.items():
        _atomic_write(out / f"{split}.keys", "".join(f"{s.key}\n" for s in chosen))
    _atomic_write(out / MANIFEST_NAME, json.dumps(view.to_json(), indent=1))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def write_plan(cfg: JobConfig) -> dict:
    """Assign the folds and write RUN_DIR/plan.json, folds.csv, shards/ and each fold's shards/ view.

    An audit dir holding a plan with another fingerprint (other shards, folds, recipe or outliers.tta) is
    refused: its folds would mix two audits. Returns the plan.
    """
    start = time.perf_counter()
    k, audit_dir = cfg.audit.folds, AuditDir(cfg.run_dir)
    shards_dir = Path(cfg.data.shards)
    manifest = read_manifest(shards_dir)
    splits = audit_splits(cfg, manifest)
    samples = read_samples(manifest, splits, cfg.model.primary_task)
    folds = assign_folds(samples, k)
    plan = {"fingerprint": fingerprint(cfg, samples, folds), "folds": k, "splits": splits,
            "num_samples": len(samples), "shards": str(shards_dir.resolve()),
            "fold_sizes": [folds.count(f) for f in range(k)]}
    if audit_dir.plan.is_file():
        old = json.loads(audit_dir.plan.read_text())
        if old.get("fingerprint") != plan["fingerprint"]:
            raise UserError(f"{audit_dir.path} holds an audit of other shards, folds, recipe or outliers.tta (plan "
                            f"{old.get('fingerprint')}, now {plan['fingerprint']}): set out_dir to a new "
                            "directory, or move that one away")
        plan["plan_s"] = old.get("plan_s", 0.0)
    audit_dir.path.mkdir(parents=True, exist_ok=True)
    with open(audit_dir.table.with_suffix(".tmp"), "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["split", "id", "key", "path", "painting_id", "fold"])
        out.writerows((s.split, s.id, s.key, s.path, s.painting, fold) for s, fold in zip(samples, folds))
    audit_dir.table.with_suffix(".tmp").replace(audit_dir.table)
    audit = {"fingerprint": plan["fingerprint"], "folds": k}
    _write_view(audit_dir.shards, _view(manifest, {ALL: samples}, audit), {ALL: samples})
    for fold in range(k):
        members = {TRAIN: [s for s, f in zip(samples, folds) if f != fold],
                   HELDOUT: [s for s, f in zip(samples, folds) if f == fold],
                   INSAMPLE: [s for s, f in zip(samples, folds) if f == (fold + 1) % k]}
        view = _view(manifest, members, {**audit, "fold": fold})
        _write_view(audit_dir.fold(fold) / "shards", view, members)
    plan.setdefault("plan_s", round(time.perf_counter() - start, 3))
    _atomic_write(audit_dir.plan, json.dumps(plan, indent=1))
    return plan


def read_plan(run_dir: str | Path) -> dict:
    path = AuditDir(run_dir).plan
    if not path.is_file():
        raise UserError(f"{path} does not exist: run `artdist audit --config ...` (without --fold/--merge) first")
    return json.loads(path.read_text())


def fold_finished(run_dir: str | Path, k: int, plan: dict) -> bool:
    """Fold k has been trained and scored under this plan."""
    done = AuditDir(run_dir).fold_done(k)
    try:
        return json.loads(done.read_text()).get("fingerprint") == plan["fingerprint"]
    except (OSError, ValueError):
        return False
