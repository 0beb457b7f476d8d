"""Near-duplicate paintings by a copy descriptor and neighbour-relative similarity (chunked exact k-NN), and their reports."""
from __future__ import annotations

import csv
import html
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from artdist import dist
from artdist.config import TASKS, JobConfig
from artdist.data import duplicates as hashes
from artdist.data.catalog import SPLITS
from artdist.data.manifest import Manifest
from artdist.data.transforms import DeviceTransform
from artdist.model import CNNLSTM
from artdist.outliers.report import data_uri, read_images, read_sample_index
from artdist.rundir import RunDir
from artdist.train.evaluation import eval_batches
from artdist.train.numerics import autocast, use_channels_last

MAX_GROUPS_SHOWN = 200  # groups drawn in index.html; the CSV/JSON hold them all
CSV_FIELDS = ("group", "kind", "leakage", "several_classes", "path", "id", "split", *TASKS, "cosine")


def copy_pairs(emb: torch.Tensor, ratio: float, neighbours: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) of unit rows where j is among i's nearest and stands out from the paintings merely
    alike: cosine distance 1 - cos(i, j) < ratio x the distance to i's `neighbours`-th nearest row. Also
    the pairs' cosine similarities.

    Exact k-NN in blocks of `chunk` query rows: memory O(chunk x N), never N x N. A fixed cosine
    threshold does not work here: distinct paintings of one style can be closer than a crop is to its
    original, so each image's own neighbourhood sets the scale (docs/benchmarks.md, Duplicates).
    """
    n = emb.shape[0]
    found_pairs, found_sims = [np.zeros((0, 2), np.int64)], [np.zeros(0, np.float32)]
    if n < 2:
        return found_pairs[0], found_sims[0]
    k = min(neighbours, n - 1)
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=emb.device)
        sims = emb[rows] @ emb.T
        sims[torch.arange(len(rows), device=emb.device), rows] = -2.0  # never a row with itself
        values, index = sims.topk(k, dim=1)
        keep = (1 - values) < ratio * (1 - values[:, -1:])
        keep[:, -1] = False  # the reference itself
        i, j = rows[:, None].expand_as(index)[keep], index[keep]
        found_pairs.append(torch.stack([torch.minimum(i, j), torch.maximum(i, j)], 1).cpu().numpy())
        found_sims.append(values[keep].float().cpu().numpy())
    pairs, sims = np.concatenate(found_pairs), np.concatenate(found_sims)
    pairs, first = np.unique(pairs, axis=0, return_index=True)  # found from both ends: once
    return pairs, sims[first]


def descriptor_pairs(desc: torch.Tensor, widths: tuple[int, ...], ratio: float, neighbours: int,
                     chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """copy_pairs on each part of the copy descriptors [N, sum(widths)], joined: a pair any part finds,
    with its highest cosine. Each part is centred on the dataset's mean first: what every painting
    shares says nothing about copies."""
    found = [copy_pairs(nn.functional.normalize(part - part.mean(0), dim=1), ratio, neighbours, chunk)
             for part in torch.split(desc, list(widths), dim=1)]
    pairs, sims = np.concatenate([p for p, _ in found]), np.concatenate([s for _, s in found])
    order = np.lexsort((-sims, pairs[:, 1], pairs[:, 0]))  # each pair's highest cosine first
    pairs, first = np.unique(pairs[order], axis=0, return_index=True)
    return pairs, sims[order][first]


def _descriptor_batches(model: CNNLSTM, cfg: JobConfig, manifest: Manifest, split: str, device: torch.device,
                        amp_dtype: torch.dtype | None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """This rank's share of a split: (ids, labels, copy descriptors float16) per batch."""
    transform = DeviceTransform(cfg.data, device, train=False, channels_last=use_channels_last(cfg, device))
    model.eval()
    with torch.no_grad():
        for images, labels, ids in eval_batches(cfg, manifest, split, progress="duplicates"):
            with autocast(device, amp_dtype):
                descriptor = model.copy_descriptor(transform(images))
            yield ids.numpy(), labels.numpy(), descriptor.half().cpu().numpy()


