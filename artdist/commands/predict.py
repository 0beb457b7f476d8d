"""`artdist predict`: the top-k styles, artists and genres, with probabilities, of image files, folders or globs."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import json
import sys
from pathlib import Path

import torch

from artdist.config import from_dict
from artdist.data.image import BadImage, eval_pixels, shard_options
from artdist.data.transforms import DeviceTransform
from artdist.errors import UserError
from artdist.progress import Progress
from artdist.train.checkpoint import load_checkpoint, load_trained_model
from artdist.train.numerics import autocast, resolve_amp, use_channels_last

# what a folder argument contributes: files with these endings (any case), found recursively
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="a run's model_best.pt (or model_last.pt); its config gives the preprocessing")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files (JPEG, PNG, WebP, ...), folders (every image inside, recursively) or quoted "
                        "glob patterns such as 'photos/**/*.jpg'")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per task (default 5)")
    p.add_argument("--json", metavar="FILE",
                   help="write the predictions to FILE as JSON (- for stdout) instead of the console listing")
    p.add_argument("--csv", metavar="FILE",
                   help="write the predictions to FILE as CSV, one row per image, task and rank (- for stdout) "
                        "instead of the console listing")


def expand(arguments: list[str]) -> list[Path]:
    """Files as given, folders as the images inside them (sorted), glob patterns as their matches."""
    found: list[Path] = []
    for arg in arguments:
        path = Path(arg)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise UserError(f"{arg}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            found += inside
        elif path.exists() or not glob.has_magic(arg):
            found.append(path)  # a missing plain file is reported per image, as unreadable
        else:
            matches = sorted(Path(m) for m in glob.glob(arg, recursive=True) if Path(m).is_file())
            if not matches:
                raise UserError(f"{arg}: the pattern matches no file")
            found += matches
    return found


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise UserError(f"--top-k {args.top_k}: must be at least 1")
    if args.json == "-" and args.csv == "-":
        raise UserError("--json - and --csv - both write to stdout: give one of them a file name")
    paths = expand(args.images)
    ckpt = load_checkpoint(args.checkpoint)
    cfg = from_dict(ckpt["config"], f"{args.checkpoint} config")
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    model = load_trained_model(ckpt, cfg, device)
    # Files are prepared as `artdist shard` did for training and decoded as the eval loader does.
    shard = shard_options(cfg)
    data_cfg = dataclasses.replace(cfg.data, decode="cpu")
    transform = DeviceTransform(data_cfg, device, train=False, channels_last=use_channels_last(cfg, device))
    amp_dtype = resolve_amp(cfg.train.amp, device)
    listing = not (args.json or args.csv)
    progress = Progress(len(paths), "images", "predict", enabled=not listing)
    results, failed = [], 0
    for path in paths:
        try:
            pixels = eval_pixels(path, shard, data_cfg)
        except BadImage as exc:
            print(f"{path}: error: cannot read this image ({exc}); skipped", file=sys.stderr)
            failed += 1
            progress.update(0)
            continue
        with torch.no_grad(), autocast(device, amp_dtype):
            logits = model(transform(torch.tensor(pixels).permute(2, 0, 1)[None]))
        top = {}
        for task in cfg.model.tasks:
            probs = logits[task][0].float().softmax(dim=0)
            best = probs.topk(min(args.top_k, probs.numel()))
            names = ckpt["class_names"][task]
            top[task] = [{"class": names[i], "probability": round(p, 6)}
                         for p, i in zip(best.values.tolist(), best.indices.tolist())]
        results.append({"path": str(path), "tasks": top})
        progress.update(1)
        if listing:
            print(path)
            for task, picks in top.items():
                print(f"  {task:<6} " + ", ".join(f"{p['class']} {p['probability']:.3f}" for p in picks))
    if args.json:
        _write(args.json, lambda f: f.write(json.dumps(results, indent=1) + "\n"))
    if args.csv:
        _write(args.csv, lambda f: _write_csv(f, results))
    if failed:
        print(f"{failed} of {len(paths)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


def _write_csv(f, results: list[dict]) -> None:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(["path", "task", "rank", "class", "probability"])
    for result in results:
        for task, picks in result["tasks"].items():
            for rank, pick in enumerate(picks, 1):
                writer.writerow([result["path"], task, rank, pick["class"], pick["probability"]])


def _write(name: str, write) -> None:
    if name == "-":
        write(sys.stdout)
        return
    try:
        with open(name, "w", newline="", encoding="utf-8") as f:
            write(f)
    except OSError as exc:
        raise UserError(f"cannot write {name} ({exc.strerror})") from None
    print(f"wrote {name}", file=sys.stderr)
