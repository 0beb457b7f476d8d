"""Tests for artdist.data: manifest errors, equal-length train streams, exactly-once eval, transforms."""
from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _ddp import sha256_of
from artdist.errors import UserError
from artdist.config import TASKS, DataConfig
from artdist.data.loader import BAD_ID, TrainLoader, _tar_samples, make_eval_loader
from artdist.data.manifest import SplitInfo, read_manifest
from artdist.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, DeviceTransform, Geometry, apply_geometry,
                                     crop_resize_batch, decode_image, resize_window, sample_geometry)

CLASSES = {"style": ["a", "b", "c"], "artist": ["x", "y"], "genre": ["g0", "g1", "g2", "g3"]}


def _jpeg(seed: int, width: int, height: int) -> bytes:
    """A smooth random picture (a 4x4 colour grid blown up), so differently resampled crops compare."""
    grid = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grid).resize((width, height), Image.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shards(out: Path, sizes: dict[str, list[int]], image_size: tuple[int, int] = (40, 32)) -> Path:
    """Shards in the docs/design.md format; ids are consecutive over splits, labels derive from the id."""
    out.mkdir(parents=True, exist_ok=True)
    splits, next_id = {}, 0
    for split, shard_sizes in sizes.items():
        shards = []
        for number, count in enumerate(shard_sizes):
            name = f"{split}-{number:06d}.tar"
            with tarfile.open(out / name, "w") as tar:
                for _ in range(count):
                    meta = {"path": f"S/img{next_id}.jpg", "id": next_id, "split": split,
                            "style": next_id % 3, "artist": next_id % 2 - (next_id % 5 == 0), "genre": next_id % 4}
                    key = f"{next_id:016x}"
                    for ext, data in (("jpg", _jpeg(next_id, *image_size)), ("json", json.dumps(meta).encode())):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                    next_id += 1
            shards.append({"name": name, "num_samples": count, "sha256": sha256_of(out / name)})
        splits[split] = {"num_samples": sum(shard_sizes), "shards": shards}
    manifest = {"format": "artdist-shards/1", "splits": splits, "classes": CLASSES, "image_ext": "jpg",
                "options": {}, "anomalies": {}, "skipped": []}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    # 5 deliberately uneven train shards (1..60 samples: 121 in all), a 2-shard val split.
    return write_shards(tmp_path_factory.mktemp("uneven"), {"train": [1, 7, 60, 23, 30], "val": [3, 2]})


def _cfg(shards: Path, **kw) -> DataConfig:
    base = dict(shards=str(shards), image_size=16, batch_size=8, num_workers=0, shuffle_buffer=16)
    return DataConfig(**{**base, **kw})


def _ids(batches) -> list[list[int]]:
    return [ids.tolist() for _, _, ids in batches]


# --------------------------------------------------------------------------- manifest


def test_missing_manifest_says_to_run_shard(tmp_path):
    with pytest.raises(UserError, match="artdist shard"):
        read_manifest(tmp_path)


def test_unreadable_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot be read"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UserError, match="not an artdist shard manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "artdist-shards/1", "image_ext": "jpg",
                                                        "classes": CLASSES, "splits": {"train": {"shards": []}}}))
    with pytest.raises(UserError, match=r"split 'train': num_samples None is not a whole number >= 0"):
        read_manifest(tmp_path)


def test_manifest_classes_and_unknown_split(uneven):
    manifest = read_manifest(uneven)
    assert manifest.num_classes == {task: len(CLASSES[task]) for task in TASKS}
    assert manifest.num_samples("test") == 0 and manifest.num_samples("train") == manifest.splits["train"].num_samples
    with pytest.raises(UserError, match="'test' is not in"):
        make_eval_loader(_cfg(uneven), manifest, "test", 0, 1)


def test_gpu_decode_refuses_non_jpeg_shards(uneven):
    manifest = dataclasses.replace(read_manifest(uneven), image_ext="png")
    with pytest.raises(UserError, match="JPEG only"):
        TrainLoader(_cfg(uneven, decode="gpu"), manifest, 0, 1, seed=0)


def test_gpu_decode_refuses_cpu_device():
    with pytest.raises(UserError, match="CUDA"):
        DeviceTransform(DataConfig(decode="gpu"), "cpu", train=True, channels_last=False)


# --------------------------------------------------------------------------- train stream


