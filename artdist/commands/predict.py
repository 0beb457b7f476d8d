"""`artdist predict`: the top-k styles, artists and genres, with probabilities, of image files."""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from artdist.config import from_dict
from artdist.data.image import BadImage, eval_pixels, shard_options
from artdist.data.transforms import DeviceTransform
from artdist.errors import UserError
from artdist.train.checkpoint import load_checkpoint, load_trained_model
from artdist.train.numerics import autocast, resolve_amp, use_channels_last


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="a run's model_best.pt (or model_last.pt); its config gives the preprocessing")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, ...)")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per task (default 5)")


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise UserError(f"--top-k {args.top_k}: must be at least 1")
    ckpt = load_checkpoint(args.checkpoint)
    cfg = from_dict(ckpt["config"], f"{args.checkpoint} config")
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    model = load_trained_model(ckpt, cfg, device)
    # Files are prepared as `artdist shard` did for training and decoded as the eval loader does.
    shard = shard_options(cfg)
    data_cfg = dataclasses.replace(cfg.data, decode="cpu")
    transform = DeviceTransform(data_cfg, device, train=False, channels_last=use_channels_last(cfg, device))
    amp_dtype = resolve_amp(cfg.train.amp, device)
    failed = 0
    for path in args.images:
        try:
            pixels = eval_pixels(path, shard, data_cfg)
        except BadImage as exc:
            print(f"{path}: error: cannot read this image ({exc}); skipped", file=sys.stderr)
            failed += 1
            continue
        with torch.no_grad(), autocast(device, amp_dtype):
            logits = model(transform(torch.tensor(pixels).permute(2, 0, 1)[None]))
        print(path)
        for task in cfg.model.tasks:
            probs = logits[task][0].float().softmax(dim=0)
            top = probs.topk(min(args.top_k, probs.numel()))
            names = ckpt["class_names"][task]
            shown = ", ".join(f"{names[i]} {p:.3f}" for p, i in zip(top.values.tolist(), top.indices.tolist()))
            print(f"  {task:<6} {shown}")
    if failed:
        print(f"{failed} of {len(args.images)} images could not be read", file=sys.stderr)
    return 1 if failed else 0
