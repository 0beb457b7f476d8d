"""`artdist bench`: shard-loader, ImageFolder, model-step, end-to-end and GPU throughput in one run.

What each part times (images/s over the batches after the warm-up ones):
  shard        the sharder (shard_dataset, one process) per CPU second against a naive decode -> LANCZOS ->
               encode of the same files and the bare draft-decode floor; each as a ratio to the floor
  loader       shards -> the real TrainLoader (decode + augment) -> uint8 batches, per worker count;
               normalizing is DeviceTransform's job on the training device, so it is not CPU work here;
               with its floors on the same shard members (bare decode; full decode + one box resize)
  imagefolder  the usual way: loose full-size JPEGs -> torchvision ImageFolder + Resize/RandomCrop(padding)/
               flip/ToTensor/Normalize -> DataLoader, per worker count; (loader / imagefolder) at equal
               workers is the per-core ratio, and for workers=0 also per CPU second (robust to other load)
  model        engine.train_one_epoch on one synthetic batch held on the device (no loading)
  e2e          engine.train_one_epoch on the TrainLoader: images/s and the share of time blocked on it
  gpu          CUDA only: the model step under fp32 / bf16 / fp16, NCHW vs channels_last, torch.compile of
               the backbone, and e2e with data.decode=gpu (nvJPEG)

The corpus (cached under --workdir): synth pictures of side 3/4 * --full-size, stretched to
--full-size x 3/4 --full-size (bicubic, JPEG quality 90), i.e. 800x600 = 0.48 MP by default like
the WikiArt median (~0.47 MP); or, with --images-dir, copies of the image files found there (under
synthetic ArtGAN paths and labels: only the pixels matter here). The style folders are the
ImageFolder view; `shard_dataset` packs them at shard.max_short_side. Loaders read a manifest whose shard list is repeated as often as
the timed batches need, so one DataLoader epoch covers the whole measurement (no worker restarts).
"""
from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import tarfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, RandomSampler
from torchvision import transforms

from artdist.config import MIN_SYNTH_IMAGES, TASKS, JobConfig, SynthConfig
from artdist.data.image import prepare_image, short_side_size
from artdist.data.loader import TrainLoader
from artdist.data.manifest import Manifest, SplitInfo, read_manifest
from artdist.data.shard import shard_dataset
from artdist.data.synth import JPEG_QUALITY, make_corpus
from artdist.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, DeviceTransform, as_pil, decode_drafted,
                                     decode_image, jpeg_pixels, picture_size, plain_jpeg, sample_geometry,
                                     torch_threads)
from artdist.errors import UserError
from artdist.train.engine import TrainState, train_one_epoch
from artdist.train.numerics import resolve_amp, use_channels_last
from artdist.train.trainer import build_training

PARTS = ("shard", "loader", "imagefolder", "model", "e2e", "gpu")
# Without --config on a CPU-only machine: a run that ends in about a minute on 2 idle cores (applied
# before the user's --set, which wins). One loader worker leaves the other core to the model.
CPU_DEFAULTS = ("model.backbone=resnet18", "data.batch_size=16", "data.num_workers=1")
DEFAULT_STEPS = {"cpu": 3, "cuda": 50}
WARMUP_STEPS = {"cpu": 1, "cuda": 10}  # cuda: cudnn.benchmark autotuning and torch.compile happen here
# Loader warm-up, in rounds of one batch per worker: workers start together and deliver their
# first batches in a burst, so timing from the first batch would count that burst as free.
WARMUP_ROUNDS = 2
MIN_TIMED_ROUNDS = 4  # and then at least this many rounds timed, however few --images
ASPECT = 3 / 4  # height / width of the bench pictures: WikiArt's median is about 800x600
# (amp, channels_last, compile) rows of the GPU model-step table; auto = the trainer's choice.
GPU_VARIANTS = (("off", True, False), ("bf16", True, False), ("fp16", True, False),
                ("auto", False, False), ("auto", True, True))


# --------------------------------------------------------------------------- timing


