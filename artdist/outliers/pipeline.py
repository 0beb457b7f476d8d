"""The outlier passes over a split (every rank joins), then the ranked reports written by rank 0."""
from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from artdist import dist
from artdist.config import TASKS, JobConfig
from artdist.data.duplicates import copy_labels
from artdist.data.loader import BAD_ID, bad_samples
from artdist.data.manifest import Manifest
from artdist.data.transforms import DeviceTransform
from artdist.errors import UserError
from artdist.outliers import projector
from artdist.outliers.ranking import (combined_score, descending_ranks, detection_quality, finite_or_none,
                                      oriented_scores, read_planted, reasons_for, robust_z)
from artdist.outliers.report import quality_table, read_sample_index, write_grids, write_rows
from artdist.outliers.review import write_page
from artdist.outliers.scores import ClassGaussian, GaussianAccumulator, TaskScores, softmax_scores
from artdist.rundir import RunDir
from artdist.train.engine import run_inference
from artdist.train.evaluation import eval_batches
from artdist.train.numerics import use_channels_last

TYPICAL_PER_CLASS = 4  # central samples shown beside a class's outliers
COMBINED_DESCRIPTION = ("log(1 + s) of the classifier + log(1 + s) of a Gaussian classifier on the embedding "
                        "(class means, tied covariance), s = -log p(assigned)")


# --------------------------------------------------------------------------- passes over a split


def _batches(model: torch.nn.Module, cfg: JobConfig, manifest: Manifest, split: str, device: torch.device,
             amp_dtype: torch.dtype | None, progress: str = "outliers"
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]]:
    """This rank's share of a split through the model: (ids, labels, logits per task, embedding)."""
    loader = eval_batches(cfg, manifest, split, progress=progress)
    transform = DeviceTransform(cfg.data, device, train=False, channels_last=use_channels_last(cfg, device))
    yield from run_inference(model, loader, transform, device, amp_dtype, cfg.outliers.tta)


def fit_class_gaussians(model: torch.nn.Module, cfg: JobConfig, manifest: Manifest, device: torch.device,
                        amp_dtype: torch.dtype | None) -> dict[str, ClassGaussian]:
    """Class means + tied covariance per task from the training split, on every rank (all-reduced)."""
    tasks = cfg.model.tasks
    acc: dict[str, GaussianAccumulator] = {}
    for _, labels, _, emb in _batches(model, cfg, manifest, cfg.data.train_split, device, amp_dtype):
        for task in tasks:
            if task not in acc:
                acc[task] = GaussianAccumulator(len(manifest.classes[task]), emb.shape[1], device)
            acc[task].add(emb, labels[:, TASKS.index(task)])
    # A rank that got no batch must still join the all-reduces, with the embedding width of the others.
    width = torch.tensor([float(bool(acc)), float(acc[tasks[0]].scatter.shape[0] if acc else 0)], device=device)
    dist.all_reduce_sum(width)
    if width[0] == 0:
        raise UserError(f"split '{cfg.data.train_split}' yielded no samples to fit the class Gaussians on")
    if not acc:
        dim = int(width[1] / width[0])
        acc = {t: GaussianAccumulator(len(manifest.classes[t]), dim, device) for t in tasks}
    for gaussian_acc in acc.values():
        for t in (gaussian_acc.sums, gaussian_acc.counts, gaussian_acc.scatter):
            dist.all_reduce_sum(t)
    return {task: acc[task].fit() for task in tasks}


