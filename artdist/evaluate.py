"""`artdist evaluate`: a trained checkpoint on one split: accuracy, top-5, macro-F1, per-class P/R/F1, confusion."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from artdist import engine
from artdist.checkpoint import BEST, load_checkpoint
from artdist.cli import UserError, add_override_argument
from artdist.config import JobConfig, apply_overrides, from_dict
from artdist.data import DeviceTransform, make_eval_loader, num_classes, read_manifest
from artdist.dist import cleanup, get_rank, get_world_size, init_distributed, is_main_process
from artdist.metrics import format_confusion, format_table, report_from_confusion
from artdist.model import CNNLSTM, build_model

HEADLINE = ("accuracy", "top5", "macro_f1")


def evaluate_split(model: torch.nn.Module, cfg: JobConfig, manifest: dict, split: str, device: torch.device,
                   amp_dtype: torch.dtype | None) -> dict:
    """Every rank: evaluate `model` (unwrapped) on `split`; every rank gets the same report.

    -> {"split", "num_samples", "tasks": {task: metrics.report_from_confusion(...) + "top5"}}
    """
    loader = make_eval_loader(cfg.data, manifest, split, get_rank(), get_world_size())
    transform = DeviceTransform(cfg.data, device, train=False, channels_last=engine.use_channels_last(cfg, device))
    result = engine.evaluate(model, loader, transform, device, amp_dtype, cfg.model.tasks, num_classes(manifest))
    tasks = {task: report_from_confusion(result["confusion"][task], manifest["classes"][task],
                                         result["top5_correct"][task])
             for task in cfg.model.tasks}
    return {"split": split, "num_samples": result["num_samples"], "tasks": tasks}


def headline(report: dict) -> dict[str, float]:
    """{"style/accuracy": ..., "style/top5": ..., "style/macro_f1": ..., ...} of an evaluate_split report."""
    return {f"{task}/{key}": r[key] for task, r in report["tasks"].items() for key in HEADLINE}


def write_report(report: dict, path: Path, checkpoint: str) -> None:
    """Rank 0: print the per-task tables and write the report as JSON."""
    for task, r in report["tasks"].items():
        print(format_table(r, title=f"{report['split']} {task}"), format_confusion(r), sep="\n", flush=True)
    path.write_text(json.dumps({"checkpoint": checkpoint, **report}, indent=1))
    print(f"wrote {path}", flush=True)


def load_trained_model(ckpt: dict, cfg: JobConfig, device: torch.device) -> CNNLSTM:
    """The checkpoint's model on `device` in eval mode (heads sized by the class names it was trained with)."""
    model = build_model(cfg.model, {task: len(names) for task, names in ckpt["class_names"].items()})
    model.load_state_dict(ckpt["model"])
    if engine.use_channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    return model.to(device).eval()


def add_run_arguments(p: argparse.ArgumentParser, default_split: str) -> None:
    """--run, --split, --checkpoint and --set: the arguments of every command that reads a trained run."""
    # --run-dir too: under torchrun, whose parser reads "--run" as an ambiguous prefix of its --run-path
    p.add_argument("--run", "--run-dir", dest="run", required=True, metavar="DIR",
                   help="run directory written by `artdist train` (spell it --run-dir under torchrun)")
    p.add_argument("--split", default=default_split,
                   help=f"split of the shards, any in their manifest.json: train, val, test... (default: {default_split})")
    p.add_argument("--checkpoint", default=BEST, metavar="FILE",
                   help=f"checkpoint file name inside DIR, or a path (default: {BEST})")
    add_override_argument(p)  # applies to the checkpoint's config, e.g. --set data.shards=shards/other


def open_run(args: argparse.Namespace, extra_overrides: tuple[str, ...] = ()) -> tuple[Path, dict, JobConfig]:
    """(checkpoint path, checkpoint, its config with --set and `extra_overrides` applied) of add_run_arguments."""
    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise UserError(f"--run {run_dir}: no such directory; pass a run dir written by `artdist train` (runs/<name>)")
    # The run's own file first: `--run ../b` from inside run a must not pick up a's model_best.pt.
    path = run_dir / args.checkpoint if (run_dir / args.checkpoint).is_file() else Path(args.checkpoint)
    ckpt = load_checkpoint(path)
    cfg = from_dict(apply_overrides(ckpt["config"], [*args.overrides, *extra_overrides]), f"{path} config")
    return path, ckpt, cfg


def check_classes(manifest: dict, ckpt: dict, cfg: JobConfig, path: Path) -> None:
    """Refuse shards whose class lists differ from the ones the checkpoint's heads were trained on."""
    changed = [t for t in cfg.model.tasks if manifest["classes"][t] != ckpt["class_names"][t]]
    if changed:
        raise UserError(f"{cfg.data.shards} defines other {'/'.join(changed)} classes than {path} was trained "
                        "with; use shards made from the same label files (--set data.shards=DIR)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, default_split="test")


def run(args: argparse.Namespace) -> int:
    path, ckpt, cfg = open_run(args)
    device = init_distributed(cfg.train.device)
    try:
        manifest = read_manifest(cfg.data.shards)
        check_classes(manifest, ckpt, cfg, path)
        model = load_trained_model(ckpt, cfg, device)
        report = evaluate_split(model, cfg, manifest, args.split, device, engine.resolve_amp(cfg.train.amp, device))
        if is_main_process():
            write_report(report, Path(args.run) / f"eval_{args.split}.json", str(path))
    finally:
        cleanup()
    return 0
