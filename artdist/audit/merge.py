"""Audit merge: the folds' out-of-sample scores into one ranked report of the whole dataset, in-sample beside."""
from __future__ import annotations

import csv
import dataclasses
import json
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from artdist.audit.folds import ALL, HELDOUT, INSAMPLE, AuditDir, read_plan
from artdist.config import JobConfig
from artdist.data.manifest import read_manifest
from artdist.errors import UserError
from artdist.outliers.pipeline import write_reports
from artdist.outliers.ranking import combined_score, detection_quality, oriented_scores, read_planted
from artdist.outliers.scores import TaskScores

PARTS = (HELDOUT, INSAMPLE)  # out of sample (model k on fold k), in sample (model k on fold k+1)
FITTED = "fitted"  # in sample as the model trained (no outliers.tta): how the recipe fits the labels it saw


# --------------------------------------------------------------------------- one fold's scores file


def save_fold_scores(path: Path, scores: dict[str, dict[str, TaskScores]], probs: dict[str, np.ndarray]) -> None:
    """scores[part][task] (part in PARTS) and the held-out softmax per task, as one .npz."""
    arrays = {f"{part}/{task}/{f.name}": getattr(s, f.name)
              for part, per_task in scores.items() for task, s in per_task.items() for f in fields(TaskScores)}
    arrays.update({f"probs/{task}": p for task, p in probs.items()})
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_fold_scores(path: Path) -> tuple[dict[str, dict[str, TaskScores]], dict[str, np.ndarray]]:
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    tasks = sorted({name.split("/")[1] for name in arrays if name.startswith(HELDOUT + "/")})
    scores = {part: {t: TaskScores(**{f.name: arrays[f"{part}/{t}/{f.name}"] for f in fields(TaskScores)})
                     for t in tasks} for part in (*PARTS, FITTED) if f"{part}/{tasks[0]}/ids" in arrays}
    scores.setdefault(FITTED, scores[INSAMPLE])  # written before outliers.tta: the in-sample pass was plain
    return scores, {t: arrays[f"probs/{t}"] for t in tasks}


# --------------------------------------------------------------------------- checks


def check_folds(run_dir: Path, plan: dict) -> list[dict]:
    """Each fold's done.json; one line naming the first fold that is missing or from another plan."""
    audit_dir, found = AuditDir(run_dir), []
    for k in range(plan["folds"]):
        done = audit_dir.fold_done(k)
        if not done.is_file() or not audit_dir.fold_scores(k).is_file():
            raise UserError(f"fold {k} of {plan['folds']} has not finished ({done} is missing): run the same "
                            "`artdist audit` command to train it, then merge")
        info = json.loads(done.read_text())
        if info.get("fingerprint") != plan["fingerprint"]:
            raise UserError(f"fold {k} is stale: {done} is from plan {info.get('fingerprint')}, the audit's plan "
                            f"is {plan['fingerprint']} (other shards, folds, recipe or outliers.tta); move "
                            f"{audit_dir.fold(k)} away and run `artdist audit` again")
        found.append(info)
    return found


def read_table(run_dir: Path) -> dict[int, dict[str, Any]]:
    """folds.csv as id -> {split, fold, path}."""
    with open(AuditDir(run_dir).table, newline="") as f:
        return {int(r["id"]): {"split": r["split"], "fold": int(r["fold"]), "path": r["path"]} for r in csv.DictReader(f)}


# --------------------------------------------------------------------------- merge


def _concat(parts: list[TaskScores]) -> tuple[TaskScores, np.ndarray]:
    scores = TaskScores.concat(parts)
    order = np.argsort(scores.ids, kind="stable")
    if len(np.unique(scores.ids)) != len(scores.ids):
        raise UserError("two folds scored the same sample: the fold views do not match the plan; "
                        "run `artdist audit` again to rewrite them")
    return scores.take(order), order


def comparison_table(quality: dict[str, dict[str, dict]]) -> str:
    """Text table: per task and score, AUROC and precision@k out of sample | in sample."""
    def fmt(x: float | None) -> str:
        return "  n/a" if x is None else f"{x:5.3f}"

    lines = ["planted-noise detection over every audited split: out of sample (each painting scored by the fold",
             "model that never saw it) | in sample (scored by a fold model trained on it); k = planted count",
             f"{'task':8s} {'planted':>10s}  {'score':12s} {'AUROC out':>9s} {'in':>5s}   {'P@k out':>7s} {'in':>5s}"]
    for task, q in quality.items():
        out, ins = q["out_of_sample"], q["in_sample"]
        for n, name in enumerate(out["scores"]):
            head = f"{task:8s} {str(out['planted']) + '/' + str(out['scored']):>10s}" if n == 0 else " " * 19
            o, i = out["scores"][name], ins["scores"][name]
            lines.append(f"{head}  {name:12s} {fmt(o['auroc']):>9s} {fmt(i['auroc'])}   "
                         f"{fmt(o['precision_at_k']):>7s} {fmt(i['precision_at_k'])}")
    return "\n".join(lines)


