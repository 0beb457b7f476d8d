"""`artdist bench --gpu-checklist`: every CUDA-specific path checked and timed in one run, as JSON + markdown."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torchvision

from artdist.bench import bench_e2e, bench_model, build_corpus, build_shards, machine_info
from artdist.config import JobConfig
from artdist.dist import free_port
from artdist.data.manifest import Manifest, member_key
from artdist.data.transforms import crop_resize_batch, decode_image, sample_geometry
from artdist.model import build_model

CHECKS = ("cuda", "nccl", "amp_bf16", "amp_fp16", "channels_last", "compile", "decode_maths", "decode_speed", "e2e")
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"
# The stated contract of data.decode=gpu against the CPU path, same pictures and crops (tests/test_data.py).
DECODE_BOUND = {"mean": 1.5, "p99": 12.0}

_NCCL_SCRIPT = """
import json, os, time, torch, torch.distributed as dist
t = time.perf_counter()
torch.cuda.set_device(0)
dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
x = torch.ones(1 << 20, device="cuda")
dist.all_reduce(x)
dist.barrier()
torch.cuda.synchronize()
ok = bool((x == 1).all())
dist.destroy_process_group()
print(json.dumps({"ok": ok, "seconds": time.perf_counter() - t, "nccl": ".".join(map(str, torch.cuda.nccl.version()))}))
"""


@contextmanager
def dtype_probe() -> Iterator[dict[str, set[str]]]:
    """Output dtypes of every Conv2d / LSTM / Linear forward while active (global module hooks)."""
    seen: dict[str, set[str]] = {"Conv2d": set(), "LSTM": set(), "Linear": set()}

    def hook(module, _inputs, output):
        kind = type(module).__name__
        if kind in seen:
            tensor = output[0] if isinstance(output, tuple) else output
            seen[kind].add(str(tensor.dtype).removeprefix("torch."))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def check_cuda(device: torch.device) -> dict:
    props = torch.cuda.get_device_properties(device)
    return {"status": "ok", "gpu": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gb": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False)}


def check_nccl(timeout_s: float = 120) -> dict:
    """NCCL initialised in a fresh process (a hang there must not hang the checklist)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        proc = subprocess.run([sys.executable, "-c", _NCCL_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "fail", "why": f"NCCL init + all_reduce did not finish in {timeout_s:.0f} s"}
    if proc.returncode != 0:
        return {"status": "fail", "why": _last_line(proc.stderr)}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"status": "ok" if row.pop("ok") else "fail", **row}


def check_amp(cfg: JobConfig, num_classes: dict, counts, device: torch.device, steps: int, warmup: int,
              amp: str) -> dict:
    """Train steps under autocast: finite losses (train_one_epoch raises otherwise) and the fp32 island."""
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return {"status": "skipped", "why": f"{torch.cuda.get_device_name(device)} has no native bf16"}
    with dtype_probe() as dtypes:
        row = bench_model(cfg, num_classes, counts, device, steps, warmup, amp, True, False)
    low = {"bf16": "bfloat16", "fp16": "float16"}[amp]
    island = dtypes["LSTM"] | dtypes["Linear"]
    ok = dtypes["Conv2d"] == {low} and island == {"float32"}
    return {"status": "ok" if ok else "fail", "dtypes": {k: sorted(v) for k, v in dtypes.items()},
            **({} if ok else {"why": f"expected Conv2d in {low} and LSTM/Linear in float32"}), **_rate(row)}


def check_channels_last(cfg: JobConfig, num_classes: dict, counts, device: torch.device, steps: int, warmup: int,
                        nhwc: dict) -> dict:
    nchw = _rate(bench_model(cfg, num_classes, counts, device, steps, warmup, "bf16", False, False))
    if "images_per_s" not in nhwc:
        return {"status": "skipped", "why": "no channels_last figure (the amp check did not run)", "nchw": nchw}
    return {"status": "ok", "nchw": nchw, "channels_last": nhwc,
            "speedup": round(nhwc["images_per_s"] / nchw["images_per_s"], 3)}