class Clock:
    """Passes batches through, noting when each was asked for and when it arrived (wall clock), and
    this process's CPU time at each ask: CPU seconds per image do not grow when other jobs load the
    machine, wall seconds do."""

    def __init__(self, batches: Iterable):
        self.batches = batches
        self.start = self.end = self.end_cpu = 0.0
        self.asked: list[float] = []
        self.asked_cpu: list[float] = []
        self.got: list[float] = []
        self.sizes: list[int] = []

    def __iter__(self) -> Iterator:
        self.start = time.perf_counter()
        it = iter(self.batches)
        while True:
            self.asked.append(time.perf_counter())
            self.asked_cpu.append(time.process_time())
            try:
                batch = next(it)
            except StopIteration:
                return
            self.got.append(time.perf_counter())
            self.sizes.append(int(batch[1].shape[0]))
            yield batch

    def stop(self) -> None:
        """The work on the last batch is done."""
        self.end, self.end_cpu = time.perf_counter(), time.process_time()

    def rate(self, warmup: int) -> dict:
        """Throughput from batch `warmup` being asked for until stop()."""
        if len(self.got) <= warmup:
            raise ValueError(f"{len(self.got)} batches arrived, none after the {warmup} warm-up ones")
        span = self.end - self.asked[warmup]
        images = sum(self.sizes[warmup:])
        wait = sum(got - asked for asked, got in zip(self.asked[warmup:], self.got[warmup:]))
        return {"images": images, "seconds": span, "images_per_s": images / span,
                "cpu_seconds": self.end_cpu - self.asked_cpu[warmup],
                "data_wait_fraction": wait / span, "first_batch_s": self.got[0] - self.start}


def drain(batches: Iterable, count: int, warmup: int) -> dict:
    """Time the first `count` batches of a loader (the consumer does nothing with them)."""
    clock = Clock(batches)
    for _ in itertools.islice(clock, count):
        pass
    clock.stop()
    return clock.rate(warmup)


# --------------------------------------------------------------------------- corpus


def build_corpus(out: Path, images: int, full_size: int) -> dict:
    """Full-size WikiArt-like JPEGs in the ArtGAN layout under `out` (reused when complete)."""
    marker = out / "corpus.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    shutil.rmtree(out, ignore_errors=True)  # an interrupted build: start over
    height = round(full_size * ASPECT)
    make_corpus(SynthConfig(out=str(out), images=images, seed=0, size=height))
    files = sorted((out / "images").rglob("*.jpg"))
    for path in files:
        with Image.open(path) as im:
            stretched = im.convert("RGB").resize((full_size, height), Image.Resampling.BICUBIC)
        stretched.save(path, "JPEG", quality=JPEG_QUALITY)
    sizes = [path.stat().st_size for path in files]
    info = {"dir": str(out), "images": len(files), "width": full_size, "height": height,
            "megapixels": full_size * height / 1e6, "median_kb": statistics.median(sizes) / 1024,
            "how": f"synth pictures {height}x{height} stretched to {full_size}x{height} (bicubic, JPEG q{JPEG_QUALITY})"}
    marker.write_text(json.dumps(info, indent=1) + "\n")
    return info


def image_files(folder: Path) -> list[Path]:
    """The files under `folder` that PIL recognises as images (header only), sorted."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            with Image.open(path):
                found.append(path)
        except (UnidentifiedImageError, OSError):
            continue
    return found


def build_real_corpus(out: Path, images_dir: Path) -> dict:
    """The image files of `images_dir`, copied over the pictures of a synth corpus of as many images
    (its ArtGAN paths and labels; only the pixels matter here), under `out` (reused when complete)."""
    marker = out / "corpus.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    files = image_files(images_dir)
    if len(files) < MIN_SYNTH_IMAGES:
        raise UserError(f"--images-dir {images_dir}: {len(files)} image files found, the bench needs at least "
                        f"{MIN_SYNTH_IMAGES}")
    shutil.rmtree(out, ignore_errors=True)  # an interrupted build: start over
    make_corpus(SynthConfig(out=str(out), images=len(files), seed=0, size=16))
    for dest, src in zip(sorted((out / "images").rglob("*.jpg")), files):
        shutil.copyfile(src, dest)
    sizes, pixels = [], []
    for path in files:
        sizes.append(path.stat().st_size)
        with Image.open(path) as im:
            pixels.append(im.width * im.height / 1e6)
    info = {"dir": str(out), "images": len(files), "megapixels": statistics.median(pixels),
            "mean_megapixels": statistics.mean(pixels), "max_megapixels": max(pixels),
            "median_kb": statistics.median(sizes) / 1024, "how": f"the image files of {images_dir}"}
    marker.write_text(json.dumps(info, indent=1) + "\n")
    return info


def build_shards(cfg: JobConfig, corpus: Path) -> tuple[Path, Manifest]:
    """The corpus packed by the real sharder with the config's shard options (resumes/reuses)."""
    sc = cfg.shard
    out = corpus / f"shards-{sc.max_short_side}-{sc.format}{sc.quality}"
    shard_dataset(replace(sc, images=str(corpus / "images"), labels=str(corpus / "labels"), out=str(out)),
                  progress=False)
    return out, read_manifest(out)