def merge(cfg: JobConfig) -> dict:
    """Rank every audited painting by its out-of-sample scores: RUN_DIR/outliers/all/ (CSV/JSON of every
    row, index.html, summary.json), RUN_DIR/oos_probs.npz and RUN_DIR/summary.json (+ the comparison
    with in-sample scores when outliers.planted is set). Refuses a missing or stale fold."""
    start = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    audit_dir = AuditDir(run_dir)
    plan = read_plan(run_dir)
    if plan["folds"] != cfg.audit.folds:
        raise UserError(f"{run_dir} holds a {plan['folds']}-fold audit but the config asks for {cfg.audit.folds} "
                        f"folds: pass --folds {plan['folds']}, or set out_dir to a new directory")
    done = check_folds(run_dir, plan)
    planted = read_planted(cfg.outliers.planted) if cfg.outliers.planted else None
    table = read_table(run_dir)
    loaded = [load_fold_scores(audit_dir.fold_scores(k)) for k in range(plan["folds"])]
    tasks = list(loaded[0][0][HELDOUT])
    merged: dict[str, dict[str, TaskScores]] = {part: {} for part in (*PARTS, FITTED)}
    probs: dict[str, np.ndarray] = {}
    for task in tasks:
        for part in (*PARTS, FITTED):
            merged[part][task], order = _concat([scores[part][task] for scores, _ in loaded])
            if part == HELDOUT:
                probs[task] = np.concatenate([p[task] for _, p in loaded])[order]
        unknown = set(merged[HELDOUT][task].ids.tolist()) - set(table)
        if unknown:
            raise UserError(f"fold scores name {len(unknown)} sample(s) that {audit_dir.table} does not list: "
                            "run `artdist audit` again to rewrite the plan")

    # The report over the whole dataset: the merged view (split ALL), rows for every sample.
    view_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=str(audit_dir.shards)))
    columns = {"split": {i: t["split"] for i, t in table.items()}, "fold": {i: t["fold"] for i, t in table.items()}}
    report = write_reports(merged[HELDOUT], view_cfg, read_manifest(audit_dir.shards), ALL, planted,
                           columns=columns, every_row=True, fitted_on="each fold model's own training folds")
    np.savez(audit_dir.probs, **{f"{task}/{name}": value for task in tasks for name, value in (
        ("ids", merged[HELDOUT][task].ids), ("labels", merged[HELDOUT][task].assigned), ("probs", probs[task]),
        ("combined", combined_score(merged[HELDOUT][task])))})

    summary: dict[str, Any] = {
        "folds": plan["folds"], "splits": plan["splits"], "num_samples": plan["num_samples"],
        "fingerprint": plan["fingerprint"], "report": str(run_dir / "outliers" / ALL / "index.html"),
        "accuracy": {task: {part: float(np.mean(s.predicted == s.assigned)) if len(s.ids) else None
                            for part, s in ((p, merged[p][task]) for p in PARTS)} for task in tasks},
    }
    if planted is not None:
        quality, fit = {}, {}
        for task in tasks:
            per_part = {}
            for part in PARTS:
                s = merged[part][task]
                positive = np.array([(task, table[i]["path"]) in planted for i in s.ids.tolist()], dtype=bool)
                per_part[part] = detection_quality(oriented_scores(s, combined_score(s)), positive,
                                                   cfg.outliers.top_k)
            fitted = merged[FITTED][task]  # how well the recipe fits the wrong labels it trains on
            wrong = np.array([(task, table[i]["path"]) in planted for i in fitted.ids.tolist()], dtype=bool)
            fit[task] = float(np.mean(fitted.predicted[wrong] == fitted.assigned[wrong])) if wrong.any() else None
            quality[task] = {"out_of_sample": per_part[HELDOUT], "in_sample": per_part[INSAMPLE]}
        summary.update(quality=quality, planted_fit_in_sample=fit, table=comparison_table(quality))
        print(summary["table"], flush=True)
        print("in-sample accuracy on the planted (wrong) labels: "
              + ", ".join(f"{t} {v:.2f}" for t, v in fit.items() if v is not None), flush=True)
    train_s = sum(d.get("train_s", 0.0) for d in done)
    score_s = sum(d.get("score_s", 0.0) for d in done)
    merge_s = time.perf_counter() - start
    summary["timing"] = {"plan_s": plan.get("plan_s", 0.0), "folds_train_s": round(train_s, 1),
                         "folds_score_s": round(score_s, 1), "merge_s": round(merge_s, 1),
                         "overhead_fraction": round((plan.get("plan_s", 0.0) + merge_s)
                                                    / max(plan.get("plan_s", 0.0) + merge_s + train_s + score_s, 1e-9), 4)}
    summary["outliers"] = {t: {k: v for k, v in s.items() if k != "quality"} for t, s in report["tasks"].items()}
    audit_dir.summary.write_text(json.dumps(summary, indent=1))
    print(f"audit: {plan['num_samples']} samples in {plan['folds']} folds; reports {summary['report']} "
          f"(+ <task>.csv/.json), {audit_dir.summary}", flush=True)
    return summary
