"""Images + ArtGAN label files -> deterministic, resumable WebDataset tar shards and a manifest."""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import multiprocessing
import os
import re
import sys
from collections import Counter
from pathlib import Path

from artdist.config import TASKS, ShardConfig, to_dict
from artdist.data import duplicates
from artdist.data.catalog import SPLITS, Catalog, assign_splits, load_catalog, path_key
from artdist.data.image import BadImage, prepare_image, read_source, shard_member
from artdist.data.manifest import MANIFEST_FORMAT, MANIFEST_NAME, Manifest, ShardInfo, SplitInfo
from artdist.data.tarwriter import TarWriter
from artdist.errors import UserError
from artdist.progress import Progress

EXTENSIONS = {"jpeg": "jpg", "webp": "webp", "png": "png"}
KEY_HEX_DIGITS = 16
DONE_DIR = ".done"
# Options that change what a shard holds; a done record made under other values is redone.
CONTENT_OPTIONS = ("images", "max_short_side", "resample", "format", "quality", "max_pixels", "passthrough")
# shard.workers=0 starts one process per this many images, up to every core: a spawned worker first
# spends seconds importing torch, more than a small folder's whole work (docs/benchmarks.md).
IMAGES_PER_WORKER = 1000
SHARD_NAME = re.compile(rf"(?:{'|'.join(SPLITS)})-[0-9]{{6}}\.tar")  # shard_name()'s pattern