def gather_descriptors(model: CNNLSTM, cfg: JobConfig, manifest: Manifest, split: str, device: torch.device,
                       amp_dtype: torch.dtype | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(ids [N], labels [N, 3], copy descriptors [N, D] float16) of a split, sorted by id, on rank 0 (None on
    the others); every rank joins."""
    gathered = dist.gather_objects(list(_descriptor_batches(model, cfg, manifest, split, device, amp_dtype)))
    if gathered is None:
        return None
    flat = [p for rank in gathered for p in rank]
    if not flat:
        return np.zeros(0, np.int64), np.zeros((0, len(TASKS)), np.int64), np.zeros((0, 0), np.float16)
    ids, labels, desc = (np.concatenate([p[k] for p in flat]) for k in range(3))
    order = np.argsort(ids, kind="stable")
    return ids[order], labels[order], desc[order]


def find_groups(model: CNNLSTM, cfg: JobConfig, manifest: Manifest, device: torch.device,
                amp_dtype: torch.dtype | None) -> tuple[list[dict], dict[int, Any]] | None:
    """Every split through the model's copy descriptor (every rank joins), then on rank 0 the groups of
    paintings joined by copy_pairs, with the sample index of all splits."""
    parts = {}
    for split in SPLITS:
        if manifest.num_samples(split):
            parts[split] = gather_descriptors(model, cfg, manifest, split, device, amp_dtype)
    if any(p is None for p in parts.values()):
        return None
    index = {}
    for split in parts:
        index.update(read_sample_index(manifest, split))
    ids = np.concatenate([p[0] for p in parts.values()])
    labels = np.concatenate([p[1] for p in parts.values()])
    splits = [s for s, p in parts.items() for _ in range(len(p[0]))]
    desc = torch.from_numpy(np.concatenate([p[2] for p in parts.values()])).float().to(device)
    dc = cfg.duplicates
    pairs, sims = descriptor_pairs(desc, model.copy_widths, dc.ratio, dc.neighbours, dc.chunk)
    best: dict[int, float] = {}
    for (i, j), sim in zip(pairs.tolist(), sims.tolist()):
        best[i], best[j] = max(best.get(i, -1.0), sim), max(best.get(j, -1.0), sim)
    groups = []
    for members in hashes.components(len(ids), pairs):
        rows = [{"path": index[int(ids[i])].path, "id": int(ids[i]), "split": splits[i],
                 **{t: int(labels[i, k]) for k, t in enumerate(TASKS)}, "cosine": round(best[i], 4)}
                for i in members]
        group = hashes.describe_group(rows, "embedding")
        for member, row in zip(group["members"], rows):
            member["cosine"] = row["cosine"]
        groups.append(group)
    return groups, index


def merge_groups(groups: list[list[str]]) -> list[list[str]]:
    """Groups of paths joined wherever they share a path: what the hashes and the embeddings find together."""
    paths = sorted({p for g in groups for p in g})
    at = {p: i for i, p in enumerate(paths)}
    pairs = np.array([(at[g[0]], at[p]) for g in groups for p in g[1:]], np.int64).reshape(-1, 2)
    return [[paths[i] for i in members] for members in hashes.components(len(paths), pairs)]


def summarize(groups: list[dict], ratio: float, neighbours: int) -> str:
    leaks = sum(g["leakage"] for g in groups)
    several = sum(bool(g["several_classes"]) for g in groups)
    return (f"embedding near-duplicates (distance < {ratio:g} x the {neighbours}th neighbour's): {len(groups):,} "
            f"groups of "
            f"{sum(len(g['members']) for g in groups):,} images; leakage {leaks:,}; filed under several classes "
            f"{several:,}")


def write_reports(groups: list[dict], index: dict[int, Any], cfg: JobConfig, manifest: Manifest,
                  planted: list[dict] | None) -> dict:
    """runs/X/duplicates/: groups.csv, groups.json, index.html and summary.json; with `planted`, recall
    per kind and precision of the shard-time hashes and of the embeddings, side by side."""
    out = RunDir(cfg.run_dir).path / "duplicates"
    out.mkdir(parents=True, exist_ok=True)
    classes = manifest.classes
    name = lambda task, label: classes[task][label] if label >= 0 else ""  # noqa: E731
    with open(out / "groups.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for g, group in enumerate(groups):
            for m in group["members"]:
                writer.writerow({"group": g, "kind": group["kind"], "leakage": "yes" if group["leakage"] else "no",
                                 "several_classes": " ".join(group["several_classes"]), "path": m["path"],
                                 "id": m["id"], "split": m["split"], **{t: name(t, m[t]) for t in TASKS},
                                 "cosine": m["cosine"]})
    rule = {"ratio": cfg.duplicates.ratio, "neighbours": cfg.duplicates.neighbours}
    (out / "groups.json").write_text(json.dumps({**rule, "groups": groups}, indent=1))
    summary: dict[str, Any] = {**rule, "groups": len(groups),
                               "leakage": sum(g["leakage"] for g in groups),
                               "several_classes": sum(bool(g["several_classes"]) for g in groups),
                               "text": summarize(groups, cfg.duplicates.ratio, cfg.duplicates.neighbours)}
    print(summary["text"], flush=True)
    shard_groups = hashes.manifest_groups(manifest)
    if shard_groups:
        print(hashes.summarize(manifest.extra["duplicates"]), flush=True)
    if planted is not None:
        present = {ref.path for ref in index.values()}
        by_hash, by_embedding = ([[m["path"] for m in g["members"]] for g in found] for found in (shard_groups, groups))
        found_by = {"hashes": by_hash, "embeddings": by_embedding, "either": merge_groups(by_hash + by_embedding)}
        scores = {name_: hashes.score_planted(found, planted, present) for name_, found in found_by.items()}
        summary["planted"] = scores
        summary["table"] = hashes.planted_table(scores)
        print(summary["table"], flush=True)
    shown = groups[:MAX_GROUPS_SHOWN]
    thumbs = {i: versions[0] for i, versions in read_images(
        Path(cfg.data.shards), index, {m["id"] for g in shown for m in g["members"]}, manifest.image_ext).items()}
    (out / "index.html").write_text(_page(shown, len(groups), thumbs, classes, summary["text"]))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"duplicate reports: {out}/index.html (+ groups.csv/.json, summary.json)", flush=True)
    return summary


def _page(groups: list[dict], total: int, thumbs: dict[int, bytes], classes: dict[str, list[str]], text: str) -> str:
    """Self-contained HTML: each group's paintings side by side with their split and labels."""
    css = ("body{font-family:sans-serif;margin:1.5em} .g{border-top:1px solid #ccc;padding:.5em 0}"
           ".row{display:flex;flex-wrap:wrap;gap:10px} figure{margin:0;width:170px;font-size:11px;"
           "word-break:break-all} img{max-width:160px;max-height:160px;display:block} .leak{color:#b00}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>artdist duplicates</title><style>{css}"
             f"</style></head><body><h1>Near-duplicate paintings</h1><p>{html.escape(text)}"
             f"{f' (first {len(groups)} shown)' if total > len(groups) else ''}</p>"]
    for g, group in enumerate(groups):
        flags = (["<span class='leak'>leakage</span>"] if group["leakage"] else []) + (
            [f"filed under several classes ({', '.join(group['several_classes'])})"] if group["several_classes"] else [])
        parts.append(f"<div class='g'><h3>group {g}{': ' + '; '.join(flags) if flags else ''}</h3><div class='row'>")
        for m in group["members"]:
            img = f'<img src="{data_uri(thumbs[m["id"]])}" alt="">' if m["id"] in thumbs else "(no image)"
            labels = ", ".join(f"{t} {classes[t][m[t]]}" for t in TASKS if m[t] >= 0)
            parts.append(f"<figure>{img}<figcaption>{html.escape(m['split'])}: {html.escape(m['path'])}<br>"
                         f"{html.escape(labels)}<br>cosine {m['cosine']:.3f}</figcaption></figure>")
        parts.append("</div></div>")
    parts.append("</body></html>")
    return "".join(parts)
