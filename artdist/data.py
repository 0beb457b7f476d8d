"""Shards -> batches: an equal-length train stream per rank, an exactly-once eval stream, the device-side transform.

How samples reach the workers (why not webdataset's own splitters): each epoch the split's shards
are put in an order drawn from (seed, epoch) and read as ONE concatenated stream of
`num_samples` positions. Global loader worker g = rank * workers + worker_id reads the contiguous
position range [g * q, (g + 1) * q), q = samples per worker. With whole-shard assignment
(`wds.split_by_node` / `split_by_worker`) uneven shards or fewer shards than ranks x workers give
ranks unequal sample counts (a DDP hang) or, once the counts are forced equal with `with_epoch`,
silently drop the tails of big shards. Position ranges give every worker exactly q samples and
cover every sample each epoch; the price is reading (not decoding) at most one shard prefix per
worker to reach its start. q is rounded up so that each worker yields whole batches; the
`world * workers * q - num_samples` extra positions wrap around to the START of the epoch's
stream (the cycling choice), so those first samples are seen twice that epoch — and nothing else.
The tar members are read with webdataset's `tariterators.tarfile_samples`.

Batches are assembled inside the workers, so batch b of a rank comes from worker b % workers and
`skip_batches` can skip raw samples before any decoding. Randomness is explicit: shard order from
(seed, epoch), the shuffle buffer from (seed, epoch, global worker), each sample's augmentation
from (seed, epoch, global worker, index in the worker's stream) — a run is reproducible and a
resumed epoch yields exactly the batches it would have.
"""
from __future__ import annotations

import io
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from artdist.cli import UserError
from artdist.config import TASKS, DataConfig

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "artdist-shards/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RRC_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
RRC_TRIES = 10
# Deeper than DataLoader's default 2: decode time varies a lot between paintings (0.1-17 MP
# originals), and a few queued batches per worker hide the slow ones.
PREFETCH_FACTOR = 4