def score_split(model: torch.nn.Module, cfg: JobConfig, manifest: Manifest, split: str, device: torch.device,
                amp_dtype: torch.dtype | None, gaussians: dict[str, ClassGaussian],
                projected: list | None = None,
                probs: dict[str, np.ndarray] | None = None) -> dict[str, TaskScores] | None:
    """Scores of every labelled sample of `split`, computed on each rank and gathered to rank 0 (sorted by id).

    Checks that the gathered ids are unique and cover the split exactly; returns None on other ranks.
    With `projected` (a list), rank 0 appends (ids, embeddings) of the outliers.projector samples chosen
    for TensorBoard's projector (projector.select).
    With `probs` (a dict), rank 0 also gets there each task's softmax [N, classes], rows as the scores.
    """
    parts: dict[str, list[dict[str, np.ndarray]]] = {t: [] for t in cfg.model.tasks}
    seen: list[np.ndarray] = []
    bad = 0
    embeddings: list[np.ndarray] = []
    keep_embeddings = projected is not None and cfg.outliers.projector > 0
    for ids, labels, logits, emb in _batches(model, cfg, manifest, split, device, amp_dtype):
        ids, labels = ids.cpu(), labels.cpu()
        bad += bad_samples(ids)  # their labels are all -1: no task scores them
        good = ids != BAD_ID
        seen.append(ids[good].numpy().astype(np.int64))
        if keep_embeddings:
            embeddings.append(emb[good.to(emb.device)].float().cpu().numpy())
        for task in cfg.model.tasks:
            y = labels[:, TASKS.index(task)]
            keep = y >= 0
            if not keep.any():
                continue
            assigned = y[keep]
            batch = softmax_scores(logits[task].detach()[keep.to(logits[task].device)].cpu(), assigned)
            batch.update(gaussians[task].feature_scores(emb[keep.to(emb.device)], assigned))
            batch["ids"], batch["assigned"] = ids[keep], assigned
            if probs is not None:
                batch["probs"] = torch.softmax(logits[task].detach()[keep.to(logits[task].device)].float().cpu(), 1)
            parts[task].append({k: v.numpy() for k, v in batch.items()})
    local = {task: (_to_scores(p), _probs(p, len(manifest.classes[task]), probs is not None))
             for task, p in parts.items()}
    seen_ids = np.concatenate(seen) if seen else np.zeros(0, np.int64)
    shown = None
    if keep_embeddings:
        emb_all = np.concatenate(embeddings) if embeddings else np.zeros((0, 0), np.float32)
        shown = projector.candidates(seen_ids, emb_all, {task: s for task, (s, _) in local.items()},
                                     cfg.outliers.projector)
    gathered = dist.gather_objects((seen_ids, local, shown, bad))
    if gathered is None:
        return None
    all_ids = np.concatenate([g[0] for g in gathered])
    bad = sum(g[3] for g in gathered)
    expected = manifest.num_samples(split) - bad
    if bad > cfg.data.max_bad_fraction * manifest.num_samples(split):
        raise UserError(f"outliers: {bad} '{split}' samples are undecodable, more than data.max_bad_fraction="
                        f"{cfg.data.max_bad_fraction} of the split; the warnings above name them: re-run `artdist shard`")
    if len(np.unique(all_ids)) != len(all_ids) or len(all_ids) != expected:
        raise UserError(
            f"outliers: ranks together scored {len(all_ids)} '{split}' samples ({len(np.unique(all_ids))} "
            f"distinct) but the manifest lists {expected + bad}{f' ({bad} undecodable)' if bad else ''}; the eval "
            "loader must yield each sample exactly once across ranks (are the shards and manifest.json from the "
            "same `artdist shard` run?)")
    merged = {}
    for task in cfg.model.tasks:
        scores = TaskScores.concat([g[1][task][0] for g in gathered])
        order = np.argsort(scores.ids, kind="stable")
        merged[task] = scores.take(order)
        if probs is not None:
            probs[task] = np.concatenate([g[1][task][1] for g in gathered])[order]
    if keep_embeddings:
        projected.append(projector.select([g[2] for g in gathered if len(g[2][0])], merged, cfg.outliers.projector))
    return merged


def _probs(batches: list[dict[str, np.ndarray]], classes: int, wanted: bool) -> np.ndarray | None:
    if not wanted:
        return None
    return np.concatenate([b["probs"] for b in batches]) if batches else np.zeros((0, classes), np.float32)


def _to_scores(batches: list[dict[str, np.ndarray]]) -> TaskScores:
    ints = ("ids", "assigned", "predicted", "feature_predicted")
    cols = {}
    for f in fields(TaskScores):
        dtype = np.int64 if f.name in ints else np.float32
        cols[f.name] = (np.concatenate([b[f.name] for b in batches]) if batches else np.zeros(0)).astype(dtype)
    return TaskScores(**cols)


# --------------------------------------------------------------------------- orchestration