@pytest.mark.parametrize("workers", [0, 2])
def test_train_ranks_equal_length_and_cover_every_sample(uneven, workers):
    manifest = read_manifest(uneven)
    cfg = _cfg(uneven, num_workers=workers)
    world, total = 2, manifest.splits["train"].num_samples
    seen: list[int] = []
    for rank in range(world):
        loader = TrainLoader(cfg, manifest, rank, world, seed=3)
        loader.set_epoch(0)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(len(ids) == cfg.batch_size for _, _, ids in batches)
        seen += [i for batch in _ids(batches) for i in batch]
    assert set(seen) == set(range(total))  # write_shards numbers train first
    # Duplicates only from the wrap-around: the `extra` positions past the end re-read the first
    # samples of the epoch's stream once each.
    extra = world * len(loader) * cfg.batch_size - total
    assert 0 < extra < cfg.batch_size * world * max(1, workers)
    counts = Counter(seen)
    assert max(counts.values()) == 2 and sum(c == 2 for c in counts.values()) == extra


@pytest.mark.parametrize("accum_steps", [2, 3, 5])
def test_train_length_is_whole_accumulation_steps_and_still_covers_every_sample(uneven, accum_steps):
    manifest = read_manifest(uneven)
    cfg = _cfg(uneven, num_workers=2)
    seen: set[int] = set()
    for rank in range(2):
        loader = TrainLoader(cfg, manifest, rank, 2, seed=3, accum_steps=accum_steps)
        assert len(loader) % accum_steps == 0 and len(loader) % 2 == 0
        loader.set_epoch(0)
        seen |= {i for batch in _ids(list(loader)) for i in batch}
    assert seen == set(range(manifest.splits["train"].num_samples))


def test_train_fewer_shards_than_ranks_times_workers(tmp_path):
    shards = write_shards(tmp_path, {"train": [5, 9]})
    manifest = read_manifest(shards)
    cfg = _cfg(shards, num_workers=2, batch_size=2)
    seen = []
    for rank in range(3):  # 3 ranks x 2 workers = 6 global workers, 2 shards
        loader = TrainLoader(cfg, manifest, rank, 3, seed=0)
        batches = _ids(loader)
        # ceil(14 / (6 workers x 2)) = 2 batches per worker, 2 workers per rank.
        assert len(batches) == len(loader) == 4
        seen += [i for b in batches for i in b]
    assert set(seen) == set(range(14))