Batch = tuple[Any, torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------- manifest


def read_manifest(shards_dir: str | Path) -> dict:
    """The shard folder's manifest.json (docs/design.md "Shard format"), checked for the keys loaders use."""
    path = Path(shards_dir) / MANIFEST_NAME
    hint = f"run `artdist shard --out {shards_dir}` first, or point data.shards at a folder it made"
    if not path.is_file():
        raise UserError(f"no shards in {shards_dir}: {path} does not exist; {hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} cannot be read ({exc}); {hint}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path} is not an artdist shard manifest (format {MANIFEST_FORMAT!r}); {hint}")
    missing = [key for key in ("splits", "classes", "image_ext") if key not in manifest]
    missing += [f"classes.{task}" for task in TASKS if task not in manifest.get("classes", {})]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; {hint}")
    return manifest


def num_classes(manifest: dict) -> dict[str, int]:
    return {task: len(manifest["classes"][task]) for task in TASKS}


def _split_files(data_cfg: DataConfig, manifest: dict, split: str) -> tuple[list[str], list[int]]:
    """Shard paths and sample counts of one split, in manifest order."""
    splits = manifest["splits"]
    if split not in splits:
        raise UserError(f"split {split!r} is not in {data_cfg.shards}/{MANIFEST_NAME} (it has "
                        f"{sorted(splits)}); set data.train_split/val_split/test_split to one of those")
    shards = splits[split]["shards"]
    urls = [str(Path(data_cfg.shards) / shard["name"]) for shard in shards]
    counts = [int(shard["num_samples"]) for shard in shards]
    if sum(counts) == 0:
        raise UserError(f"split {split!r} in {data_cfg.shards} has no samples; re-run `artdist shard`")
    absent = [url for url in urls if not Path(url).is_file()]
    if absent:
        raise UserError(f"{len(absent)} shard(s) listed in {data_cfg.shards}/{MANIFEST_NAME} are missing, "
                        f"e.g. {absent[0]}; re-run `artdist shard` or copy the whole folder")
    if data_cfg.decode == "gpu" and manifest["image_ext"] != "jpg":
        raise UserError(f"data.decode=gpu decodes JPEG only but {data_cfg.shards} holds "
                        f"{manifest['image_ext']} images; use data.decode=cpu or re-shard with shard.format=jpeg")
    return urls, counts


# --------------------------------------------------------------------------- reading


def _read_range(urls: list[str], counts: list[int], start: int, length: int) -> Iterator[dict]:
    """Raw samples at positions start, start+1, ... (length of them) of the concatenated shards,
    wrapping around to the first shard after the last."""
    bounds = np.cumsum([0, *counts])
    start %= int(bounds[-1])
    shard = int(np.searchsorted(bounds, start, side="right")) - 1
    skip = start - int(bounds[shard])
    while length > 0:
        seen = 0
        if counts[shard] > skip:
            for seen, sample in enumerate(tarfile_samples([{"url": urls[shard]}]), start=1):
                if seen <= skip:
                    continue
                yield sample
                length -= 1
                if length == 0:
                    return
            # A short shard would silently shift every worker's range: refuse it.
            if seen != counts[shard]:
                raise UserError(f"{urls[shard]} holds {seen} samples but {MANIFEST_NAME} says "
                                f"{counts[shard]}; the shard is damaged: re-run `artdist shard`")
        skip = 0
        shard = (shard + 1) % len(urls)


def _shuffled(samples: Iterable[dict], buffer: int, rng: np.random.Generator) -> Iterator[dict]:
    """Buffer shuffle: once `buffer` samples are held, each new one replaces a random held one."""
    held: list[dict] = []
    for sample in samples:
        if len(held) < buffer:
            held.append(sample)
            continue
        j = int(rng.integers(buffer))
        yield held[j]
        held[j] = sample
    rng.shuffle(held)
    yield from held


def _rng(*parts: int) -> np.random.Generator:
    # SeedSequence wants non-negative entries; a negative train.seed is still a valid seed.
    return np.random.default_rng([p % 2**64 for p in parts])


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """Source box (left, top, right, bottom) in image pixels, resized to the square output; parts of
    the box outside the image become zero padding. flip: mirror left-right afterwards."""

    box: tuple[float, float, float, float]
    flip: bool = False


def sample_geometry(augment: str, width: int, height: int, data_cfg: DataConfig,
                    rng: np.random.Generator | None) -> Geometry:
    """One image's crop for `augment` in crop_flip | rrc | none (none = eval: shorter side to
    image_size, center crop). Shared by the CPU (PIL) and GPU decode paths."""
    size = data_cfg.image_size
    if augment == "none":
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        return Geometry((left, top, left + side, top + side))
    if augment == "crop_flip":
        # The seeds' recipe: resize shorter side to size, zero-pad by crop_padding, random crop.
        scale = size / min(width, height)
        pad = data_cfg.crop_padding
        x = int(rng.integers(round(width * scale) + 2 * pad - size + 1)) - pad
        y = int(rng.integers(round(height * scale) + 2 * pad - size + 1)) - pad
        return Geometry((x / scale, y / scale, (x + size) / scale, (y + size) / scale), bool(rng.random() < 0.5))
    if augment == "rrc":
        # torchvision's RandomResizedCrop parameters, drawn from our per-sample generator.
        area = width * height
        for _ in range(RRC_TRIES):
            target = area * rng.uniform(data_cfg.rrc_scale_min, 1.0)
            ratio = math.exp(rng.uniform(*RRC_LOG_RATIO))
            w = round(math.sqrt(target * ratio))
            h = round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                left = int(rng.integers(width - w + 1))
                top = int(rng.integers(height - h + 1))
                return Geometry((left, top, left + w, top + h), bool(rng.random() < 0.5))
        ratio = min(max(width / height, 3 / 4), 4 / 3)
        w, h = min(width, round(height * ratio)), min(height, round(width / ratio))
        left, top = (width - w) / 2, (height - h) / 2
        return Geometry((left, top, left + w, top + h), bool(rng.random() < 0.5))
    raise ValueError(f"unknown augment {augment!r}")


def _placement(box: tuple[float, float, float, float], width: int, height: int,
               size: int) -> tuple[tuple[float, float, float, float], tuple[int, int, int, int]]:
    """The part of `box` inside the image, and the output rectangle it lands in."""
    left, top, right, bottom = box
    sx, sy = size / (right - left), size / (bottom - top)
    src = (max(left, 0.0), max(top, 0.0), min(right, float(width)), min(bottom, float(height)))
    x0, y0 = min(round((src[0] - left) * sx), size - 1), min(round((src[1] - top) * sy), size - 1)
    x1, y1 = round((src[2] - left) * sx), round((src[3] - top) * sy)
    return src, (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))