def tiled(manifest: Manifest, split: str, samples: int) -> Manifest:
    """A manifest whose `split` lists its shards again and again until it holds >= `samples`."""
    entry = manifest.splits[split]
    copies = max(1, math.ceil(samples / entry.num_samples))
    return replace(manifest, splits={**manifest.splits,
                                     split: SplitInfo(entry.num_samples * copies, entry.shards * copies)})


# --------------------------------------------------------------------------- loaders


def imagefolder_transform(data_cfg: Any) -> transforms.Compose:
    """The usual ImageFolder CPU pipeline: shorter side to image_size, padded random crop, flip, to float, normalize."""
    size = data_cfg.image_size
    return transforms.Compose([
        transforms.Resize(size),
        transforms.RandomCrop(size, padding=data_cfg.crop_padding, pad_if_needed=True),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def per_core(row: dict, cpus: int) -> dict:
    """Adds cores used and images/s per core; in-process loading (workers=0) also gets images per
    CPU second, the per-core rate that a loaded machine does not distort."""
    cores = min(max(row["workers"], 1), cpus)
    extra = {"images_per_cpu_s": row["images"] / row["cpu_seconds"]} if row["workers"] == 0 else {}
    return {**row, "cores": cores, "images_per_s_per_core": row["images_per_s"] / cores, **extra}


def loader_batches(workers: int, images: int, batch: int) -> tuple[int, int]:
    """(warm-up batches, total batches) for timing a loader with `workers` workers: at least
    `images` images, or MIN_TIMED_ROUNDS batches per worker if that is more, after the warm-up."""
    rounds = max(workers, 1)
    warmup = WARMUP_ROUNDS * rounds
    return warmup, warmup + max(math.ceil(images / batch), MIN_TIMED_ROUNDS * rounds)


def bench_loader(cfg: JobConfig, shards: Path, manifest: Manifest, workers: list[int], images: int,
                 cpus: int) -> list[dict]:
    """(a) the TrainLoader from shards (decode + augment to uint8; normalizing is the device's job):
    images/s per worker count."""
    rows = []
    for w in workers:
        data_cfg = replace(cfg.data, shards=str(shards), num_workers=w, decode="cpu")
        warmup, count = loader_batches(w, images, data_cfg.batch_size)
        loader = TrainLoader(data_cfg, tiled(manifest, data_cfg.train_split, count * data_cfg.batch_size),
                             rank=0, world_size=1, seed=cfg.train.seed)
        with torch_threads(1):
            rows.append(per_core({"workers": w, **drain(loader, count, warmup)}, cpus))
    return rows


def cpu_ms(work: Callable[[Any], Any], items: list, repeats: int = 2) -> float:
    """CPU milliseconds (this process) per item of `work`, the best of `repeats` passes: the best
    pass is the one least disturbed by other jobs on the machine."""
    best = math.inf
    for _ in range(repeats):
        start = time.process_time()
        for item in items:
            work(item)
        best = min(best, time.process_time() - start)
    return best / len(items) * 1000


def draft_decode(path: Path, max_short_side: int, pil_only: bool = False) -> Image.Image | torch.Tensor:
    """The floor of sharding one file: read, open, JPEG draft as prepare_image does, decode by the decoder
    it uses (PIL after a draft, else jpeg_pixels where it can; pil_only: PIL always); nothing else."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        scale, full = max_short_side / min(im.size), im.size
        if im.format == "JPEG" and scale < 1:
            im.draft(None, (math.ceil(im.width * scale), math.ceil(im.height * scale)))
        pixels = jpeg_pixels(data) if plain_jpeg(im, full) and not pil_only else None
        if pixels is not None:
            return pixels
        im.load()
        return im


def naive_shard_image(path: Path, max_short_side: int, quality: int) -> bytes:
    """The naive way to shard one file: full decode, LANCZOS to the short side, JPEG encode."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    size = short_side_size(im.width, im.height, max_short_side)
    if size is not None:
        im = im.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return 10 * math.log10(255**2 / mse) if mse > 0 else math.inf


def filter_difference(files: list[Path], cfg: JobConfig) -> dict:
    """How far shard.resample's pictures are from LANCZOS's: PSNR and max abs error at the shard size,
    and after both are brought to a data.image_size short side (bilinear, like the loader)."""
    sc = cfg.shard
    at_shard, at_train, max_abs = [], [], 0
    for path in files:
        ours = prepare_image(path, sc.max_short_side, sc.max_pixels, sc.resample)
        ref = prepare_image(path, sc.max_short_side, sc.max_pixels, "lanczos")
        if np.array_equal(np.asarray(ours), np.asarray(ref)):
            continue  # no residual resize after the draft (or the same filter)
        at_shard.append(psnr(np.asarray(ours), np.asarray(ref)))
        small = short_side_size(*picture_size(ours), cfg.data.image_size) or picture_size(ours)
        a, b = (np.asarray(as_pil(pixels).resize(small, Image.Resampling.BILINEAR)) for pixels in (ours, ref))
        at_train.append(psnr(a, b))
        max_abs = max(max_abs, int(np.abs(a.astype(np.int16) - b).max()))
    if not at_shard:
        return {"resample": sc.resample, "resized_images": 0}
    return {"resample": sc.resample, "resized_images": len(at_shard),
            "psnr_db_at_shard_size": statistics.mean(at_shard), "min_psnr_db_at_shard_size": min(at_shard),
            "psnr_db_at_image_size": statistics.mean(at_train), "min_psnr_db_at_image_size": min(at_train),
            "max_abs_error_at_image_size": max_abs}


def bench_shard(cfg: JobConfig, corpus: Path, rounds: int = 2) -> dict:
    """The sharder (shard_dataset in this process, tar and checksums included) per CPU second, against
    the naive way and the draft-decode floor on the same files; every figure also as a ratio to the floor.
    Each of `rounds` rounds runs every pipeline once, and each keeps its best pass: a VM that slows down
    during the bench slows them all alike, so their ratios hold."""
    sc = cfg.shard
    files = sorted((corpus / "images").rglob("*.jpg"))
    out = corpus / "shard-timing"
    manifests = {}

    def shard_ms(resample: str) -> float:
        shutil.rmtree(out, ignore_errors=True)  # this bench's own output of the previous pass
        start = time.process_time()
        manifests[resample] = shard_dataset(replace(sc, images=str(corpus / "images"), labels=str(corpus / "labels"),
                                                    out=str(out), resample=resample, workers=1), progress=False)
        return (time.process_time() - start) / len(files) * 1000

    passes = {
        "floor": lambda: cpu_ms(lambda path: draft_decode(path, sc.max_short_side), files, repeats=1),
        "floor_pil": lambda: cpu_ms(lambda path: draft_decode(path, sc.max_short_side, pil_only=True), files, repeats=1),
        "naive": lambda: cpu_ms(lambda path: naive_shard_image(path, sc.max_short_side, sc.quality), files, repeats=1),
        **{f"sharder_{resample}": functools.partial(shard_ms, resample)
           for resample in dict.fromkeys([sc.resample, "lanczos"])},
    }
    rows = dict.fromkeys(passes, math.inf)
    for _ in range(rounds):
        for key, run in passes.items():
            rows[key] = min(rows[key], run())
    shutil.rmtree(out, ignore_errors=True)
    floor, naive = rows["floor"], rows["naive"]
    return {"images": len(files), "resample": sc.resample, "stored_as_is": len(manifests[sc.resample]["stored_as_is"]),
            "ms_per_image": rows, "ratio_to_floor": {k: v / floor for k, v in rows.items()},
            "speedup_over_naive": naive / rows[f"sharder_{sc.resample}"],
            "filter_difference": filter_difference(files, cfg)}


def shard_members(shards: Path, manifest: Manifest, split: str, count: int) -> list[bytes]:
    """The image bytes of the first `count` samples of `split` (repeated if it holds fewer)."""
    found: list[bytes] = []
    ext = "." + manifest.image_ext
    for shard in manifest.split(split).shards:
        with tarfile.open(shards / shard.name) as tar:
            found += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(ext)]
        if len(found) >= count:
            break
    return list(itertools.islice(itertools.cycle(found), count))


def loader_floors(cfg: JobConfig, shards: Path, manifest: Manifest, images: int) -> dict:
    """CPU ms per image of the least work the loader could do on the same shard members: a bare full
    decode (by jpeg_pixels where it can, as the loader; and by PIL); the draft decode its crops allow; a
    full decode plus one box resize of its crops (PIL's, the issue's definition); and decode_image alone
    (the loader's per-image work, without tar reading, labels and batching)."""
    data_cfg, size = cfg.data, cfg.data.image_size
    members = shard_members(shards, manifest, data_cfg.train_split, images)
    rng = np.random.default_rng(cfg.train.seed)

    def bare_decode(data: bytes) -> object:
        pixels = jpeg_pixels(data)
        return pixels if pixels is not None else Image.open(io.BytesIO(data)).load()

    def box_resize(data: bytes) -> Image.Image:
        im = Image.open(io.BytesIO(data))
        im.load()
        left, top, right, bottom = sample_geometry(data_cfg.augment, im.width, im.height, data_cfg, rng).box
        box = (max(left, 0), max(top, 0), min(right, im.width), min(bottom, im.height))
        return im.resize((size, size), Image.Resampling.BILINEAR, box=box)

    with torch_threads(1):  # as in a loader worker
        return {"augment": data_cfg.augment, "images": len(members),
                "decode": cpu_ms(bare_decode, members),
                "decode_pil": cpu_ms(lambda data: Image.open(io.BytesIO(data)).load(), members),
                "draft_decode": cpu_ms(lambda data: decode_drafted(data, data_cfg.augment, data_cfg, rng), members),
                "decode_box_resize": cpu_ms(box_resize, members),
                "decode_image": cpu_ms(lambda data: decode_image(data, data_cfg.augment, data_cfg, rng), members)}


def bench_imagefolder(cfg: JobConfig, root: Path, workers: list[int], images: int, cpus: int) -> list[dict]:
    """(b) the usual way: ImageFolder over the loose full-size JPEGs, per worker count."""
    dataset = torchvision.datasets.ImageFolder(str(root), transform=imagefolder_transform(cfg.data))
    batch = cfg.data.batch_size
    rows = []
    for w in workers:
        warmup, count = loader_batches(w, images, batch)
        # num_samples > len(dataset) chains reshuffled passes: one DataLoader epoch, no worker restart.
        loader = DataLoader(dataset, batch_size=batch, num_workers=w,
                            sampler=RandomSampler(dataset, num_samples=count * batch))
        with torch_threads(1):
            rows.append(per_core({"workers": w, **drain(loader, count, warmup)}, cpus))
    return rows


def ratios(loader_rows: list[dict], folder_rows: list[dict]) -> list[dict]:
    """Shards vs ImageFolder at equal worker counts (equal cores, so also the per-core ratio); for
    workers=0 also the ratio of images per CPU second."""
    folder = {row["workers"]: row for row in folder_rows}
    out = []
    for row in loader_rows:
        other = folder.get(row["workers"])
        if other is None:
            continue
        out.append({"workers": row["workers"], "ratio": row["images_per_s"] / other["images_per_s"]})
        if "images_per_cpu_s" in row:
            out[-1]["ratio_cpu"] = row["images_per_cpu_s"] / other["images_per_cpu_s"]
    return out


# --------------------------------------------------------------------------- training steps


def train_rate(cfg: JobConfig, num_classes: dict[str, int], counts: dict[str, list[int]] | None, device: torch.device,
               batches: Iterable, transform: Any, steps: int, warmup: int, amp: str, channels_last: bool,
               compile_backbone: bool) -> dict:
    """Time engine.train_one_epoch for warmup + steps optimizer steps, set up as train.py does
    (model, AdamW over param groups, GradScaler, MultiTaskLoss) but with a constant LR."""
    tcfg = cfg.train
    amp_dtype = resolve_amp(amp, device)
    model, optimizer, scaler, loss_fn = build_training(cfg, num_classes, counts, device, amp_dtype, channels_last)
    if compile_backbone:
        model.backbone.compile()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = Clock(batches)
    state = TrainState(model, optimizer, scaler, loss_fn, transform, device, amp_dtype, tcfg.accum_steps,
                       tcfg.grad_clip)
    train_one_epoch(state, clock, steps=warmup + steps)
    clock.stop()
    row = clock.rate(warmup * tcfg.accum_steps)
    row.update(step_ms=row["seconds"] / steps * 1000, amp=str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32",
               channels_last=channels_last, compile=compile_backbone)
    if device.type == "cuda":
        row["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def bench_model(cfg: JobConfig, num_classes: dict[str, int], counts: dict[str, list[int]] | None, device: torch.device,
                steps: int, warmup: int, amp: str, channels_last: bool, compile_backbone: bool) -> dict:
    """(c) a train step on one synthetic uint8 batch already on the device: no loading at all."""
    size, batch = cfg.data.image_size, cfg.data.batch_size
    gen = torch.Generator().manual_seed(cfg.train.seed)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen).to(device)
    labels = torch.stack([torch.randint(0, num_classes[t], (batch,), generator=gen) for t in TASKS], dim=1).to(device)
    data_cfg = replace(cfg.data, decode="cpu")  # the batch is pixels: only the normalize runs
    transform = DeviceTransform(data_cfg, device, train=True, channels_last=channels_last)
    return train_rate(cfg, num_classes, counts, device, itertools.repeat((images, labels, torch.arange(batch))),
                      transform, steps, warmup, amp, channels_last, compile_backbone)


