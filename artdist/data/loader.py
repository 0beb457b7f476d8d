"""Shards -> batches: an equal-length train stream per rank and an exactly-once eval stream.

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
The tar members are read by a plain USTAR parser (`_tar_samples`), webdataset's sample layout.

Batches are assembled inside the workers, so batch b of a rank comes from worker b % workers and
`skip_batches` can skip raw samples before any decoding. Randomness is explicit: shard order from
(seed, epoch), the shuffle buffer from (seed, epoch, global worker), each batch's augmentation
from (seed, epoch, global worker, batch index in the worker's stream) — a run is reproducible and a
resumed epoch yields exactly the batches it would have.
"""
from __future__ import annotations

import itertools
import math
import signal
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from artdist.config import TASKS, DataConfig
from artdist.data.manifest import MANIFEST_NAME, Manifest, member_key, sample_meta
from artdist.data.transforms import decode_image
from artdist.data.verify import verify_split
from artdist.errors import UserError

# Deeper than DataLoader's default 2: decode time varies a lot between paintings (0.1-17 MP
# originals), and a few queued batches per worker hide the slow ones.
PREFETCH_FACTOR = 4

Batch = tuple[Any, torch.Tensor, torch.Tensor]
# The id of a sample whose image could not be decoded: it stays in its batch as a black image with every
# label -1 (no loss, no metric), so batch counts and shapes (and DDP's steps) stay equal; see bad_samples().
BAD_ID = -1


def bad_samples(ids: torch.Tensor) -> int:
    """How many samples of a batch were undecodable (kept as placeholders, see BAD_ID)."""
    return int((ids == BAD_ID).sum())


def _split_files(data_cfg: DataConfig, manifest: Manifest, split: str
                 ) -> tuple[list[str], list[int], frozenset[str] | None]:
    """Shard paths and sample counts of one split, in manifest order, and the sample keys it keeps
    (None: all; see Manifest.keep — the counts are then of the kept samples)."""
    shards = manifest.split(split).shards
    urls = [str(Path(data_cfg.shards) / shard.name) for shard in shards]
    counts = [shard.num_samples for shard in shards]
    if sum(counts) == 0:
        raise UserError(f"split {split!r} in {data_cfg.shards} has no samples; re-run `artdist shard`")
    absent = [url for url in urls if not Path(url).is_file()]
    if absent:
        raise UserError(f"{len(absent)} shard(s) listed in {data_cfg.shards}/{MANIFEST_NAME} are missing, "
                        f"e.g. {absent[0]}; re-run `artdist shard` or copy the whole folder")
    if data_cfg.decode == "gpu" and manifest.image_ext != "jpg":
        raise UserError(f"data.decode=gpu decodes JPEG only but {data_cfg.shards} holds "
                        f"{manifest.image_ext} images; use data.decode=cpu or re-shard with shard.format=jpeg")
    # Checksums and counts of every shard, before a sample is read (cached: once per file and machine).
    verify_split(data_cfg.shards, manifest, split)
    return urls, counts, manifest.keep(split)


# --------------------------------------------------------------------------- reading


TAR_BLOCK = 512


def _octal(field: bytes) -> int:
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _tar_samples(url: str) -> Iterator[dict]:
    """The samples of one shard as webdataset's tarfile_samples gives them ({"__key__", "__url__",
    ext: bytes}), read with a plain USTAR parser: the sharder writes nothing else, and Python's
    tarfile spends ~0.25 ms per sample (a fifth of a decode) on what this does in ~0.03."""
    sample: dict | None = None
    with open(url, "rb") as fh:
        while True:
            header = fh.read(TAR_BLOCK)
            if len(header) < TAR_BLOCK:  # every tar ends with zero blocks: this one was cut
                raise tarfile.ReadError("unexpected end of data")
            if not header.strip(b"\0"):
                break
            if _octal(header[148:156]) != sum(header[:148]) + 8 * 32 + sum(header[156:]):
                raise tarfile.ReadError("bad tar header checksum")
            if header[156:157] not in (b"0", b"\0"):
                raise tarfile.ReadError(f"member type {header[156:157]!r}: not a tar written by `artdist shard`")
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            size = _octal(header[124:136])
            data = fh.read(size)
            if len(data) < size:
                raise tarfile.ReadError("unexpected end of data")
            fh.seek(-size % TAR_BLOCK, 1)
            key, ext = member_key(name)
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            sample[ext.lower()] = data
    if sample is not None:
        yield sample