def run_outliers(model: torch.nn.Module, cfg: JobConfig, manifest: Manifest, split: str, device: torch.device,
                 amp_dtype: torch.dtype | None, writer: Any = None) -> dict | None:
    """Score `split`, rank, and write the reports under run_dir/outliers/split (call on every rank).

    Two passes: the training split for the class Gaussians, then `split`. Returns the summary on rank 0
    and None on the others as soon as scores are gathered.
    """
    planted = read_planted(cfg.outliers.planted) if cfg.outliers.planted else None  # a bad path fails first
    gaussians = fit_class_gaussians(model, cfg, manifest, device, amp_dtype)
    projected: list = []
    per_task = score_split(model, cfg, manifest, split, device, amp_dtype, gaussians, projected)
    if per_task is None:
        return None
    return write_reports(per_task, cfg, manifest, split, planted, writer,
                         {t: g.shrinkage for t, g in gaussians.items()}, projected[0] if projected else None)


def write_reports(per_task: dict[str, TaskScores], cfg: JobConfig, manifest: Manifest, split: str,
                  planted: set[tuple[str, str]] | None = None, writer: Any = None,
                  shrinkage: dict[str, float] | None = None,
                  projected: tuple[np.ndarray, np.ndarray] | None = None,
                  columns: dict[str, dict[int, Any]] | None = None, every_row: bool = False,
                  fitted_on: str = "") -> dict:
    """Rank each task, write CSV/JSON/index.html/summary.json (+ TensorBoard grids, and the projector
    with `projected` = (ids, embeddings)); with `planted` (read_planted), measure every score against
    the planted label noise.

    The CSV/JSON hold the flagged samples, or every sample with `every_row`; `columns` (name -> id ->
    value) adds columns after `path`; `fitted_on` names what the Gaussians were fitted on (default:
    data.train_split)."""
    out_dir = RunDir(cfg.run_dir).outliers(split)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = read_sample_index(manifest, split)
    summary: dict[str, Any] = {
        "split": split, "num_samples": manifest.num_samples(split),
        "threshold": cfg.outliers.threshold, "flag_fraction": cfg.outliers.flag_fraction,
        "combined": COMBINED_DESCRIPTION + ("; every painting scored as the mean of it and its mirror image "
                                            "(outliers.tta=flip)" if cfg.outliers.tta == "flip" else ""),
        "gaussians_fitted_on": fitted_on or cfg.data.train_split,
        "tta": cfg.outliers.tta, "tasks": {},
    }
    pages: dict[str, dict[str, Any]] = {}
    grids: dict[str, list[dict[str, Any]]] = {}
    copies = copy_labels(manifest)
    for task, scores in per_task.items():
        names = manifest.classes[task]
        combined = combined_score(scores)
        task_summary, rows, typical = _rank_task(task, scores, combined, names, cfg, index, out_dir, columns or {},
                                                 every_row, copies)
        if shrinkage is not None:
            task_summary["shrinkage"] = round(shrinkage[task], 4)
        if planted is not None:
            positive = np.array([(task, index[i].path) in planted for i in scores.ids.tolist()], dtype=bool)
            task_summary["quality"] = detection_quality(oriented_scores(scores, combined), positive,
                                                        cfg.outliers.top_k)
        summary["tasks"][task] = task_summary
        # A painting predicted as the label another copy of it is filed under is not a likely mislabel.
        shown = [r for r in rows if r["flagged_combined"] and not r["several_classes"]][: cfg.outliers.top_k]
        grids[task] = shown
        several = task_summary["several_classes"]
        pages[task] = {"rows": rows, "combined": combined, "typical": typical,
                       "summary": (f"{len(scores.ids)} samples scored; {task_summary['flagged_combined']} flagged "
                                   f"by the combined score, {task_summary['flagged_max_softmax']} by the "
                                   f"max_softmax rule (top probability < {cfg.outliers.threshold:g}); "
                                   f"{len(rows)} rows"
                                   + (f"; {several} predicted as the label of another copy of the painting "
                                      f"(filed under several classes, not mislabelled)." if several else "."))}
    if planted is not None:
        table = quality_table(split, {t: s["quality"] for t, s in summary["tasks"].items()})
        print(table, flush=True)
        summary["table"] = table
    thumbs = write_page(out_dir, pages, per_task, manifest, index, Path(cfg.data.shards), planted, summary,
                        f"artdist outliers — {cfg.name} — {split}", cfg.outliers.page_rows,
                        f"artdist-review:{cfg.name}:{split}")
    if writer is not None:
        write_grids(grids, thumbs, f"outliers/{split}", writer)
        if projected is not None:
            projector.write_projector(writer, *projected, per_task, manifest, index, Path(cfg.data.shards),
                                      f"outliers/{split}")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"outlier reports: {out_dir}/index.html (+ <task>.csv/.json, summary.json)", flush=True)
    return summary