def bench_e2e(cfg: JobConfig, shards: Path, manifest: Manifest, counts: dict[str, list[int]] | None,
              device: torch.device, steps: int, warmup: int, decode: str) -> dict:
    """(d) train steps fed by the real TrainLoader: images/s and the fraction of time waiting for it."""
    data_cfg = replace(cfg.data, shards=str(shards), decode=decode)
    channels_last = use_channels_last(cfg, device)
    batches = (warmup + steps) * cfg.train.accum_steps
    loader = TrainLoader(data_cfg, tiled(manifest, data_cfg.train_split, batches * data_cfg.batch_size),
                         rank=0, world_size=1, seed=cfg.train.seed)
    transform = DeviceTransform(data_cfg, device, train=True, channels_last=channels_last)
    row = train_rate(cfg, manifest.num_classes, counts, device, loader, transform, steps, warmup,
                     cfg.train.amp, channels_last, cfg.train.compile)
    return {"workers": data_cfg.num_workers, "decode": decode, **row}


def bench_gpu(cfg: JobConfig, shards: Path, manifest: Manifest, counts: dict[str, list[int]] | None,
              device: torch.device, steps: int, warmup: int) -> dict:
    """(e) CUDA only: model-step variants side by side, and e2e with the GPU (nvJPEG) decode path."""
    if device.type != "cuda":
        return {"skipped": "no CUDA device"}
    num_classes = manifest.num_classes
    rows = []
    for amp, channels_last, compile_backbone in GPU_VARIANTS:
        if amp == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            rows.append({"amp": "bf16", "channels_last": channels_last, "compile": compile_backbone,
                         "skipped": f"{torch.cuda.get_device_name(device)} has no bf16"})
            continue
        rows.append(bench_model(cfg, num_classes, counts, device, steps, warmup, amp, channels_last, compile_backbone))
        torch.cuda.empty_cache()
    try:
        e2e = bench_e2e(cfg, shards, manifest, counts, device, steps, warmup, decode="gpu")
    except UserError as exc:  # e.g. shards that are not JPEG
        e2e = {"skipped": str(exc)}
    return {"model": rows, "e2e_gpu_decode": e2e}


