"""Copies of one picture: content hashes at shard time, grouping by index, leakage policy, planted-copy scoring."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from artdist.config import TASKS
from artdist.data.catalog import EVALUATION_ORDER
from artdist.data.manifest import Manifest
from artdist.data.tarwriter import TarWriter
from artdist.data.transforms import resize_pixels
from artdist.errors import UserError

HASHES = "sha256+phash256t"  # what each sample's json carries; in the shard fingerprint, so old shards are redone
HASH_FIELDS = ("sha256", "phash")
POLICIES = ("move", "drop", "report")
PLANTED_NAME = "planted_duplicates.csv"
PLANTED_FIELDS = ("path", "original", "kind", "split", "original_split")
MAX_SHOWN = 5
MIN_BITS = 32  # a perceptual hash with fewer ones is a flat picture's (0) and matched by bytes only


PHASH_GRID = 32  # the picture as 32x32 grey cells; their 16x16 lowest DCT frequencies give the 256 bits
PHASH_SIDE = 16
PHASH_BITS = PHASH_SIDE * PHASH_SIDE
_DCT = np.cos(np.pi * (2 * np.arange(PHASH_GRID)[None, :] + 1) * np.arange(PHASH_SIDE)[:, None] / (2 * PHASH_GRID)
              ).astype(np.float32)
FLAT_RANGE = 2  # grey levels: a thumbnail spanning no more than this has no shape to hash
GREY = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luma, as PIL's convert("L"/"F")
# The thumbnail comes straight from the picture's pixels by the sharder's own resize (torch's antialiased
# bilinear, uint8), at three times the grid and averaged 3x3 in float: 32x32 uint8 cells, rounded to
# whole levels, moved the copies of dark, nearly flat paintings past dup_hamming; 2x lost more real
# copies than the PIL float-grey thumbnail it replaces, 3x no more (docs/benchmarks.md).
PHASH_POOL = 3
PHASH_THUMB = PHASH_POOL * PHASH_GRID


def perceptual_hash(pixels: torch.Tensor) -> str:
    """256-bit pHash of a picture (uint8 [h, w, 3] pixels), 64 hex digits: which of the 16x16 lowest DCT
    frequencies of its 32x32 grey thumbnail are above their median (DC excluded). A flat picture's is 0,
    matched by bytes only."""
    thumb = resize_pixels(pixels, (PHASH_THUMB, PHASH_THUMB)).to(torch.float32) @ GREY
    grey = thumb.view(PHASH_GRID, PHASH_POOL, PHASH_GRID, PHASH_POOL).mean((1, 3)).numpy()
    if grey.max() - grey.min() <= FLAT_RANGE:
        return "0" * (PHASH_BITS // 4)
    low = (_DCT @ grey @ _DCT.T).ravel()
    middle = (PHASH_BITS - 1) // 2  # the AC terms are an odd count: their median is one of them
    return np.packbits(low > np.partition(low[1:], middle)[middle]).tobytes().hex()


def sample_hashes(source: bytes, pixels: torch.Tensor) -> list[str]:
    """HASH_FIELDS of one sharded image: sha256 of its source file's bytes, pHash of its prepared pixels."""
    return [hashlib.sha256(source).hexdigest(), perceptual_hash(pixels)]