def apply_geometry_pil(img: Image.Image, geom: Geometry, size: int) -> Image.Image:
    left, top, right, bottom = geom.box
    if abs(right - left - size) < 1 and abs(bottom - top - size) < 1:
        # After a JPEG draft the box is often at output scale already: a crop (zero-filled outside
        # the image, like the padding below) replaces a near no-op resample that cost ~0.6 ms/img
        # (docs/benchmarks.md).
        x, y = round(left), round(top)
        out = img.crop((x, y, x + size, y + size))
        return out.transpose(Image.FLIP_LEFT_RIGHT) if geom.flip else out
    src, (x0, y0, x1, y1) = _placement(geom.box, img.width, img.height, size)
    out = img.resize((x1 - x0, y1 - y0), Image.BILINEAR, box=src)
    if (x0, y0, x1, y1) != (0, 0, size, size):
        canvas = Image.new("RGB", (size, size))
        canvas.paste(out, (x0, y0))
        out = canvas
    return out.transpose(Image.FLIP_LEFT_RIGHT) if geom.flip else out


def apply_geometry_tensor(img: torch.Tensor, geom: Geometry, size: int) -> torch.Tensor:
    """uint8 [3, H, W] (any device) -> uint8 [3, size, size]: the GPU-decode path's crop/resize/flip."""
    height, width = img.shape[-2:]
    src, (x0, y0, x1, y1) = _placement(geom.box, width, height, size)
    left, top = int(src[0]), int(src[1])
    right, bottom = max(round(src[2]), left + 1), max(round(src[3]), top + 1)
    crop = img[None, :, top:bottom, left:right].float()
    resized = F.interpolate(crop, size=(y1 - y0, x1 - x0), mode="bilinear", antialias=True, align_corners=False)
    out = torch.zeros((3, size, size), dtype=torch.uint8, device=img.device)
    out[:, y0:y1, x0:x1] = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    return out.flip(-1) if geom.flip else out


def decode_image(data: bytes, augment: str, data_cfg: DataConfig, rng: np.random.Generator | None) -> np.ndarray:
    """Encoded image -> uint8 [S, S, 3] with PIL.

    PIL is the faster CPU path here (597x448 JPEG -> 224 px, one thread, dev machine): 1.7 ms
    (none) / 2.0 ms (crop_flip) / 3.2 ms (rrc) per image against 3.1-3.2 ms for
    torchvision.io.decode_jpeg + the tensor resize, because JPEG draft mode lets libjpeg decode
    at 1/2-1/8 scale whenever the crop needs fewer pixels than the file holds.
    """
    size = data_cfg.image_size
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    geom = sample_geometry(augment, width, height, data_cfg, rng)
    left, top, right, bottom = geom.box
    # Rounded down: draft only reduces by 2/4/8 when the file is at least that many times the
    # request, and 597x448 -> 298.5x224 must still allow 1/2. At worst this upsamples by < 1 px.
    img.draft("RGB", (max(1, int(width * size / (right - left))), max(1, int(height * size / (bottom - top)))))
    img = img.convert("RGB")
    fx, fy = img.width / width, img.height / height
    geom = Geometry((left * fx, top * fy, right * fx, bottom * fy), geom.flip)
    return np.asarray(apply_geometry_pil(img, geom, size))


# --------------------------------------------------------------------------- streams


def _worker_id() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


def _batches(samples: Iterable[dict], data_cfg: DataConfig, ext: str, augment: str,
             rngs: Iterator[np.random.Generator | None]) -> Iterator[Batch]:
    """Raw samples -> (images, labels, ids) batches of data.batch_size (the last one may be short).

    CPU decode: images uint8 [B, 3, S, S] in channels_last memory (a view of the decoded HWC
    pixels: no host-side permute copy). GPU decode: a list of encoded uint8 1-D tensors.
    """
    chunk: list[dict] = []

    def decode(sample: dict, rng: np.random.Generator | None) -> np.ndarray:
        try:
            return decode_image(sample[ext], augment, data_cfg, rng)
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            raise UserError(f"{sample['__url__']}: sample {sample['__key__']} is not a readable image ({exc}); "
                            "re-run `artdist shard`") from None

    def emit() -> Batch:
        metas = [json.loads(sample["json"]) for sample in chunk]
        labels = torch.tensor([[meta[task] for task in TASKS] for meta in metas], dtype=torch.int64)
        ids = torch.tensor([meta["id"] for meta in metas], dtype=torch.int64)
        if data_cfg.decode == "gpu":
            images: Any = [torch.frombuffer(bytearray(sample[ext]), dtype=torch.uint8) for sample in chunk]
        else:
            pixels = np.stack([decode(sample, next(rngs)) for sample in chunk])
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        return images, labels, ids

    for sample in samples:
        if ext not in sample or "json" not in sample:
            raise UserError(f"{sample.get('__url__')}: sample {sample.get('__key__')} lacks its .{ext} or "
                            f".json member; the shard is not in the artdist format: re-run `artdist shard`")
        chunk.append(sample)
        if len(chunk) == data_cfg.batch_size:
            yield emit()
            chunk = []
    if chunk:
        yield emit()