# --------------------------------------------------------------------------- report


def machine_info(device: torch.device) -> dict:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "load_avg_1m": os.getloadavg()[0],
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def _fmt(row: dict, key: str, spec: str = ".0f") -> str:
    return format(row[key], spec) if key in row else "-"


def format_table(result: dict) -> str:
    """The human-readable report of a bench result."""
    m, s, c = result["machine"], result["settings"], result["corpus"]
    lines = [f"artdist bench: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, device {m['device']}"
             + (f" ({m['gpu']})" if m["gpu"] else "") + f", load {m['load_avg_1m']:.1f} -> {result['load_avg_1m_end']:.1f}",
             f"settings: {s['backbone']} {s['image_size']} px, batch {s['batch_size']}, amp {s['amp']}, "
             f"e2e workers {s['num_workers']}, shards max_short_side {s['max_short_side']}"
             + (f"; cpu defaults {', '.join(s['cpu_defaults'])}" if s["cpu_defaults"] else "")]
    if c and "width" in c:
        lines.append(f"corpus: {c['images']} JPEGs {c['width']}x{c['height']} ({c['megapixels']:.2f} MP, median "
                     f"{c['median_kb']:.0f} KB) in {c['dir']}")
    elif c:
        lines.append(f"corpus: {c['how']}: {c['images']} images, median {c['megapixels']:.2f} MP (mean "
                     f"{c['mean_megapixels']:.2f}, max {c['max_megapixels']:.1f}), median {c['median_kb']:.0f} KB")
    sh = result["shard"]
    if "skipped" not in sh:
        ms, ratio = sh["ms_per_image"], sh["ratio_to_floor"]
        lines += ["", f"sharding, CPU ms per image over {sh['images']} files (one process; ratio to the draft-decode floor):"]
        for key, what in (("floor", "floor: open + JPEG draft + decode"),
                          ("floor_pil", "the same, decoded by PIL only"),
                          ("naive", "naive: full decode, LANCZOS, encode"),
                          (f"sharder_{sh['resample']}", f"artdist shard, shard.resample={sh['resample']}"),
                          ("sharder_lanczos", "artdist shard, shard.resample=lanczos")):
            if key in ms and not (key == "sharder_lanczos" and sh["resample"] == "lanczos"):
                lines.append(f"  {what:<42} {ms[key]:7.2f} ms  {ratio[key]:5.2f}x floor")
        lines.append(f"  sharder speed-up over naive: {sh['speedup_over_naive']:.2f}x; {sh['stored_as_is']} of "
                     f"{sh['images']} files stored as they are (shard.passthrough)")
        fd = sh["filter_difference"]
        if fd.get("resized_images"):
            lines.append(f"  {fd['resample']} vs lanczos on {fd['resized_images']} resized pictures: PSNR "
                         f"{fd['psnr_db_at_shard_size']:.1f} dB at shard size, {fd['psnr_db_at_image_size']:.1f} dB "
                         f"(min {fd['min_psnr_db_at_image_size']:.1f}, max abs error {fd['max_abs_error_at_image_size']}) "
                         f"at the {s['image_size']} px training size")
    loader, folder = result["loader"], result["imagefolder"]
    if isinstance(loader, list) or isinstance(folder, list):
        ratio = {r["workers"]: r["ratio"] for r in result.get("ratio", [])}
        by_w = {r["workers"]: r for r in loader} if isinstance(loader, list) else {}
        fby_w = {r["workers"]: r for r in folder} if isinstance(folder, list) else {}
        lines += ["", "(a) shards -> TrainLoader (uint8 batches) vs (b) ImageFolder (normalized float batches)",
                  f"{'workers':>7} {'cores':>5} {'(a) img/s':>10} {'per core':>9} {'1st batch':>9} "
                  f"{'(b) img/s':>10} {'per core':>9} {'1st batch':>9} {'(a)/(b)':>8}"]
        for w in sorted(set(by_w) | set(fby_w)):
            a, b = by_w.get(w, {}), fby_w.get(w, {})
            lines.append(f"{w:>7} {a.get('cores', b.get('cores', 0)):>5} {_fmt(a, 'images_per_s'):>10} "
                         f"{_fmt(a, 'images_per_s_per_core'):>9} {_fmt(a, 'first_batch_s', '.2f'):>9} "
                         f"{_fmt(b, 'images_per_s'):>10} {_fmt(b, 'images_per_s_per_core'):>9} "
                         f"{_fmt(b, 'first_batch_s', '.2f'):>9} "
                         f"{format(ratio[w], '.2f') + 'x' if w in ratio else '-':>8}")
        cpu = [r for r in result.get("ratio", []) if "ratio_cpu" in r]
        if cpu:
            lines.append(f"workers 0, images per CPU second (unaffected by other load): (a) "
                         f"{by_w[0]['images_per_cpu_s']:.0f}, (b) {fby_w[0]['images_per_cpu_s']:.0f}, "
                         f"(a)/(b) {cpu[0]['ratio_cpu']:.2f}x")
    fl = result.get("loader_floor")
    if fl:
        lines.append(f"loader floors on the same shard members ({fl['augment']}), CPU ms per image: bare decode "
                     f"{fl['decode']:.2f} (by PIL {fl['decode_pil']:.2f}), draft decode {fl['draft_decode']:.2f}, "
                     f"full decode + one PIL box resize {fl['decode_box_resize']:.2f}" + (
                         f"; loader (workers 0) {fl['loader_ms']:.2f} = {fl['ratio']['decode']:.2f}x bare decode, "
                         f"{fl['ratio']['draft_decode']:.2f}x draft decode, {fl['ratio']['decode_box_resize']:.2f}x "
                         f"decode + box resize, {fl['ratio']['decode_image']:.2f}x its own decode_image "
                         f"({fl['decode_image']:.2f})" if "ratio" in fl else ""))
    for key, title in (("shard", "sharding"), ("loader", "(a) loader"), ("imagefolder", "(b) imagefolder")):
        if "skipped" in result[key]:
            lines.append(f"{title}: skipped: {result[key]['skipped']}")
    lines.append("")
    model = result["model"]
    lines.append("(c) model train step, synthetic batch: " + (f"skipped: {model['skipped']}" if "skipped" in model else
                 f"{model['images_per_s']:.1f} img/s, {model['step_ms']:.0f} ms/step ({model['amp']}, "
                 f"channels_last {model['channels_last']}, compile {model['compile']})"))
    e2e = result["e2e"]
    lines.append("(d) end to end from shards: " + (f"skipped: {e2e['skipped']}" if "skipped" in e2e else
                 f"{e2e['images_per_s']:.1f} img/s, {e2e['step_ms']:.0f} ms/step, data-wait "
                 f"{e2e['data_wait_fraction']:.1%} ({e2e['workers']} workers, decode {e2e['decode']})"))
    gpu = result["gpu"]
    if "skipped" in gpu:
        lines.append(f"(e) GPU: skipped: {gpu['skipped']}")
    else:
        lines.append("(e) GPU model step variants:")
        for row in gpu["model"]:
            name = f"{row['amp']:>5} {'channels_last' if row['channels_last'] else 'NCHW':>13} " \
                   f"{'compile' if row['compile'] else '':>7}"
            lines.append(f"    {name}  " + (f"skipped: {row['skipped']}" if "skipped" in row else
                         f"{row['images_per_s']:8.0f} img/s {row['step_ms']:7.1f} ms/step {row['max_mem_gb']:5.1f} GB"))
        g = gpu["e2e_gpu_decode"]
        lines.append("    e2e data.decode=gpu: " + (f"skipped: {g['skipped']}" if "skipped" in g else
                     f"{g['images_per_s']:.0f} img/s, data-wait {g['data_wait_fraction']:.1%}"))
    return "\n".join(lines)