def hash_codes(hexes: list[str]) -> np.ndarray:
    """[N, words] uint64 of equal-length hex hashes (most significant word first)."""
    if not hexes:
        return np.zeros((0, PHASH_BITS // 64), np.uint64)
    raw = np.frombuffer(bytes.fromhex("".join(hexes)), dtype=">u8")
    return raw.reshape(len(hexes), -1).astype(np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits differing between rows of two [N, words] uint64 code arrays."""
    return np.bitwise_count(a ^ b).sum(axis=-1, dtype=np.int64)


# --------------------------------------------------------------------------- grouping


def near_pairs(codes: np.ndarray, max_distance: int) -> np.ndarray:
    """[P, 2] index pairs (i < j) of [N, words] uint64 codes differing in at most max_distance bits.

    Multi-index hashing: cut the bits into (at least) max_distance + 1 bands; two codes within the distance
    agree exactly on at least one band (pigeonhole), so only codes sharing a band value are compared.
    Work is O(n log n + candidate pairs), not O(n^2).
    """
    n, words = codes.shape
    bits = np.unpackbits(codes.astype(">u8").view(np.uint8).reshape(n, 8 * words), axis=1)
    found = [np.zeros((0, 2), np.int64)]
    edges = np.linspace(0, 64 * words, max(max_distance + 1, words) + 1).astype(int)  # bands of <= 64 bits
    for lo, hi in zip(edges[:-1], edges[1:]):
        band = np.packbits(bits[:, lo:hi], axis=1)  # rows of <= 64 bits: one sortable key per code
        band = np.pad(band, ((0, 0), (0, 8 - band.shape[1]))).view(">u8").ravel()
        order = np.argsort(band, kind="stable")
        ordered = band[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        lengths = np.diff(np.r_[starts, n])
        run_end = np.repeat(starts + lengths, lengths)
        active = np.flatnonzero(run_end - np.arange(n) > 1)
        offset = 1
        while active.size:  # pairs (k, k + offset) inside one run of equal band values
            a, b = order[active], order[active + offset]
            close = hamming(codes[a], codes[b]) <= max_distance
            found.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)[close])
            offset += 1
            active = active[run_end[active] - active > offset]
    return np.unique(np.concatenate(found), axis=0)


def components(n: int, pairs: np.ndarray) -> list[list[int]]:
    """Connected components with more than one member, each sorted, in order of their first member."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs.tolist():
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        members[root(i)].append(i)
    return sorted((m for m in members.values() if len(m) > 1), key=lambda m: m[0])


def group_samples(samples: list[dict], max_distance: int) -> list[dict]:
    """Groups of samples that are one picture: same source bytes or perceptual hashes within max_distance bits.

    `samples`: dicts with path, id, painting_id, split, the TASKS labels, sha256 and phash (flat pictures, whose
    phash has fewer than MIN_BITS ones, are matched by bytes only). Each group: kind
    ('exact': one sha256; 'near'), leakage (in more than one split), several_classes (tasks whose
    known labels differ), members. Copies sharing a painting_id (file name) always join one group
    ('name' when their bytes differ and nothing else joins them).
    """
    codes = hash_codes([s["phash"] for s in samples])
    by_bytes: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_bytes[s["sha256"]].append(i)
    by_painting: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_painting[s.get("painting_id", -1 - i)].append(i)
    # Same bytes, or one file name in several style folders (catalog.painting_id): one picture.
    exact = [(m[0], j) for groups in (by_bytes, by_painting) for m in groups.values() for j in m[1:]]
    informative = np.flatnonzero(np.bitwise_count(codes).sum(axis=1) >= MIN_BITS)
    near = informative[near_pairs(codes[informative], max_distance)]
    pairs = np.concatenate([near, np.array(exact, np.int64).reshape(-1, 2)])
    groups = []
    for members in components(len(samples), pairs):
        rows = [samples[i] for i in members]
        groups.append(describe_group(rows, "exact" if len({r["sha256"] for r in rows}) == 1
                                     else "name" if len({r.get("painting_id") for r in rows}) == 1 else "near"))
    return groups


def describe_group(rows: list[dict], kind: str) -> dict:
    """A group of copies as reported: kind, leakage (more than one split), several_classes (tasks whose
    known labels differ) and members (path, id, painting_id, split, labels)."""
    return {
        "kind": kind,
        "leakage": len({r["split"] for r in rows}) > 1,
        "several_classes": [t for t in TASKS if len({r[t] for r in rows if r[t] >= 0}) > 1],
        "members": [{k: r[k] for k in ("path", "id", "painting_id", "split", *TASKS) if k in r} for r in rows],
    }


def leak_actions(groups: list[dict], policy: str) -> list[dict]:
    """What `policy` does to the copies of each leaking group that are outside the split nearest evaluation:
    move: {"path", "from", "to": that split}; drop: {"path", "from", "to": ""}; report: nothing. The
    members acted on get their new split ("" when dropped) and "moved_from"."""
    if policy not in POLICIES:
        raise UserError(f"shard.duplicate_policy = {policy!r} is not one of {list(POLICIES)}")
    actions = []
    for group in groups:
        if not group["leakage"] or policy == "report":
            continue
        target = min((m["split"] for m in group["members"]), key=EVALUATION_ORDER.index)
        for m in group["members"]:
            if m["split"] != target:
                actions.append({"path": m["path"], "from": m["split"], "to": target if policy == "move" else ""})
                m["moved_from"], m["split"] = m["split"], actions[-1]["to"]
    return sorted(actions, key=lambda a: a["path"])


def manifest_groups(manifest: Manifest) -> list[dict]:
    """The duplicate groups `artdist shard` wrote into the manifest (none for older shards)."""
    return manifest.extra.get("duplicates", {}).get("groups", [])


def copy_labels(manifest: Manifest) -> dict[int, dict[str, set[int]]]:
    """Sample id -> task -> the labels the other copies of its picture carry (the manifest's duplicate groups)."""
    out: dict[int, dict[str, set[int]]] = {}
    for group in manifest_groups(manifest):
        for m in group["members"]:
            out[m["id"]] = {t: {o[t] for o in group["members"] if o is not m and o[t] >= 0} for t in TASKS}
    return out


def copies_lost(manifest: Manifest, split: str, task: str) -> int:
    """Samples of `split` that a model giving one picture one class must get wrong: of each group of
    copies there, only those with the group's most common label can be right (the accuracy ceiling)."""
    lost = 0
    for group in manifest_groups(manifest):
        labels = Counter(m[task] for m in group["members"] if m["split"] == split and m[task] >= 0)
        lost += sum(labels.values()) - max(labels.values(), default=0)
    return lost


# --------------------------------------------------------------------------- applying the policy to shards


def apply_actions(out: Path, samples: dict[str, dict], actions: list[dict], new_names: dict[str, str]) -> dict:
    """Take the acted-on samples out of their shards (raw tar members, no decode) and put the moved
    ones, their json's split changed, into one new shard per destination split (`new_names`).

    `samples`: path -> dict with "shard" and "key". Returns {shard name: {name, num_samples, sha256,
    bytes}} for every rewritten or new shard.
    """
    by_shard: dict[str, dict[str, dict]] = defaultdict(dict)
    for action in actions:
        sample = samples[action["path"]]
        by_shard[sample["shard"]][sample["key"]] = action
    moved: dict[str, list[tuple[str, str, bytes]]] = defaultdict(list)
    shards = {}
    for name, acted in sorted(by_shard.items()):
        tmp, kept = out / f"{name}.tmp", set()
        with tarfile.open(out / name) as tar_in, TarWriter(tmp) as tar_out:
            for member in tar_in:
                key = member.name.partition(".")[0]
                data = tar_in.extractfile(member).read()
                action = acted.get(key)
                if action is None:
                    tar_out.add(member.name, data)
                    kept.add(key)
                elif action["to"]:
                    if member.name.endswith(".json"):
                        data = json.dumps({**json.loads(data), "split": action["to"], "moved_from": action["from"]}
                                          ).encode("utf-8")
                    moved[action["to"]].append((action["path"], member.name, data))
        os.replace(tmp, out / name)
        shards[name] = _shard_record(name, len(kept), tar_out)
    for split, items in sorted(moved.items()):
        with TarWriter(out / new_names[split]) as tar:
            for _, member, data in sorted(items, key=lambda item: item[:2]):
                tar.add(member, data)
        shards[new_names[split]] = _shard_record(new_names[split], len(items) // 2, tar)
    return shards


def _shard_record(name: str, num_samples: int, tar: TarWriter) -> dict:
    return {"name": name, "num_samples": num_samples, "sha256": tar.sha256, "bytes": tar.size}


def summarize(report: dict) -> str:
    """The shard summary's lines about content duplicates."""
    groups = report["groups"]
    kinds = Counter(g["kind"] for g in groups)
    leaks = Counter("/".join(sorted({m["split"] for m in g["members"]})) for g in groups if g["leakage"])
    several = sum(bool(g["several_classes"]) for g in groups)
    lines = [f"duplicates (same bytes or file name, or pHash within {report['max_distance']} bits): {len(groups):,} groups "
             f"of {sum(len(g['members']) for g in groups):,} images (exact {kinds['exact']:,}, near {kinds['near']:,}, "
             f"same file name only {kinds['name']:,}); "
             f"filed under several classes {several:,}; leakage {sum(leaks.values()):,}"
             + (" (" + ", ".join(f"{k} {n}" for k, n in sorted(leaks.items())) + ")" if leaks else "")]
    acts = Counter((a["from"], a["to"] or "dropped") for a in report["actions"])
    lines.append(f"  policy {report['policy']}: " + (", ".join(
        f"{n} {src}->{dst}" if dst != "dropped" else f"{n} dropped from {src}" for (src, dst), n in sorted(acts.items()))
        or "nothing changed"))
    for g in [g for g in groups if g["leakage"]][:MAX_SHOWN]:
        lines.append("    " + "  |  ".join(f"{m['split']}: {m['path']}" for m in g["members"]))
    return "\n".join(lines)


# --------------------------------------------------------------------------- planted copies


def read_planted(path: str | Path) -> list[dict]:
    """The rows of planted_duplicates.csv (artdist synth --duplicates)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise UserError(f"cannot read planted duplicates {path}: {exc.strerror}; pass the {PLANTED_NAME} "
                        "written by `artdist synth --duplicates F`") from None
    if rows and not set(PLANTED_FIELDS) <= set(rows[0]):
        raise UserError(f"{path} lacks columns {sorted(set(PLANTED_FIELDS) - set(rows[0]))}; expected {PLANTED_NAME}")
    return rows


def score_planted(groups: list[list[str]], planted: list[dict], present: set[str]) -> dict:
    """Recall per kind (a planted copy counts when its group holds its original) and precision (share of
    the found within-group pairs that join a picture to a planted copy of it), over images in `present`."""
    family = {row["path"]: row["original"] for row in planted}
    where = {path: g for g, members in enumerate(groups) for path in members}
    recall: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in planted:
        if row["path"] in present and row["original"] in present:
            hit = row["path"] in where and where[row["path"]] == where.get(row["original"])
            recall[row["kind"]][0] += hit
            recall[row["kind"]][1] += 1
    pairs = true = 0
    for members in groups:
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                pairs += 1
                true += family.get(members[a], members[a]) == family.get(members[b], members[b])
    return {"recall": {k: {"found": f, "planted": n, "recall": round(f / n, 4) if n else None}
                       for k, (f, n) in sorted(recall.items())},
            "pairs": pairs, "true_pairs": true, "precision": round(true / pairs, 4) if pairs else None}


def planted_table(scores: dict[str, dict]) -> str:
    """Recall per kind and precision, one column per detector (e.g. hashes, embeddings)."""
    names = list(scores)
    kinds = sorted({k for s in scores.values() for k in s["recall"]})
    cell = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"{'planted copies':<22}" + "".join(f"{n:>20}" for n in names)]
    for kind in kinds:
        counts = next(s["recall"][kind]["planted"] for s in scores.values() if kind in s["recall"])
        lines.append(f"{f'recall {kind} ({counts})':<22}" + "".join(
            f"{cell(scores[n]['recall'].get(kind, {}).get('recall')):>20}" for n in names))
    lines.append(f"{'precision (pairs)':<22}" + "".join(
        f"{cell(scores[n]['precision']) + ' (' + format(scores[n]['pairs'], ',') + ')':>20}" for n in names))
    return "\n".join(lines)