def test_train_labels_match_ids(uneven):
    loader = TrainLoader(_cfg(uneven), read_manifest(uneven), 0, 1, seed=0)
    for _, labels, ids in loader:
        expected = torch.stack([ids % 3, ids % 2 - (ids % 5 == 0).long(), ids % 4], dim=1)
        assert labels.dtype == torch.int64 and labels.shape == (len(ids), 3)
        assert torch.equal(labels, expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_train_epoch_order_deterministic(uneven, workers):
    manifest = read_manifest(uneven)
    cfg = _cfg(uneven, num_workers=workers)

    def run(epoch: int) -> tuple[list[list[int]], torch.Tensor]:
        loader = TrainLoader(cfg, manifest, 1, 2, seed=7)
        loader.set_epoch(epoch)
        batches = list(loader)
        return _ids(batches), torch.cat([images for images, _, _ in batches])

    ids0, images0 = run(0)
    ids0_again, images0_again = run(0)
    ids1, _ = run(1)
    assert ids0 == ids0_again and torch.equal(images0, images0_again)
    assert ids0 != ids1


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("skip", [1, 3, 5])
def test_skip_batches_resumes_exactly(uneven, workers, skip):
    loader = TrainLoader(_cfg(uneven, num_workers=workers, augment="crop_flip"), read_manifest(uneven), 0, 2, seed=5)
    loader.set_epoch(2)
    full = list(loader)
    loader.set_epoch(2, skip_batches=skip)
    resumed = list(loader)
    assert len(full) == len(loader) and len(resumed) == len(loader) - skip
    for (img_a, lab_a, ids_a), (img_b, lab_b, ids_b) in zip(full[skip:], resumed, strict=True):
        assert torch.equal(ids_a, ids_b) and torch.equal(lab_a, lab_b) and torch.equal(img_a, img_b)


def test_skip_batches_out_of_range(uneven):
    loader = TrainLoader(_cfg(uneven), read_manifest(uneven), 0, 1, seed=0)
    with pytest.raises(ValueError):
        loader.set_epoch(0, skip_batches=len(loader) + 1)


def with_shard(manifest, split: str, index: int, **changes):
    """`manifest` with shard `index` of `split` changed (e.g. num_samples=, sha256=)."""
    info = manifest.splits[split]
    shards = list(info.shards)
    shards[index] = dataclasses.replace(shards[index], **changes)
    return dataclasses.replace(manifest, splits={**manifest.splits, split: SplitInfo(info.num_samples, tuple(shards))})


def test_unreadable_image_is_a_counted_placeholder_that_names_the_sample(tmp_path, capfd):
    shards = write_shards(tmp_path, {"train": [2]})
    with tarfile.open(shards / "train-000000.tar", "a") as tar:
        meta = json.dumps({"path": "S/bad.jpg", "id": 2, "style": 0, "artist": 0, "genre": 0}).encode()
        for name, data in (("badbadbadbadbad0.jpg", b"not a jpeg"), ("badbadbadbadbad0.json", meta)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    manifest = with_shard(read_manifest(shards), "train", 0, num_samples=3,
                          sha256=sha256_of(shards / "train-000000.tar"))
    batches = list(make_eval_loader(_cfg(shards), manifest, "train", 0, 1))
    ids = torch.cat([b[2] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert sorted(ids.tolist()) == [BAD_ID, 0, 1]
    assert (labels[ids == BAD_ID] == -1).all() and (labels[ids >= 0] >= -1).all()
    assert "badbadbadbadbad0 is not a readable image" in capfd.readouterr().err


@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_shard_is_reported_in_one_line(tmp_path, workers):
    shards = write_shards(tmp_path, {"train": [4, 4]})
    manifest = with_shard(read_manifest(shards), "train", 1, num_samples=6)  # more than the tar holds
    with pytest.raises(UserError, match="train-000001.tar holds 4 samples, manifest.json says 6") as caught:
        list(TrainLoader(_cfg(shards, batch_size=2, num_workers=workers), manifest, 0, 1, seed=0))
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------- eval stream


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_every_sample_exactly_once(uneven, world, workers):
    manifest = read_manifest(uneven)
    cfg = _cfg(uneven, num_workers=workers, batch_size=4)
    for split, first_id in (("train", 0), ("val", 121)):  # val: 2 shards < ranks x workers
        seen = []
        for rank in range(world):
            loader = make_eval_loader(cfg, manifest, split, rank, world)
            batches = list(loader)
            assert len(batches) == len(loader)
            seen += [i for b in _ids(batches) for i in b]
        count = manifest.splits[split].num_samples
        assert sorted(seen) == list(range(first_id, first_id + count))


def test_eval_images_are_deterministic_center_crops(uneven):
    cfg = _cfg(uneven, num_workers=0, batch_size=5, augment="crop_flip")
    first = next(iter(make_eval_loader(cfg, read_manifest(uneven), "val", 0, 1)))
    again = next(iter(make_eval_loader(cfg, read_manifest(uneven), "val", 0, 1)))
    assert torch.equal(first[0], again[0])
    assert first[0].shape == (5, 3, 16, 16) and first[0].dtype == torch.uint8


# --------------------------------------------------------------------------- reading


def test_tar_reader_gives_webdatasets_samples(uneven, tmp_path):
    from webdataset.tariterators import tarfile_samples

    url = str(uneven / "train-000002.tar")
    ours = list(_tar_samples(url))
    theirs = [{k: v for k, v in s.items() if k != "__local_path__"} for s in tarfile_samples([{"url": url}])]
    assert len(ours) == 60 and ours == theirs
    data = Path(url).read_bytes()
    for cut in (len(data) // 2, 700):  # inside a member's data; inside the second header
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        with pytest.raises(tarfile.ReadError):
            list(_tar_samples(str(tmp_path / "cut.tar")))
    flipped = bytearray(data)
    flipped[10] ^= 0xFF  # a byte of the first member's name: the header checksum no longer matches
    (tmp_path / "flipped.tar").write_bytes(bytes(flipped))
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(_tar_samples(str(tmp_path / "flipped.tar")))


# --------------------------------------------------------------------------- decode + geometry


@pytest.mark.parametrize("augment", ["crop_flip", "rrc", "none"])
def test_decode_shape_dtype_and_randomness(augment):
    cfg = DataConfig(image_size=24, crop_padding=4)
    data = _jpeg(0, 50, 37)
    outs = [decode_image(data, augment, cfg, np.random.default_rng(seed)) for seed in range(6)]
    assert all(o.shape == (24, 24, 3) and o.dtype == np.uint8 for o in outs)
    distinct = len({o.tobytes() for o in outs})
    assert distinct == 1 if augment == "none" else distinct > 1
    assert np.array_equal(outs[0], decode_image(data, augment, cfg, np.random.default_rng(0)))


def test_geometry_none_is_shorter_side_center_square():
    geom = sample_geometry("none", 80, 50, DataConfig(image_size=32), None)
    assert geom == Geometry((15.0, 0.0, 65.0, 50.0), False)


def test_crop_flip_pads_with_zeros():
    cfg = DataConfig(image_size=20, crop_padding=10)
    boxes = [sample_geometry("crop_flip", 20, 20, cfg, np.random.default_rng(s)).box for s in range(50)]
    # Offsets span -padding..+padding in resized pixels (scale 1 here).
    assert min(b[0] for b in boxes) < 0 and max(b[0] for b in boxes) > 0
    assert all(-10 <= b[0] <= 10 and b[2] - b[0] == 20 for b in boxes)
    white = Image.new("RGB", (20, 20), (255, 255, 255))
    out = apply_geometry(white, Geometry((-5.0, 0.0, 15.0, 20.0)), 20)
    assert (out[:, :5] == 0).all() and (out[:, 5:] == 255).all()


def test_rrc_box_inside_image_with_area_in_range():
    cfg = DataConfig(image_size=16, rrc_scale_min=0.35)
    for seed in range(40):
        left, top, right, bottom = sample_geometry("rrc", 60, 40, cfg, np.random.default_rng(seed)).box
        assert 0 <= left < right <= 60 and 0 <= top < bottom <= 40
        assert (right - left) * (bottom - top) >= 0.3 * 60 * 40


@pytest.mark.parametrize("geom", [Geometry((10.0, 5.0, 60.0, 55.0)), Geometry((-8.0, 0.0, 42.0, 50.0), True)])
def test_tensor_geometry_matches_pil(geom):
    # The GPU-decode path's crop/resize runs on CPU tensors too: it must agree with the PIL path.
    y, x = np.mgrid[0:64, 0:80]
    pixels = np.stack([x * 3, y * 4, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    pil = apply_geometry(Image.fromarray(pixels), geom, 25).astype(float)
    tensor = crop_resize_batch([torch.from_numpy(pixels).permute(2, 0, 1)], [geom], 25)[0]
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 25, 25)
    diff = np.abs(tensor.permute(1, 2, 0).numpy().astype(float) - pil)
    assert diff.mean() < 3.0


def _painting(width: int, height: int) -> Image.Image:
    return Image.open(io.BytesIO(_jpeg(3, width, height))).convert("RGB")


@pytest.mark.parametrize("augment", ["crop_flip", "none"])
def test_downscaled_boxes_are_in_whole_pixels(augment):
    # resize_window's fast path needs whole-pixel boxes: crop_flip gives them when it downscales, eval always.
    cfg = DataConfig(image_size=224, crop_padding=16)
    for seed, (w, h) in enumerate([(333, 251), (251, 333), (597, 448), (225, 300), (120, 90)]):
        geom = sample_geometry(augment, w, h, cfg, np.random.default_rng(seed))
        whole = all(float(v).is_integer() for v in geom.box)
        # An upscaled crop_flip box stays on whole output pixels: its padding edge lands exactly.
        assert whole == (augment == "none" or min(w, h) > 224), geom
        assert geom.box[2] - geom.box[0] == pytest.approx(min(w, h)) == geom.box[3] - geom.box[1]


def test_resize_window_is_pils_bilinear_within_one_level():
    im = _painting(333, 251)
    for box, size in [((0, 0, 333, 251), (224, 169)), ((20, 10, 271, 251), (224, 214)), ((5, 0, 105, 100), (150, 150))]:
        ours = resize_window(im, box, size).numpy().astype(int)
        pil = np.asarray(im.crop(box).resize(size, Image.BILINEAR)).astype(int)
        assert ours.shape == pil.shape == (size[1], size[0], 3)
        assert np.abs(ours - pil).max() <= 1
    # A sub-pixel box, which torch cannot place, is PIL's resize exactly.
    box = (10.5, 3.25, 200.5, 193.25)
    assert np.array_equal(resize_window(im, box, (100, 100)).numpy(), np.asarray(im.resize((100, 100), Image.BILINEAR,
                                                                                           box=box)))


def test_apply_geometry_pads_resizes_and_flips_the_whole_box():
    im = _painting(300, 240)
    geom = Geometry((-30.0, 0.0, 210.0, 240.0), flip=True)  # 30 px of zero padding on the left, 240 -> 112 px
    out = apply_geometry(im, geom, 112).astype(int)
    padded = np.zeros((240, 240, 3), np.uint8)
    padded[:, 30:] = np.asarray(im)[:, :210]
    expected = np.asarray(Image.fromarray(padded).resize((112, 112), Image.BILINEAR)).astype(int)[:, ::-1]
    assert out.shape == (112, 112, 3)
    assert np.abs(out - expected).max() <= 1
    assert (out[:, -13:] == 0).all()  # the padding (14 px at 112/240), flipped to the right
    threads = torch.get_num_threads()
    apply_geometry(im, geom, 112)
    assert torch.get_num_threads() == threads  # the one-thread resize gives the threads back


def _shard_jpegs(shards: Path, count: int) -> list[bytes]:
    with tarfile.open(next(iter(sorted(shards.glob("train-*.tar"))))) as tar:
        return [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")][:count]


def _real_jpegs(real_sample: list[Path], count: int) -> list[bytes]:
    # Real WikiArt pictures (the real_sample fixture), shrunk to shard size.
    files = real_sample[:count]
    if not files:
        pytest.skip("no real WikiArt sample beside this checkout")
    out = []
    for f in files:
        img = Image.open(f).convert("RGB")
        img.thumbnail((448 * 3, 448), Image.LANCZOS) if img.height <= img.width else img.thumbnail((448, 448 * 3))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


@pytest.mark.parametrize("augment", ["none", "crop_flip", "rrc"])
def test_full_scale_decodes_through_torchvision_give_pils_crops(demo_shards, real_sample, monkeypatch, augment):
    # decode_image takes jpeg_pixels' tensor wherever no draft applies (most rrc crops of 448 px shard
    # pictures): every crop, padded, flipped or resized, must be the one PIL's decode gives.
    from artdist.data import transforms
    jpegs = _real_jpegs(real_sample, 16) + _shard_jpegs(demo_shards, 8)
    used = []
    real = transforms.tv_decode_jpeg
    monkeypatch.setattr(transforms, "tv_decode_jpeg", lambda *a, **k: used.append(1) or real(*a, **k))
    for size, jpeg_set in ((224, jpegs[:16]), (64, jpegs[16:])):
        cfg = DataConfig(image_size=size, augment=augment, crop_padding=4)
        for k, data in enumerate(jpeg_set):
            ours = decode_image(data, augment, cfg, np.random.default_rng(k))
            with monkeypatch.context() as pil_only:
                pil_only.setattr(transforms, "tv_decode_jpeg", None)
                pil = decode_image(data, augment, cfg, np.random.default_rng(k))
            assert ours.flags.c_contiguous and np.array_equal(ours, pil), (augment, size, k)
    if augment == "rrc":
        assert len(used) >= 16  # the real pictures' crops mostly need the full picture


# Bound on |GPU-path pixels - CPU-path pixels| (0-255), same shards and geometry: the stated contract
# of data.decode=gpu (docs/benchmarks.md). Mean, and the 99th percentile (edges of padded crops differ most).
GPU_DECODE_BOUND = {"mean": 1.5, "p99": 12.0}


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
@pytest.mark.parametrize("source", ["synth", "real"])
@pytest.mark.parametrize("augment", ["none", "crop_flip", "rrc"])
def test_batched_gpu_decode_maths_matches_cpu_path(demo_shards, real_sample, source, augment):
    """data.decode=gpu's half that is not nvJPEG (batched crop/resize/flip) against decode_image on CPU."""
    import torchvision
    jpegs = _shard_jpegs(demo_shards, 12) if source == "synth" else _real_jpegs(real_sample, 12)
    cfg = DataConfig(image_size=64 if source == "synth" else 224, augment=augment, crop_padding=4)
    tensors = [torchvision.io.decode_jpeg(torch.frombuffer(bytearray(j), dtype=torch.uint8),
                                          mode=torchvision.io.ImageReadMode.RGB) for j in jpegs]
    geoms = [sample_geometry(augment, t.shape[-1], t.shape[-2], cfg, np.random.default_rng(k))
             for k, t in enumerate(tensors)]
    batch = crop_resize_batch(tensors, geoms, cfg.image_size)
    cpu = np.stack([decode_image(j, augment, cfg, np.random.default_rng(k)) for k, j in enumerate(jpegs)])
    diff = np.abs(batch.permute(0, 2, 3, 1).numpy().astype(float) - cpu)
    print(f"{source} {augment}: mean {diff.mean():.2f} p99 {np.percentile(diff, 99):.1f} max {diff.max():.0f}")
    assert diff.mean() < GPU_DECODE_BOUND["mean"]
    assert np.percentile(diff, 99) < GPU_DECODE_BOUND["p99"]
    flipped = [k for k, g in enumerate(geoms) if g.flip]
    if flipped:  # the flip is applied (a mirrored comparison would be far off)
        k = flipped[0]
        assert diff[k].mean() < (np.abs(batch[k].flip(-1).permute(1, 2, 0).numpy().astype(float) - cpu[k])).mean()


# --------------------------------------------------------------------------- device transform


@pytest.mark.parametrize("channels_last", [False, True])
def test_device_transform_normalizes(channels_last):
    images = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    out = DeviceTransform(DataConfig(), "cpu", train=True, channels_last=channels_last)(images)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    assert torch.allclose(out, (images.float() / 255 - mean) / std, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # White on the red channel: (1 - 0.485) / 0.229.
    white = DeviceTransform(DataConfig(), "cpu", False, False)(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8))
    assert white[0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)


# --------------------------------------------------------------------------- end to end on shard.py output


def test_demo_shards_end_to_end(demo_shards):
    manifest = read_manifest(demo_shards)
    classes = manifest.num_classes
    cfg = _cfg(demo_shards, image_size=32, batch_size=16, num_workers=2, augment="rrc")
    transform = DeviceTransform(cfg, "cpu", train=True, channels_last=True)
    train_ids: set[int] = set()
    for rank in range(2):
        loader = TrainLoader(cfg, manifest, rank, 2, seed=0)
        loader.set_epoch(1)
        batches = list(loader)
        assert len(batches) == len(loader) > 0
        for images, labels, ids in batches:
            assert images.shape == (16, 3, 32, 32) and images.dtype == torch.uint8
            assert labels.shape == (16, 3) and ids.shape == (16,)
            for column, task in enumerate(TASKS):
                assert ((labels[:, column] >= -1) & (labels[:, column] < classes[task])).all()
            x = transform(images)
            assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
            train_ids.update(ids.tolist())
    assert len(train_ids) == manifest.splits["train"].num_samples

    val_ids = [i for rank in range(3) for _, _, ids in make_eval_loader(cfg, manifest, "val", rank, 3)
               for i in ids.tolist()]
    assert len(val_ids) == len(set(val_ids)) == manifest.splits["val"].num_samples
    assert not train_ids & set(val_ids)


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29 points to TorchCodec
def test_gpu_decode_stream_and_decode_path_on_cpu(uneven):
    # The loader side of data.decode=gpu runs anywhere; DeviceTransform._decode is the GPU code
    # path and torchvision's decode_jpeg also takes the list on CPU, so both are exercised here.
    manifest = read_manifest(uneven)
    images, _, ids = next(iter(make_eval_loader(_cfg(uneven, decode="gpu"), manifest, "val", 0, 1)))
    assert isinstance(images, list) and len(images) == len(ids) == 5
    assert all(t.dtype == torch.uint8 and t.ndim == 1 and t[:2].tolist() == [0xFF, 0xD8] for t in images)
    decoded = DeviceTransform(_cfg(uneven), "cpu", train=False, channels_last=False)._decode(images)
    assert decoded.shape == (5, 3, 16, 16) and decoded.dtype == torch.uint8
    cpu_images, _, cpu_ids = next(iter(make_eval_loader(_cfg(uneven), manifest, "val", 0, 1)))
    assert torch.equal(ids, cpu_ids)
    assert (decoded.float() - cpu_images.float()).abs().mean() < 6