# --------------------------------------------------------------------------- command


def run_bench(cfg: JobConfig, *, workdir: Path, images: int, full_size: int, workers: list[int], steps: int | None,
              only: list[str], cpu_defaults: list[str], device: torch.device, images_dir: Path | None = None) -> dict:
    """Every selected part; unselected parts are reported as skipped. Returns the JSON-able result."""
    kind = device.type if device.type in DEFAULT_STEPS else "cpu"
    steps = steps or DEFAULT_STEPS[kind]
    warmup = WARMUP_STEPS[kind]
    if device.type == "cuda" and not cfg.train.deterministic:
        torch.backends.cudnn.benchmark = True  # as train.py does
    info = machine_info(device)
    result: dict = {
        "machine": info,
        "settings": {"backbone": cfg.model.backbone, "image_size": cfg.data.image_size,
                     "batch_size": cfg.data.batch_size, "num_workers": cfg.data.num_workers,
                     "amp": str(resolve_amp(cfg.train.amp, device) or "off").removeprefix("torch."),
                     "max_short_side": cfg.shard.max_short_side, "resample": cfg.shard.resample,
                     "quality": cfg.shard.quality, "augment": cfg.data.augment, "steps": steps, "warmup_steps": warmup,
                     "loader_images": images, "loader_warmup_rounds": WARMUP_ROUNDS, "cpu_defaults": cpu_defaults},
        "corpus": {},
        **{part: {"skipped": "not selected (--only)"} for part in PARTS},
    }
    if images_dir is None:
        corpus = build_corpus(workdir / f"corpus-{images}-{full_size}", images, full_size)
    else:
        tag = hashlib.sha1(str(images_dir.resolve()).encode("utf-8")).hexdigest()[:10]
        corpus = build_real_corpus(workdir / f"real-{images_dir.name}-{tag}", images_dir)
    result["corpus"] = corpus
    shards, manifest = build_shards(cfg, Path(corpus["dir"]))
    result["corpus"]["shards"] = str(shards)
    result["corpus"]["train_samples"] = manifest.num_samples(cfg.data.train_split)
    counts = None
    if cfg.train.class_weighting != "none":
        counts = manifest.label_counts(cfg.data.train_split)

    if "shard" in only:
        result["shard"] = bench_shard(cfg, Path(corpus["dir"]))
    if "loader" in only:
        result["loader"] = bench_loader(cfg, shards, manifest, workers, images, info["cores"])
        floors = loader_floors(cfg, shards, manifest, images)
        in_process = [row for row in result["loader"] if row["workers"] == 0]
        if in_process:
            loader_ms = 1000 / in_process[0]["images_per_cpu_s"]
            floors["loader_ms"] = loader_ms
            floors["ratio"] = {k: loader_ms / floors[k]
                               for k in ("decode", "decode_pil", "draft_decode", "decode_box_resize", "decode_image")}
        result["loader_floor"] = floors
    if "imagefolder" in only:
        result["imagefolder"] = bench_imagefolder(cfg, Path(corpus["dir"]) / "images", workers, images, info["cores"])
    if "loader" in only and "imagefolder" in only:
        result["ratio"] = ratios(result["loader"], result["imagefolder"])
    if "model" in only:
        result["model"] = bench_model(cfg, manifest.num_classes, counts, device, steps, warmup, cfg.train.amp,
                                      use_channels_last(cfg, device), cfg.train.compile)
    if "e2e" in only:
        result["e2e"] = bench_e2e(cfg, shards, manifest, counts, device, steps, warmup, cfg.data.decode)
    if "gpu" in only:
        result["gpu"] = bench_gpu(cfg, shards, manifest, counts, device, steps, warmup)
    result["load_avg_1m_end"] = os.getloadavg()[0]
    return result
