"""Evaluation of a model on one split: accuracy, top-5, macro-F1, per-class P/R/F1, confusion, and its report."""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from artdist.config import HEADLINE, JobConfig
from artdist.data.duplicates import copies_lost, copy_labels
from artdist.data.loader import make_eval_loader
from artdist.data.manifest import Manifest
from artdist.data.transforms import DeviceTransform
from artdist.dist import get_rank, get_world_size, is_main_process
from artdist.errors import UserError
from artdist.metrics import format_confusion, format_table, report_from_confusion
from artdist.progress import Progress, track
from artdist.train import engine
from artdist.train.numerics import use_channels_last



def evaluate_split(model: torch.nn.Module, cfg: JobConfig, manifest: Manifest, split: str, device: torch.device,
                   amp_dtype: torch.dtype | None, progress: str = "") -> dict:
    """Every rank: evaluate `model` (unwrapped) on `split`; every rank gets the same report.

    -> {"split", "num_samples", "bad_samples": [per rank], "tasks": {task: metrics.report_from_confusion(...)
    + "top5" + "loss"}}; a UserError when more than data.max_bad_fraction of the split was undecodable.
    With `progress` (a label), rank 0 reports its batches done on stderr.
    """
    loader = eval_batches(cfg, manifest, split, progress)
    transform = DeviceTransform(cfg.data, device, train=False, channels_last=use_channels_last(cfg, device))
    result = engine.count_predictions(model, loader, transform, device, amp_dtype, cfg.model.tasks,
                                      manifest.num_classes, copy_labels(manifest))
    tasks = {task: report_from_confusion(result["confusion"][task], manifest.classes[task],
                                         result["top5_correct"][task])
             for task in cfg.model.tasks}
    for task, report in tasks.items():
        labelled = report["num_labelled"]
        report["loss"] = result["loss_sum"][task] / max(labelled, 1)  # mean cross-entropy (no smoothing or weights)
        # Copies of one picture filed under different classes: a prediction matching any of the picture's
        # labels counts, and no one-class-per-picture model can beat the ceiling they impose.
        report["accuracy_any_label"] = ((int(result["confusion"][task].trace()) + result["copy_label_hits"][task])
                                        / labelled if labelled else 0.0)
        report["ceiling"] = 1 - copies_lost(manifest, split, task) / labelled if labelled else 0.0
    bad = sum(result["bad_samples"])
    if bad > cfg.data.max_bad_fraction * (result["num_samples"] + bad):
        raise UserError(f"{bad} of the {result['num_samples'] + bad} '{split}' samples are undecodable (per rank: "
                        f"{result['bad_samples']}), more than data.max_bad_fraction={cfg.data.max_bad_fraction}; the "
                        "warnings above name them: re-run `artdist shard` on the source images")
    if bad and get_rank() == 0:
        print(f"warning: {bad} undecodable '{split}' samples skipped (per rank: {result['bad_samples']})", flush=True)
    return {"split": split, "num_samples": result["num_samples"], "bad_samples": result["bad_samples"], "tasks": tasks}


def eval_batches(cfg: JobConfig, manifest: Manifest, split: str, progress: str = "") -> Iterable:
    """This rank's eval loader of `split`; with `progress` (a label), rank 0 reports its batches on stderr."""
    loader = make_eval_loader(cfg.data, manifest, split, get_rank(), get_world_size())
    if not progress:
        return loader
    return track(loader, Progress(len(loader), "batches", f"{progress} {split}", enabled=is_main_process()),
                 lambda batch: len(batch[2]))


def headline(report: dict) -> dict[str, float]:
    """{"style/accuracy": ..., "style/top5": ..., "style/macro_f1": ..., ...} of an evaluate_split report."""
    return {f"{task}/{key}": r[key] for task, r in report["tasks"].items() for key in HEADLINE}


def write_report(report: dict, path: Path, checkpoint: str) -> None:
    """Rank 0: print the per-task tables and write the report as JSON."""
    for task, r in report["tasks"].items():
        print(format_table(r, title=f"{report['split']} {task}"), format_confusion(r), sep="\n", flush=True)
        if "ceiling" in r:
            print(f"{task}: accuracy {r['accuracy']:.4f}; counting any label of the picture's copies "
                  f"{r['accuracy_any_label']:.4f}; ceiling from copies filed under several classes {r['ceiling']:.4f}",
                  flush=True)
    path.write_text(json.dumps({"checkpoint": checkpoint, **report}, indent=1))
    print(f"wrote {path}", flush=True)
