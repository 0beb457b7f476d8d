"""`artdist bench`: sharding, loader, model and end-to-end throughput (docs/benchmarks.md)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from artdist.bench import CPU_DEFAULTS, DEFAULT_STEPS, PARTS, WARMUP_STEPS, format_table, run_bench
from artdist.checklist import format_markdown, run_checklist
from artdist.commands.common import add_config_arguments
from artdist.config import MIN_SYNTH_IMAGES, load_config
from artdist.dist import init_distributed
from artdist.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Measure sharding per CPU second against a naive way and the decode floor, (a) shard loading, "
        "(b) ImageFolder loading of full-size JPEGs (the usual way), (c) the train step on synthetic tensors, "
        "(d) end-to-end training from shards, (e) on CUDA, AMP / channels_last / compile variants and GPU "
        "decode; prints a table and one JSON line (docs/benchmarks.md). Without --config on a CPU-only "
        f"machine it applies {', '.join(CPU_DEFAULTS)} (your --set wins)."
    )
    add_config_arguments(p)
    p.add_argument("--workdir", default="build/bench",
                   help="cache for the bench corpus and its shards (default build/bench)")
    p.add_argument("--images", type=int, default=400,
                   help="full-size JPEGs in the bench corpus; also the images timed per loader setting (default 400)")
    p.add_argument("--full-size", type=int, default=800, metavar="PX",
                   help="width of the corpus pictures; height is 3/4 of it (default 800: 800x600, WikiArt's median)")
    p.add_argument("--images-dir", metavar="DIR",
                   help="time the shard, loader and imagefolder parts on the image files under DIR (any layout, "
                        "e.g. ../shared/wikiart_sample) instead of the synthetic corpus")
    p.add_argument("--workers", default="0,1,2", help="loader worker counts to time for (a) and (b) (default 0,1,2)")
    p.add_argument("--steps", type=int, help=f"timed train steps for model/e2e/gpu after the warm-up ones "
                                             f"(default {DEFAULT_STEPS['cpu']} on CPU, {DEFAULT_STEPS['cuda']} on CUDA)")
    p.add_argument("--json", metavar="FILE", help="also write the result to FILE")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run (default {','.join(PARTS)})")
    p.add_argument("--gpu-checklist", action="store_true",
                   help="instead of the tables: check and time every CUDA-specific path (NCCL, AMP bf16/fp16, "
                        "channels_last, compile, GPU decode, end to end) and write --json (default "
                        "build/checklist.json) plus a markdown table beside it; on CPU it runs what it can and "
                        "says why it skipped the rest (docs/benchmarks.md)")


def run(args: argparse.Namespace) -> int:
    workers = _int_list(args.workers, "--workers")
    only = _parts(args.only)
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps {args.steps}: must be >= 1")
    if args.images < MIN_SYNTH_IMAGES:
        raise UserError(f"--images {args.images}: the corpus needs at least {MIN_SYNTH_IMAGES} pictures")
    if args.full_size < 32:
        raise UserError(f"--full-size {args.full_size}: must be >= 32 px")
    if args.images_dir is not None and not Path(args.images_dir).is_dir():
        raise UserError(f"--images-dir {args.images_dir} is not a folder")
    cpu_defaults = list(CPU_DEFAULTS) if args.config is None and not torch.cuda.is_available() else []
    cfg = load_config(args.config, cpu_defaults + args.overrides)
    device = init_distributed(cfg.train.device)
    if args.gpu_checklist:
        return _checklist(args, cfg, device)
    result = run_bench(cfg, workdir=Path(args.workdir), images=args.images, full_size=args.full_size,
                       workers=workers, steps=args.steps, only=only, cpu_defaults=cpu_defaults, device=device,
                       images_dir=Path(args.images_dir) if args.images_dir else None)
    print(format_table(result), flush=True)
    text = json.dumps(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


def _checklist(args: argparse.Namespace, cfg, device: torch.device) -> int:
    kind = "cuda" if device.type == "cuda" else "cpu"
    result = run_checklist(cfg, workdir=Path(args.workdir), images=args.images, full_size=args.full_size,
                           steps=args.steps or DEFAULT_STEPS[kind], warmup=WARMUP_STEPS[kind], device=device)
    out = Path(args.json or "build/checklist.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    table = format_markdown(result)
    out.with_suffix(".md").write_text(table)
    print(table, flush=True)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    failed = [name for name, row in result["checks"].items() if row["status"] == "fail"]
    if failed:
        print(f"checklist: failed: {', '.join(failed)} (details in {out})")
    return 1 if failed else 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers, e.g. {flag} 0,1,2") from None
    if not values or min(values) < 0:
        raise UserError(f"{flag} {text!r}: expected one or more worker counts >= 0, e.g. {flag} 0,1,2")
    return values


def _parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise UserError(f"--only {text!r}: unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    return parts