def _rank_task(task: str, scores: TaskScores, combined: np.ndarray, names: list[str], cfg: JobConfig,
               index: dict, out_dir: Path, columns: dict[str, dict[int, Any]], every_row: bool,
               copies: dict[int, dict[str, set[int]]] | None = None
               ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Rank one task, write its CSV/JSON of flagged (or all) samples; return summary, rows, typical per class.

    A row whose predicted class is the label of another copy of the picture (`copies`: id -> task ->
    labels) has several_classes set: filed under several classes, not a likely mislabel."""
    copies = copies or {}
    n = len(scores.ids)
    rank = descending_ranks(combined, scores.ids)
    order = np.argsort(rank)
    flag_max_softmax = scores.max_softmax < cfg.outliers.threshold
    flag_combined = rank <= math.ceil(cfg.outliers.flag_fraction * n)
    maha_z, energy_z = robust_z(scores.mahalanobis), robust_z(scores.energy)
    rows = []
    listed = order if every_row else order[(flag_max_softmax | flag_combined)[order]]
    for i in listed.tolist():
        sample = int(scores.ids[i])
        other = sorted(copies.get(sample, {}).get(task, set()))
        rows.append({
            "rank": int(rank[i]), "id": sample, "path": index[sample].path,
            **{name: values[sample] for name, values in columns.items()},
            "assigned": names[scores.assigned[i]], "predicted": names[scores.predicted[i]],
            **{name: finite_or_none(float(value[i])) for name, value in (
                ("combined", combined), ("max_softmax", scores.max_softmax), ("p_assigned", scores.p_assigned),
                ("margin", scores.margin), ("energy", scores.energy), ("mahalanobis", scores.mahalanobis),
                ("mahalanobis_z", maha_z))},
            "feature_predicted": names[scores.feature_predicted[i]],
            "feature_p_assigned": finite_or_none(math.exp(-float(scores.feature_nll[i]))),
            "flagged_max_softmax": bool(flag_max_softmax[i]), "flagged_combined": bool(flag_combined[i]),
            "copy_labels": [names[c] for c in other],
            "several_classes": int(scores.predicted[i]) in other,
            "reasons": reasons_for(scores, i, names, cfg.outliers.threshold, maha_z, energy_z)
            or [f"combined score in the top {cfg.outliers.flag_fraction:.0%}"],
        })
    meta = {"task": task, "scored": n, "threshold": cfg.outliers.threshold,
            "flag_fraction": cfg.outliers.flag_fraction}
    write_rows(rows, out_dir / f"{task}.csv", out_dir / f"{task}.json", meta)
    summary = {"scored": n, "flagged_max_softmax": int(flag_max_softmax.sum()),
               "flagged_combined": int(flag_combined.sum()),
               "several_classes": sum(r["several_classes"] for r in rows),
               "csv": str(out_dir / f"{task}.csv")}
    return summary, rows, _typical(scores, names, flag_combined, index)


def _typical(scores: TaskScores, names: list[str], flagged: np.ndarray, index: dict) -> dict[str, list[dict]]:
    """Per class, the unflagged samples nearest its training mean, preferring those the model also puts there."""
    ok = ~flagged & np.isfinite(scores.mahalanobis)
    agree = scores.predicted == scores.assigned
    out: dict[str, list[dict]] = {}
    for c in np.unique(scores.assigned[ok]).tolist():
        members = np.flatnonzero(ok & (scores.assigned == c) & agree)
        if not len(members):  # a weak model: the unflagged samples nearest the class mean still show the class
            members = np.flatnonzero(ok & (scores.assigned == c))
        nearest = members[np.argsort(scores.mahalanobis[members], kind="stable")[:TYPICAL_PER_CLASS]]
        out[names[c]] = [{"id": int(scores.ids[i]), "path": index[int(scores.ids[i])].path} for i in nearest]
    return out


# --------------------------------------------------------------------------- command line