def check_compile(cfg: JobConfig, num_classes: dict, counts, device: torch.device, steps: int, warmup: int,
                  eager: dict) -> dict:
    """The compiled backbone: state_dict keys as the plain model's, graphs built, recompiles and why, speed."""
    import torch._dynamo.utils as dynamo_utils

    model = build_model(replace(cfg.model, weights="none"), num_classes)
    plain_keys = set(model.state_dict())
    model.backbone.compile()
    leaked = sorted(k for k in model.state_dict() if k not in plain_keys)
    dynamo_utils.guard_failures.clear()
    graphs_before = dynamo_utils.counters["stats"]["unique_graphs"]
    start = time.perf_counter()
    row = _rate(bench_model(cfg, num_classes, counts, device, steps, warmup, cfg.train.amp, True, True))
    reasons = [r for failures in dynamo_utils.guard_failures.values() for r in failures]
    result = {"wall_s": round(time.perf_counter() - start, 1), "graphs": dynamo_utils.counters["stats"]["unique_graphs"]
              - graphs_before, "recompiles": len(reasons), "recompile_reasons": reasons[:10], **row}
    if "images_per_s" in eager:
        result["speedup_vs_eager"] = round(row["images_per_s"] / eager["images_per_s"], 3)
    problems = ([f"state_dict keys differ from the plain model's: {leaked[:3]}"] if leaked else []) + \
               ([f"{len(reasons)} recompiles during training steps"] if reasons else [])
    return {"status": "fail" if problems else "ok", **({"why": "; ".join(problems)} if problems else {}), **result}


def check_decode_maths(cfg: JobConfig, shards: Path, manifest: Manifest, device: torch.device, images: int = 64) -> dict:
    """The GPU path (torchvision decode + batched crop/resize on `device`) against the CPU path's pixels."""
    import tarfile

    jpegs: list[bytes] = []
    for shard in manifest.split(cfg.data.train_split).shards:
        with tarfile.open(shards / shard.name) as tar:
            jpegs += [tar.extractfile(m).read() for m in tar if member_key(m.name)[1] == "jpg"]
        if len(jpegs) >= images:
            break
    jpegs = jpegs[:images]
    if not jpegs:
        return {"status": "skipped", "why": "the shards hold no JPEG members (shard.format is not jpeg)"}
    encoded = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    rows = {}
    for augment in ("none", "crop_flip", "rrc"):
        data_cfg = replace(cfg.data, augment=augment)
        decoded = torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB,
                                             device=device if device.type == "cuda" else "cpu")
        geoms = [sample_geometry(augment, t.shape[-1], t.shape[-2], data_cfg, np.random.default_rng(k))
                 for k, t in enumerate(decoded)]
        batch = crop_resize_batch(decoded, geoms, data_cfg.image_size).permute(0, 2, 3, 1).cpu().numpy()
        cpu = np.stack([decode_image(j, augment, data_cfg, np.random.default_rng(k)) for k, j in enumerate(jpegs)])
        diff = np.abs(batch.astype(np.float32) - cpu)
        rows[augment] = {"mean": round(float(diff.mean()), 3), "p99": float(np.percentile(diff, 99))}
    ok = all(r["mean"] < DECODE_BOUND["mean"] and r["p99"] < DECODE_BOUND["p99"] for r in rows.values())
    return {"status": "ok" if ok else "fail", "on": str(device if device.type == "cuda" else "cpu"),
            "images": len(jpegs), "bound": DECODE_BOUND, "abs_diff": rows,
            **({} if ok else {"why": f"pixel difference beyond {DECODE_BOUND}"})}


def check_decode_speed(cfg: JobConfig, shards: Path, manifest: Manifest, counts, device: torch.device, steps: int,
                       warmup: int, cpu_e2e: dict) -> dict:
    gpu = _rate(bench_e2e(cfg, shards, manifest, counts, device, steps, warmup, decode="gpu"))
    return {"status": "ok", "gpu_decode": gpu, "cpu_decode": cpu_e2e,
            **({"gpu_over_cpu": round(gpu["images_per_s"] / cpu_e2e["images_per_s"], 3)}
               if "images_per_s" in cpu_e2e else {})}


