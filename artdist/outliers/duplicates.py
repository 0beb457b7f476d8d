"""Near-duplicate paintings by embedding cosine similarity (chunked exact k-NN), and their reports."""
from __future__ import annotations

import csv
import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from artdist.config import TASKS, JobConfig
from artdist.data import duplicates as hashes
from artdist.data.catalog import SPLITS
from artdist.data.manifest import Manifest
from artdist.outliers.pipeline import gather_embeddings
from artdist.outliers.report import data_uri, read_images, read_sample_index
from artdist.rundir import RunDir

MAX_GROUPS_SHOWN = 200  # groups drawn in index.html; the CSV/JSON hold them all
CSV_FIELDS = ("group", "kind", "leakage", "several_classes", "path", "id", "split", *TASKS, "cosine")


def cosine_pairs(emb: torch.Tensor, threshold: float, chunk: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) of unit rows whose cosine similarity is >= threshold, and those similarities.

    Exact k-NN in blocks of `chunk` query rows: memory O(chunk x N), never N x N. Each row keeps its
    k most similar later rows; larger groups still join through the connected components.
    """
    n = emb.shape[0]
    found_pairs, found_sims = [np.zeros((0, 2), np.int64)], [np.zeros(0, np.float32)]
    cols = torch.arange(n, device=emb.device)
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=emb.device)
        sims = emb[rows] @ emb.T
        sims.masked_fill_(cols[None, :] <= rows[:, None], -2.0)  # each pair once, never a row with itself
        values, index = sims.topk(min(k, n), dim=1)
        keep = values >= threshold
        found_pairs.append(torch.stack([rows[:, None].expand_as(index)[keep], index[keep]], 1).cpu().numpy())
        found_sims.append(values[keep].float().cpu().numpy())
    return np.concatenate(found_pairs), np.concatenate(found_sims)


def find_groups(model: torch.nn.Module, cfg: JobConfig, manifest: Manifest, device: torch.device,
                amp_dtype: torch.dtype | None) -> tuple[list[dict], dict[int, Any]] | None:
    """Every split through the model (every rank joins), then on rank 0 the groups of paintings whose
    embeddings are at least duplicates.cosine similar, with the sample index of all splits."""
    parts = {}
    for split in SPLITS:
        if manifest.num_samples(split):
            parts[split] = gather_embeddings(model, cfg, manifest, split, device, amp_dtype)
    if any(p is None for p in parts.values()):
        return None
    index = {}
    for split in parts:
        index.update(read_sample_index(manifest, split))
    ids = np.concatenate([p[0] for p in parts.values()])
    labels = np.concatenate([p[1] for p in parts.values()])
    splits = [s for s, p in parts.items() for _ in range(len(p[0]))]
    emb = torch.from_numpy(np.concatenate([p[2] for p in parts.values()])).float().to(device)
    pairs, sims = cosine_pairs(emb, cfg.duplicates.cosine, cfg.duplicates.chunk, cfg.duplicates.max_neighbours)
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


def summarize(groups: list[dict], threshold: float) -> str:
    leaks = sum(g["leakage"] for g in groups)
    several = sum(bool(g["several_classes"]) for g in groups)
    return (f"embedding near-duplicates (cosine >= {threshold}): {len(groups):,} groups of "
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
    (out / "groups.json").write_text(json.dumps({"cosine": cfg.duplicates.cosine, "groups": groups}, indent=1))
    summary: dict[str, Any] = {"cosine": cfg.duplicates.cosine, "groups": len(groups),
                               "leakage": sum(g["leakage"] for g in groups),
                               "several_classes": sum(bool(g["several_classes"]) for g in groups),
                               "text": summarize(groups, cfg.duplicates.cosine)}
    print(summary["text"], flush=True)
    shard_groups = hashes.manifest_groups(manifest)
    if shard_groups:
        print(hashes.summarize(manifest.extra["duplicates"]), flush=True)
    if planted is not None:
        present = {ref.path for ref in index.values()}
        scores = {name_: hashes.score_planted([[m["path"] for m in g["members"]] for g in found], planted, present)
                  for name_, found in (("hashes", shard_groups), ("embeddings", groups))}
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