class _TrainStream(IterableDataset):
    """One rank's training stream; the DataLoader runs a copy in each worker."""

    def __init__(self, data_cfg: DataConfig, urls: list[str], counts: list[int], ext: str, rank: int,
                 world_size: int, workers: int, batches_per_worker: int, seed: int):
        self.data_cfg, self.urls, self.counts, self.ext = data_cfg, urls, counts, ext
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.batches_per_worker, self.seed = batches_per_worker, seed
        self.epoch = 0
        self.skip_batches = 0

    def __iter__(self) -> Iterator[Batch]:
        # The DataLoader always asks worker 0 first; rotating the roles makes the worker that owns
        # batch skip_batches go first, so a resumed epoch keeps the unskipped order.
        worker = (_worker_id() + self.skip_batches) % self.workers
        return self._stream(worker, self.epoch, self.skip_batches)

    def _stream(self, worker: int, epoch: int, skip_batches: int) -> Iterator[Batch]:
        cfg = self.data_cfg
        global_worker = self.rank * self.workers + worker
        per_worker = self.batches_per_worker * cfg.batch_size
        order = _rng(self.seed, epoch).permutation(len(self.urls))
        raw = _read_range([self.urls[i] for i in order], [self.counts[i] for i in order],
                          global_worker * per_worker, per_worker)
        raw = _shuffled(raw, cfg.shuffle_buffer, _rng(self.seed, epoch, global_worker, 1))
        # Batches b = j * workers + worker of this rank come from here; skip those below skip_batches.
        skip = max(0, (skip_batches - worker + self.workers - 1) // self.workers) * cfg.batch_size
        rngs = (_rng(self.seed, epoch, global_worker, 2, index) for index in range(skip, per_worker))
        kept = (sample for index, sample in enumerate(raw) if index >= skip)
        yield from _batches(kept, cfg, self.ext, cfg.augment, rngs)


class _EvalStream(IterableDataset):
    """One rank's share of a split, in manifest order: global worker g reads positions
    [g * N // G, (g + 1) * N // G), so the ranks together see every sample once."""

    def __init__(self, data_cfg: DataConfig, urls: list[str], counts: list[int], ext: str, rank: int,
                 world_size: int, workers: int):
        self.data_cfg, self.urls, self.counts, self.ext = data_cfg, urls, counts, ext
        self.rank, self.world_size, self.workers = rank, world_size, workers

    def _range(self, worker: int) -> tuple[int, int]:
        total, global_workers = sum(self.counts), self.world_size * self.workers
        g = self.rank * self.workers + worker
        return g * total // global_workers, (g + 1) * total // global_workers

    def __len__(self) -> int:
        sizes = [end - start for start, end in map(self._range, range(self.workers))]
        return sum(math.ceil(size / self.data_cfg.batch_size) for size in sizes)

    def __iter__(self) -> Iterator[Batch]:
        start, end = self._range(_worker_id())
        if end == start:
            return iter(())
        raw = _read_range(self.urls, self.counts, start, end - start)
        return _batches(raw, self.data_cfg, self.ext, "none", itertools.repeat(None))


class _Loader:
    """A DataLoader over batches whose workers' UserErrors come out as their one-line message
    (the DataLoader re-raises them with the worker's traceback folded into the text)."""

    def __init__(self, dataset: IterableDataset, num_workers: int):
        # A private generator: the DataLoader draws its base seed when an iterator starts, and
        # drawing it from the global RNG would shift the dropout stream of a run resumed mid-epoch.
        # (Augmentation has its own (seed, epoch, worker) streams and does not use that seed.)
        self.loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                                 pin_memory=torch.cuda.is_available(), generator=torch.Generator(),
                                 prefetch_factor=PREFETCH_FACTOR if num_workers > 0 else None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        try:
            yield from self.loader
        except UserError as exc:
            raise UserError(str(exc).strip().splitlines()[-1].removeprefix(f"{UserError.__module__}.UserError: ")) from None


class TrainLoader:
    """The training batches of one rank; built once per run, `set_epoch` before each epoch.

    Every rank yields exactly len(self) batches per epoch (see the module docstring for how).
    """

    def __init__(self, data_cfg: DataConfig, manifest: dict, rank: int, world_size: int, seed: int,
                 accum_steps: int = 1):
        urls, counts = _split_files(data_cfg, manifest, data_cfg.train_split)
        self.workers = max(1, data_cfg.num_workers)
        self.batches_per_worker = math.ceil(sum(counts) / (world_size * self.workers * data_cfg.batch_size))
        # len(self) a multiple of accum_steps: the trainer runs len // accum_steps optimizer steps,
        # and leftover batches would be samples that no step ever sees.
        while self.batches_per_worker * self.workers % accum_steps:
            self.batches_per_worker += 1
        self.dataset = _TrainStream(data_cfg, urls, counts, manifest["image_ext"], rank, world_size,
                                    self.workers, self.batches_per_worker, seed)
        self.loader = _Loader(self.dataset, data_cfg.num_workers)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch the next iteration streams; skip_batches > 0 resumes it after that many
        batches (the iteration then yields len(self) - skip_batches)."""
        if not 0 <= skip_batches <= len(self):
            raise ValueError(f"skip_batches={skip_batches} is outside 0..{len(self)}")
        self.dataset.epoch = epoch
        self.dataset.skip_batches = skip_batches

    def __len__(self) -> int:
        return self.batches_per_worker * self.workers

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.loader)


def make_eval_loader(data_cfg: DataConfig, manifest: dict, split: str, rank: int, world_size: int) -> _Loader:
    """Batches of `split` for this rank: all ranks together see every sample exactly once, without
    padding; ranks may get different numbers of batches (len() is this rank's count)."""
    urls, counts = _split_files(data_cfg, manifest, split)
    workers = max(1, data_cfg.num_workers)
    dataset = _EvalStream(data_cfg, urls, counts, manifest["image_ext"], rank, world_size, workers)
    return _Loader(dataset, data_cfg.num_workers)


# --------------------------------------------------------------------------- device side


class DeviceTransform:
    """Batch images -> normalized float32 on the training device (decoding there for data.decode=gpu).

    Normalizing on the device keeps host->device traffic at uint8 (4x less than float).
    """

    def __init__(self, data_cfg: DataConfig, device: torch.device | str, train: bool, channels_last: bool):
        self.data_cfg = data_cfg
        self.device = torch.device(device)
        self.augment = data_cfg.augment if train else "none"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if data_cfg.decode == "gpu" and self.device.type != "cuda":
            raise UserError(f"data.decode=gpu needs a CUDA device but the run uses {self.device} "
                            "(no GPU visible, or train.device=cpu); use data.decode=cpu")
        # (x / 255 - mean) / std == (x - 255 mean) / (255 std): one subtract and one divide.
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255

    def __call__(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        if self.data_cfg.decode == "gpu":
            x = self._decode(images)
        else:
            x = images.to(self.device, non_blocking=True)
        x = x.float().sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=self.memory_format)

    def _decode(self, encoded: list[torch.Tensor]) -> torch.Tensor:
        """Batched nvJPEG decode, then each image's crop/resize/flip on the GPU.

        The crop randomness comes from torch's global generator (seeded by the trainer), not
        per-sample seeds: the encoded batch carries no epoch/worker information.
        """
        size = self.data_cfg.image_size
        decoded = torchvision.io.decode_jpeg(list(encoded), mode=torchvision.io.ImageReadMode.RGB,
                                             device=self.device)
        rng = np.random.default_rng(int(torch.randint(2**62, ()).item()))
        out = torch.empty((len(decoded), 3, size, size), dtype=torch.uint8, device=self.device)
        for i, img in enumerate(decoded):
            geom = sample_geometry(self.augment, img.shape[-1], img.shape[-2], self.data_cfg, rng)
            out[i] = apply_geometry_tensor(img, geom, size)
        return out