def check_e2e(cfg: JobConfig, shards: Path, manifest: Manifest, counts, device: torch.device, steps: int,
              warmup: int, model_row: dict) -> dict:
    row = _rate(bench_e2e(cfg, shards, manifest, counts, device, steps, warmup, decode="cpu"))
    row["workers"] = cfg.data.num_workers
    if "images_per_s" in model_row:
        row["of_model_step"] = round(row["images_per_s"] / model_row["images_per_s"], 3)
    return {"status": "ok", **row}


def run_checklist(cfg: JobConfig, *, workdir: Path, images: int, full_size: int, steps: int, warmup: int,
                  device: torch.device, only: tuple[str, ...] = CHECKS) -> dict:
    """Run the checks in order; each failure is recorded (one line + traceback), never fatal to the rest."""
    result = {"machine": machine_info(device), "settings": {
        "backbone": cfg.model.backbone, "image_size": cfg.data.image_size, "batch_size": cfg.data.batch_size,
        "num_workers": cfg.data.num_workers, "amp": cfg.train.amp, "steps": steps, "warmup_steps": warmup},
        "checks": {}}
    checks = result["checks"]
    cuda = device.type == "cuda"
    corpus = build_corpus(workdir / f"corpus-{images}-{full_size}", images, full_size)
    shards, manifest = build_shards(cfg, Path(corpus["dir"]))
    num_classes = manifest.num_classes
    counts = manifest.label_counts(cfg.data.train_split) if cfg.train.class_weighting != "none" else None
    if cuda:
        torch.backends.cudnn.benchmark = True  # as the trainer does

    def run(name: str, fn: Callable[[], dict], needs_cuda: bool = True) -> dict:
        if name not in only:
            checks[name] = {"status": "skipped", "why": "not selected"}
        elif needs_cuda and not cuda:
            checks[name] = {"status": "skipped", "why": NO_CUDA}
        else:
            print(f"checklist: {name} ...", flush=True)
            try:
                checks[name] = fn()
            except Exception as exc:  # a check that breaks is a finding, and the others still run
                checks[name] = {"status": "fail", "why": f"{type(exc).__name__}: {_last_line(str(exc))}",
                                "traceback": traceback.format_exc()[-4000:]}
            if cuda:
                torch.cuda.empty_cache()
        return checks[name]

    run("cuda", lambda: check_cuda(device))
    run("nccl", check_nccl)
    bf16 = run("amp_bf16", lambda: check_amp(cfg, num_classes, counts, device, steps, warmup, "bf16"))
    run("amp_fp16", lambda: check_amp(cfg, num_classes, counts, device, steps, warmup, "fp16"))
    run("channels_last", lambda: check_channels_last(cfg, num_classes, counts, device, steps, warmup, bf16))
    run("compile", lambda: check_compile(cfg, num_classes, counts, device, steps, warmup, bf16))
    run("decode_maths", lambda: check_decode_maths(cfg, shards, manifest, device), needs_cuda=False)
    e2e = run("e2e", lambda: check_e2e(cfg, shards, manifest, counts, device, steps, warmup, bf16))
    run("decode_speed", lambda: check_decode_speed(cfg, shards, manifest, counts, device, steps, warmup, e2e))
    result["checks"] = {name: checks[name] for name in CHECKS}
    return result


def format_markdown(result: dict) -> str:
    """One table row per check: status, the figures that matter, and why it was skipped or failed."""
    m = result["machine"]
    lines = [f"# GPU checklist: {m.get('gpu') or 'no GPU'} ({m['device']}), {m['cpu']}, {m['cores']} cores, "
             f"torch {m['torch']}", "", f"Settings: {json.dumps(result['settings'])}", "",
             "| check | status | figures | why |", "|---|---|---|---|"]
    for name, row in result["checks"].items():
        figures = {k: v for k, v in row.items() if k not in ("status", "why", "traceback")}
        lines.append(f"| {name} | {row['status']} | {_compact(figures)} | {row.get('why', '')} |")
    return "\n".join(lines) + "\n"


def _rate(row: dict) -> dict:
    keys = ("images_per_s", "step_ms", "data_wait_fraction", "max_mem_gb", "amp", "channels_last", "compile")
    return {k: (round(row[k], 4) if isinstance(row[k], float) else row[k]) for k in keys if k in row}


def _compact(value) -> str:
    text = json.dumps(value, separators=(", ", ": "))
    return text.replace("|", "/")[:400]


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no message)"