def sample_key(path: str) -> str:
    """WebDataset key of an image: never contains a dot (WikiArt file names do)."""
    return hashlib.sha1(path.encode("utf-8")).hexdigest()[:KEY_HEX_DIGITS]


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def shard_ranges(n: int, samples_per_shard: int, min_shards: int) -> list[tuple[int, int]]:
    """[start, end) of each shard of an n-sample split, sizes differing by at most one.

    At least min(min_shards, n) shards, so every DDP rank x loader worker gets one.
    """
    k = max(math.ceil(n / samples_per_shard), min(min_shards, n))
    return [(j * n // k, (j + 1) * n // k) for j in range(k)]


# --------------------------------------------------------------------------- one shard


@dataclasses.dataclass(frozen=True)
class _ShardJob:
    name: str
    out: str
    samples: tuple[dict, ...]  # the json member of each sample
    options: dict  # CONTENT_OPTIONS values
    fingerprint: str


def _fingerprint(options: dict, samples: list[dict]) -> str:
    text = json.dumps([options, samples], sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_shard(job: _ShardJob) -> dict:
    """Write one shard (tmp file, then rename) and its done record; returns the record."""
    out, opts = Path(job.out), job.options
    ext = EXTENSIONS[opts["format"]]
    tmp = out / f"{job.name}.tmp"
    skipped, written, as_is, hashes = [], 0, [], {}
    with TarWriter(tmp) as tar:
        for sample in job.samples:
            try:
                source = read_source(Path(opts["images"]) / sample["path"])
                pixels = prepare_image(source, opts["max_short_side"], opts["max_pixels"], opts["resample"])
            except BadImage as exc:
                skipped.append({"path": sample["path"], "reason": exc.reason,
                                **({"detail": exc.detail} if exc.detail else {})})
                continue
            key = sample_key(sample["path"])
            hashes[sample["path"]] = duplicates.sample_hashes(source, pixels)
            sample = {**sample, **dict(zip(duplicates.HASH_FIELDS, hashes[sample["path"]]))}
            data, own = shard_member(source, pixels, opts["format"], opts["quality"], opts["passthrough"])
            as_is += [sample["path"]] if own else []
            tar.add(f"{key}.{ext}", data)
            tar.add(f"{key}.json", json.dumps(sample).encode("utf-8"))
            written += 1
    os.replace(tmp, out / job.name)
    record = {
        "name": job.name,
        "num_samples": written,
        "stored_as_is": as_is,
        "sha256": tar.sha256,
        "bytes": tar.size,
        "images": len(job.samples),
        "skipped": skipped,
        "fingerprint": job.fingerprint,
        "hashes": hashes,
    }
    _write_atomic(out / DONE_DIR / f"{job.name}.json", json.dumps(record, indent=1))
    return record


def _finished(out: Path, job: _ShardJob) -> dict | None:
    """The done record of a shard an earlier run completed with the same content, else None."""
    try:
        record = json.loads((out / DONE_DIR / f"{job.name}.json").read_text(encoding="utf-8"))
        size = (out / job.name).stat().st_size
    except (OSError, ValueError):
        return None
    return record if record.get("fingerprint") == job.fingerprint and record.get("bytes") == size else None


# --------------------------------------------------------------------------- the dataset


def _present(images: Path, paths: list[str]) -> list[bool]:
    """Whether each path exists, listing each folder once (cheap for 80k mostly missing files)."""
    listings: dict[str, set[str]] = {}
    found = []
    for path in paths:
        folder, _, name = path.rpartition("/")
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(images / folder))
            except OSError:
                listings[folder] = set()
        found.append(name in listings[folder])
    return found


def _check_images(cfg: ShardConfig) -> None:
    """The config's ranges were checked when it was built; the image folder can only be checked here."""
    if not Path(cfg.images).is_dir():
        raise UserError(f"--images {cfg.images} is not a folder; point it at the folder holding the "
                        "style folders (Impressionism/, Baroque/, ...)")


def _plan(cfg: ShardConfig, catalog: Catalog, splits: list[str], present: list[bool]) -> dict[str, list[_ShardJob]]:
    options = {**{k: getattr(cfg, k) for k in CONTENT_OPTIONS}, "hashes": duplicates.HASHES}
    plan = {}
    for split in SPLITS:
        samples = [
            {"path": r.path, "id": r.id, "painting_id": r.painting_id, **dict(zip(TASKS, r.labels)), "split": split}
            for r, s, ok in zip(catalog.records, splits, present) if s == split and ok
        ]
        # Ids follow the sorted paths, i.e. the style folders: in id order a shard would hold one or
        # two styles, and the loader's shard shuffle + buffer could not mix a batch from that.
        samples.sort(key=lambda sample: path_key(f"shard-order:{cfg.seed}", sample["path"]))
        plan[split] = [
            _ShardJob(shard_name(split, j), str(cfg.out), tuple(samples[a:b]), options,
                      _fingerprint(options, samples[a:b]))
            for j, (a, b) in enumerate(shard_ranges(len(samples), cfg.samples_per_shard, cfg.min_shards))
        ]
    return plan


def _earlier_shards(out: Path) -> set[str] | None:
    """Shard names an earlier `artdist shard` run wrote into `out` (its manifest and done records), or
    None when `out` is not such a folder. Only names of the form split-NNNNNN.tar count."""
    manifest_path, done = out / MANIFEST_NAME, out / DONE_DIR
    names: set[str] = set()
    found = done.is_dir()
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT:
        found = True
        for entry in manifest.get("splits", {}).values():
            names |= {shard.get("name") for shard in entry.get("shards", []) if isinstance(shard, dict)}
    if done.is_dir():
        names |= {path.name.removesuffix(".json") for path in done.glob("*.json")}
    return {name for name in names if isinstance(name, str) and SHARD_NAME.fullmatch(name)} if found else None


def _remove_stale(out: Path, names: set[str], log) -> None:
    """Check `out` and drop what earlier runs of this command left there that this run does not keep:
    their shards and done records, and the temp files of an interrupted run. Nothing else is touched;
    a non-empty folder that no `artdist shard` run wrote is refused."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; pick a new or empty folder")
    earlier = _earlier_shards(out) if out.is_dir() else set()
    if earlier is None:
        entries = sorted(path.name for path in out.iterdir())
        if entries:
            raise UserError(f"--out {out} is not empty ({len(entries)} entries, e.g. {', '.join(entries[:3])}) and is not "
                            f"a shard folder (no artdist {MANIFEST_NAME} and no {DONE_DIR}/): nothing there is "
                            "removed or overwritten; pick a new or empty folder")
        earlier = set()
    done = out / DONE_DIR
    stale = [out / name for name in sorted(earlier - names)] + [done / f"{name}.json" for name in sorted(earlier - names)]
    stale += [out / f"{name}.tmp" for name in sorted(earlier | names)]
    stale += [done / f"{name}.json.tmp" for name in sorted(earlier | names)]
    stale += [out / f"{name}.tmp" for name in (MANIFEST_NAME, *(f"class_names_{task}.txt" for task in TASKS))]
    stale = [path for path in stale if path.is_file()]
    if stale:
        log(f"removing {len(stale)} file(s) an earlier `artdist shard` run left in {out}: "
            + ", ".join(str(path.relative_to(out)) for path in stale[:10]) + (" ..." if len(stale) > 10 else ""))
    for path in stale:
        path.unlink()


def worker_count(workers: int, images: int, shards: int, cores: int) -> int:
    """Processes to write `shards` shards of `images` images with shard.workers=`workers` on `cores` cores."""
    return min(workers or min(cores, max(1, images // IMAGES_PER_WORKER)), shards)


def _freeze_imports() -> None:
    """A pool worker's start, run once this module (so torch) is imported: see _run_jobs."""
    gc.freeze()


def _run_jobs(jobs: list[_ShardJob], workers: int, progress: Progress) -> list[dict]:
    """Write the shards, in this process or in a pool of worker_count processes, whole shards each.

    The objects alive when writing starts (torch's among them) are frozen out of the garbage collector,
    whose full passes over them were pauses worth several images (docs/benchmarks.md)."""
    records = []
    # The cores this process may use (a SLURM allocation), not every core of the node.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = worker_count(workers, sum(len(job.samples) for job in jobs), len(jobs), cores)
    if processes <= 1:
        ours = gc.get_freeze_count() == 0  # a caller's own freeze is left as it is
        if ours:
            gc.freeze()
        try:
            for job in jobs:
                records.append(_write_shard(job))
                progress.update(records[-1]["images"])
        finally:
            if ours:
                gc.unfreeze()
        return records
    # spawn: the parent may hold threads (torch) that fork would copy mid-state.
    with multiprocessing.get_context("spawn").Pool(processes, initializer=_freeze_imports) as pool:
        for record in pool.imap_unordered(_write_shard, jobs):
            records.append(record)
            progress.update(record["images"])
    return records


def _duplicates(cfg: ShardConfig, out: Path, plan: dict[str, list[_ShardJob]], records: dict[str, dict]
                ) -> tuple[dict, dict[str, list[str]]]:
    """Group the written samples by content, apply shard.duplicate_policy to the groups that straddle
    splits; returns the manifest's "duplicates" entry and the shard names per split."""
    samples = [{**s, "shard": job.name, "key": sample_key(s["path"]),
                **dict(zip(duplicates.HASH_FIELDS, records[job.name]["hashes"][s["path"]]))}
               for split in SPLITS for job in plan[split] for s in job.samples if s["path"] in records[job.name]["hashes"]]
    groups = duplicates.group_samples(samples, cfg.dup_hamming)
    actions = duplicates.leak_actions(groups, cfg.duplicate_policy)
    names = {split: [job.name for job in plan[split]] for split in SPLITS}
    new_names = {split: shard_name(split, len(plan[split])) for split in SPLITS}
    changed = duplicates.apply_actions(out, {s["path"]: s for s in samples}, actions, new_names)
    for name in changed:
        # A rewritten shard no longer matches its done record: a rerun redoes it and the policy again.
        (out / DONE_DIR / f"{name}.json").unlink(missing_ok=True)
        records[name] = {**records.get(name, {}), **changed[name]}
    for split, name in new_names.items():
        names[split] += [name] if name in changed else []
    report = {"max_distance": cfg.dup_hamming, "policy": cfg.duplicate_policy, "groups": groups,
              "actions": actions, "hash_fields": list(duplicates.HASH_FIELDS),
              "hashes": {s["path"]: [s[k] for k in duplicates.HASH_FIELDS] for s in samples}}
    return report, names


def shard_dataset(cfg: ShardConfig, progress: bool = True) -> dict:
    """Write cfg.out: shards per split, class_names_<task>.txt, manifest.json (last, atomically).

    Same inputs and options give byte-identical files with the same torch on one CPU family (its uint8
    resize, behind the pHash and shard.resample=bilinear, rounds differently on others); a rerun redoes
    only shards without a matching done record. Returns the manifest.
    """
    _check_images(cfg)
    log = (lambda text: print(text, file=sys.stderr)) if progress else (lambda text: None)
    catalog = load_catalog(cfg.labels)
    log(catalog.summary())
    splits = assign_splits(catalog, cfg.split, cfg.test_fraction, cfg.seed)
    images, out = Path(cfg.images), Path(cfg.out)
    present = _present(images, [r.path for r in catalog.records])
    if catalog.records and not any(present):
        raise UserError(f"none of the {len(catalog.records):,} images named in {cfg.labels} is under --images "
                        f"{cfg.images} (first expected: {images / catalog.records[0].path}); the --images "
                        "folder looks wrong: it should hold the style folders (Impressionism/, ...)")
    skipped = [{"path": r.path, "reason": "missing"} for r, ok in zip(catalog.records, present) if not ok]

    plan = _plan(cfg, catalog, splits, present)
    jobs = [job for split in SPLITS for job in plan[split]]
    _remove_stale(out, {job.name for job in jobs}, log)
    (out / DONE_DIR).mkdir(parents=True, exist_ok=True)
    # From the first change on, an earlier manifest would describe a mix of old and new shards
    # whose counts may even agree; without it, nothing reads the folder until this run finishes.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    records = {job.name: _finished(out, job) for job in jobs}
    todo = [job for job in jobs if records[job.name] is None]
    if len(todo) < len(jobs):
        log(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} shards already done")
    bar = Progress(len(todo), "shards", enabled=progress)
    records.update({r["name"]: r for r in _run_jobs(todo, cfg.workers, bar)})
    dups, shards = _duplicates(cfg, out, plan, records)

    for task in TASKS:
        _write_atomic(out / f"class_names_{task}.txt", "".join(f"{name}\n" for name in catalog.classes[task]))
    skipped += [s for job in jobs for s in records[job.name]["skipped"]]
    dropped = {a["path"] for a in dups["actions"] if not a["to"]}
    skipped += [{"path": path, "reason": "leaking copy dropped"} for path in sorted(dropped)]
    skipped.sort(key=lambda s: s["path"])
    splits = {split: SplitInfo(sum(records[name]["num_samples"] for name in shards[split]),
                               tuple(ShardInfo(**{k: records[name][k] for k in ("name", "num_samples", "sha256")})
                                     for name in shards[split]))
              for split in SPLITS}
    # The output folder is where the manifest lives; leaving it out of the options keeps copies identical.
    as_is = sorted({path for r in records.values() for path in r.get("stored_as_is", ())} - dropped)
    extra = {"options": {k: v for k, v in to_dict(cfg).items() if k != "out"}, "anomalies": catalog.anomalies,
             "skipped": skipped, "duplicates": dups, "stored_as_is": as_is}
    manifest = Manifest(out, splits, catalog.classes, EXTENSIONS[cfg.format], extra).to_json()
    # No indent: json's C encoder only runs without one, and 80k skipped entries take seconds else.
    _write_atomic(out / MANIFEST_NAME, json.dumps(manifest) + "\n")

    reasons = Counter(s["reason"] for s in skipped)
    written = sum(records[name]["num_samples"] for names in shards.values() for name in names)
    size = sum(records[name]["bytes"] for names in shards.values() for name in names)
    log(duplicates.summarize(dups))
    log(f"{written:,} images in {len(jobs)} shards ({len(jobs) - len(todo)} reused), {size / 2**20:.1f} MiB"
        + (f" ({len(as_is):,} JPEGs stored as they are: shard.passthrough)" if as_is else "") + ", "
        f"{bar.rate():.1f} images/s; skipped {len(skipped):,}"
        + (": " + ", ".join(f"{reason} {n:,}" for reason, n in sorted(reasons.items())) if skipped else ""))
    return manifest