def _read_range(urls: list[str], counts: list[int], start: int, length: int,
                keep: frozenset[str] | None = None) -> Iterator[dict]:
    """Raw samples at positions start, start+1, ... (length of them) of the concatenated shards,
    wrapping around to the first shard after the last; with `keep`, positions count only the samples
    whose key it holds (the others are read past, never yielded)."""
    bounds = np.cumsum([0, *counts])
    start %= int(bounds[-1])
    shard = int(np.searchsorted(bounds, start, side="right")) - 1
    skip = start - int(bounds[shard])
    while length > 0:
        seen = 0
        if counts[shard] > skip:
            samples = _tar_samples(urls[shard])
            kept = samples if keep is None else (sample for sample in samples if sample["__key__"] in keep)
            while True:
                try:
                    sample = next(kept, None)
                except (tarfile.TarError, OSError, ValueError) as exc:  # changed on disk since it was verified
                    raise UserError(f"{urls[shard]} cannot be read after sample {seen} ({type(exc).__name__}: "
                                    f"{exc}); the shard is damaged: run `artdist verify`, re-run `artdist shard`") \
                        from None
                if sample is None:
                    break
                seen += 1
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


# --------------------------------------------------------------------------- streams


def _worker_id() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


def _batches(samples: Iterable[dict], data_cfg: DataConfig, ext: str, augment: str,
             rngs: Iterator[np.random.Generator | None], classes: dict[str, list[str]]) -> Iterator[Batch]:
    """Raw samples -> (images, labels, ids) batches of data.batch_size (the last one may be short).

    CPU decode: images uint8 [B, 3, S, S] in channels_last memory (a view of the decoded HWC
    pixels: no host-side permute copy). GPU decode: a list of encoded uint8 1-D tensors.
    An undecodable image becomes a BAD_ID placeholder (said on stderr), not an error.
    """
    chunk: list[dict] = []

    def decode(sample: dict, rng: np.random.Generator | None) -> np.ndarray | None:
        try:
            return decode_image(sample[ext], augment, data_cfg, rng)
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            print(f"warning: {sample['__url__']}: sample {sample['__key__']} is not a readable image ({exc}); "
                  "skipped and counted as a bad sample", file=sys.stderr, flush=True)
            return None

    def emit() -> Batch:
        metas = [sample_meta(sample["json"], sample["__url__"], sample["__key__"], classes) for sample in chunk]
        labels = torch.tensor([[meta[task] for task in TASKS] for meta in metas], dtype=torch.int64)
        ids = torch.tensor([meta["id"] for meta in metas], dtype=torch.int64)
        if data_cfg.decode == "gpu":
            images: Any = [torch.frombuffer(bytearray(sample[ext]), dtype=torch.uint8) for sample in chunk]
        else:
            decoded = [decode(sample, next(rngs)) for sample in chunk]
            shape = next((p.shape for p in decoded if p is not None), (data_cfg.image_size, data_cfg.image_size, 3))
            for i, pixels in enumerate(decoded):
                if pixels is None:
                    decoded[i] = np.zeros(shape, dtype=np.uint8)
                    labels[i] = -1
                    ids[i] = BAD_ID
            images = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)
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
                 world_size: int, workers: int, batches_per_worker: int, seed: int, classes: dict[str, list[str]],
                 keep: frozenset[str] | None):
        self.data_cfg, self.urls, self.counts, self.ext, self.classes = data_cfg, urls, counts, ext, classes
        self.keep = keep
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
                          global_worker * per_worker, per_worker, self.keep)
        raw = _shuffled(raw, cfg.shuffle_buffer, _rng(self.seed, epoch, global_worker, 1))
        # Batches b = j * workers + worker of this rank come from here; skip those below skip_batches.
        skip = max(0, (skip_batches - worker + self.workers - 1) // self.workers) * cfg.batch_size
        # One generator per batch, drawn from in sample order: seeding one per sample cost ~5% of a decode.
        rngs = (rng for batch in range(skip // cfg.batch_size, self.batches_per_worker)
                for rng in itertools.repeat(_rng(self.seed, epoch, global_worker, 2, batch), cfg.batch_size))
        kept = (sample for index, sample in enumerate(raw) if index >= skip)
        yield from _batches(kept, cfg, self.ext, cfg.augment, rngs, self.classes)


class _EvalStream(IterableDataset):
    """One rank's share of a split, in manifest order: global worker g reads positions
    [g * N // G, (g + 1) * N // G), so the ranks together see every sample once."""

    def __init__(self, data_cfg: DataConfig, urls: list[str], counts: list[int], ext: str, rank: int,
                 world_size: int, workers: int, classes: dict[str, list[str]], keep: frozenset[str] | None):
        self.data_cfg, self.urls, self.counts, self.ext, self.classes = data_cfg, urls, counts, ext, classes
        self.keep = keep
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
        raw = _read_range(self.urls, self.counts, start, end - start, self.keep)
        return _batches(raw, self.data_cfg, self.ext, "none", itertools.repeat(None), self.classes)


@dataclass(frozen=True)
class _WorkerUserError:
    """A UserError raised in a loader worker, passed on as an item: the DataLoader would re-raise it
    with the worker's traceback folded into its text."""

    message: str


class _UserErrorsAsItems(IterableDataset):
    """`dataset`'s batches; a UserError ends the stream as one _WorkerUserError item."""

    def __init__(self, dataset: IterableDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Batch | _WorkerUserError]:
        try:
            yield from self.dataset
        except UserError as exc:
            yield _WorkerUserError(str(exc))


def _ignore_sigterm(worker_id: int) -> None:
    """A loader worker outlives a SIGTERM sent to the whole process group (`timeout`, Kubernetes, SLURM), so
    the main process can finish its step and save (train.preempt); the workers end with it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _Loader:
    """A DataLoader over batches whose workers' UserErrors come out as themselves, one line."""

    def __init__(self, dataset: IterableDataset, num_workers: int):
        # A private generator: the DataLoader draws its base seed when an iterator starts, and
        # drawing it from the global RNG would shift the dropout stream of a run resumed mid-epoch.
        # (Augmentation has its own (seed, epoch, worker) streams and does not use that seed.)
        self.loader = DataLoader(_UserErrorsAsItems(dataset), batch_size=None, num_workers=num_workers, persistent_workers=False,
                                 pin_memory=torch.cuda.is_available(), generator=torch.Generator(),
                                 worker_init_fn=_ignore_sigterm,
                                 prefetch_factor=PREFETCH_FACTOR if num_workers > 0 else None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for item in self.loader:
            if isinstance(item, _WorkerUserError):
                raise UserError(item.message)
            yield item


class TrainLoader:
    """The training batches of one rank; built once per run, `set_epoch` before each epoch.

    Every rank yields exactly len(self) batches per epoch (see the module docstring for how).
    """

    def __init__(self, data_cfg: DataConfig, manifest: Manifest, rank: int, world_size: int, seed: int,
                 accum_steps: int = 1):
        urls, counts, keep = _split_files(data_cfg, manifest, data_cfg.train_split)
        self.workers = max(1, data_cfg.num_workers)
        self.batches_per_worker = math.ceil(sum(counts) / (world_size * self.workers * data_cfg.batch_size))
        # len(self) a multiple of accum_steps: the trainer runs len // accum_steps optimizer steps,
        # and leftover batches would be samples that no step ever sees.
        while self.batches_per_worker * self.workers % accum_steps:
            self.batches_per_worker += 1
        self.dataset = _TrainStream(data_cfg, urls, counts, manifest.image_ext, rank, world_size,
                                    self.workers, self.batches_per_worker, seed, manifest.classes, keep)
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


def make_eval_loader(data_cfg: DataConfig, manifest: Manifest, split: str, rank: int, world_size: int) -> _Loader:
    """Batches of `split` for this rank: all ranks together see every sample exactly once, without
    padding; ranks may get different numbers of batches (len() is this rank's count)."""
    urls, counts, keep = _split_files(data_cfg, manifest, split)
    workers = max(1, data_cfg.num_workers)
    dataset = _EvalStream(data_cfg, urls, counts, manifest.image_ext, rank, world_size, workers,
                          manifest.classes, keep)
    return _Loader(dataset, data_cfg.num_workers)
