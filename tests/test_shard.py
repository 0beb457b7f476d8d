"""artdist shard: broken and odd files, shard format, determinism, resume, real label files."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import webdataset as wds
from PIL import Image, JpegImagePlugin

from artdist.data.catalog import assign_splits, load_catalog
from artdist.data.manifest import read_manifest
from artdist.cli import main
from artdist.config import TASKS, DataConfig, ShardConfig, SynthConfig
from artdist.config import JobConfig
from artdist.data import image, transforms
from artdist.data.image import (BadImage, encode_image, eval_pixels, prepare_image, shard_member, shard_options,
                                to_rgb, upright)
from artdist.data.shard import sample_key, shard_dataset, shard_ranges, worker_count
from artdist.data.tarwriter import TarWriter
from artdist.data.transforms import decode_image
from artdist.data.synth import make_corpus
from artdist.errors import UserError

MAX_PIXELS = 25_000_000
SHORT_SIDE = 48
HUGE = (6000, 4000)  # 24 MP: below MAX_PIXELS, must be decoded in JPEG draft mode
OVER = (5200, 5000)  # 26 MP: above MAX_PIXELS


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _odd_files() -> dict[str, bytes | None]:
    """What replaces a corpus image: None deletes it. Names are the cases."""
    rgba = Image.new("RGBA", (64, 64), (0, 0, 255, 255))
    rgba.paste((0, 0, 255, 0), (32, 0, 64, 64))  # right half transparent
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 0, 0, 250, 20, 20] + [0] * 762)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    return {
        "missing": None,
        "empty": b"",
        "text": b"this is not a picture\n",
        "grey": _jpeg(Image.new("L", (64, 64), 100)),
        "cmyk": _jpeg(Image.new("CMYK", (64, 64), (0, 255, 255, 0))),
        "palette": _png(palette),
        "rgba": _png(rgba),
        "sixteen_bit": _png(Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16))),
        "rotated": _jpeg(Image.new("RGB", (64, 32), (200, 30, 30)), exif=exif.tobytes(), comment=b"by me"),
        "huge": _jpeg(Image.new("RGB", HUGE, (10, 200, 30)), quality=80),
        "over": _jpeg(Image.new("RGB", OVER, (10, 10, 200)), quality=80),
        "truncated": None,  # filled in from a real corpus picture
    }


@pytest.fixture(scope="module")
def odd_corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A 60-image synthetic corpus in which some pictures are replaced by broken or odd files."""
    root = tmp_path_factory.mktemp("odd")
    make_corpus(SynthConfig(out=str(root), images=60, seed=1, noise=0.0, size=64))
    records = load_catalog(root / "labels").records
    cases = {}
    for record, (case, data) in zip(records[::5], _odd_files().items()):
        path = root / "images" / record.path
        if case == "truncated":
            data = path.read_bytes()[: path.stat().st_size // 2]
        if data is None:
            path.unlink()
        else:
            path.write_bytes(data)
        cases[case] = record.path
    return root, cases


def _config(root: Path, out: Path, **kw) -> ShardConfig:
    opts = dict(images=str(root / "images"), labels=str(root / "labels"), out=str(out),
                max_short_side=SHORT_SIDE, samples_per_shard=10, workers=1, max_pixels=MAX_PIXELS)
    return ShardConfig(**{**opts, **kw})


@pytest.fixture(scope="module")
def odd_shards(odd_corpus, tmp_path_factory) -> tuple[Path, dict]:
    root, _ = odd_corpus
    out = tmp_path_factory.mktemp("odd_shards")
    return out, shard_dataset(_config(root, out), progress=False)


def _read_back(out: Path, manifest: dict) -> dict[str, dict]:
    """path -> {"meta", "image", "key", "shard"} of every sample, read with WebDataset."""
    samples = {}
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            for s in wds.WebDataset(str(out / shard["name"]), shardshuffle=False, empty_check=False):
                meta = json.loads(s["json"])
                assert meta["path"] not in samples, f"{meta['path']} in two shards"
                image = Image.open(io.BytesIO(s[manifest["image_ext"]]))
                samples[meta["path"]] = {"meta": meta, "image": image, "key": s["__key__"], "shard": shard["name"]}
    return samples


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_every_good_image_lands_once_with_its_labels(odd_corpus, odd_shards):
    root, cases = odd_corpus
    out, manifest = odd_shards
    catalog = load_catalog(root / "labels")
    splits = assign_splits(catalog, "artgan")
    bad = {cases[c] for c in ("missing", "empty", "text", "truncated", "over")}
    samples = _read_back(out, manifest)
    assert sorted(samples) == sorted(r.path for r in catalog.records if r.path not in bad)
    for record, split in zip(catalog.records, splits):
        if record.path in bad:
            continue
        s = samples[record.path]
        assert s["meta"] == {"path": record.path, "id": record.id, "painting_id": record.painting_id,
                             **dict(zip(TASKS, record.labels)), "split": split,
                             "sha256": hashlib.sha256((root / "images" / record.path).read_bytes()).hexdigest(),
                             "phash": manifest["duplicates"]["hashes"][record.path][1]}
        assert len(s["meta"]["phash"]) == 64  # 256 bits
        assert s["shard"].startswith(f"{split}-")
        assert s["key"] == sample_key(record.path) and "." not in s["key"]
        assert s["image"].format == "JPEG" and s["image"].mode == "RGB"
        assert min(s["image"].size) <= SHORT_SIDE


def test_bad_files_are_reported_with_their_reason(odd_corpus, odd_shards):
    _, cases = odd_corpus
    _, manifest = odd_shards
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert reasons == {
        cases["missing"]: "missing",
        cases["empty"]: "empty",
        cases["text"]: "not an image",
        cases["truncated"]: "truncated",
        cases["over"]: "too large",
    }
    assert [s["path"] for s in manifest["skipped"]] == sorted(reasons)


def test_odd_modes_become_rgb(odd_corpus, odd_shards):
    _, cases = odd_corpus
    out, manifest = odd_shards
    samples = _read_back(out, manifest)

    def pixels(case: str) -> np.ndarray:
        return np.asarray(samples[cases[case]]["image"], dtype=np.int16)

    assert np.abs(pixels("grey") - 100).max() <= 3
    assert np.abs(pixels("cmyk")[SHORT_SIDE // 2, SHORT_SIDE // 2] - (255, 0, 0)).max() <= 10
    assert np.abs(pixels("palette")[10, 10] - (250, 20, 20)).max() <= 10
    rgba = pixels("rgba")  # left half opaque blue, right half transparent -> white
    assert np.abs(rgba[24, 4] - (0, 0, 255)).max() <= 10 and np.abs(rgba[24, -4] - 255).max() <= 3
    assert np.abs(pixels("sixteen_bit") - round(40000 / 257)).max() <= 3  # scaled, not clipped to 255
    rotated = samples[cases["rotated"]]["image"]
    assert rotated.size == (32, 64)  # EXIF orientation applied
    assert not {"exif", "comment"} & set(rotated.info)  # and no source metadata carried over
    assert samples[cases["huge"]]["image"].size == (72, SHORT_SIDE)


def test_huge_jpeg_is_decoded_in_draft_mode(odd_corpus, monkeypatch):
    root, cases = odd_corpus
    decoded = []
    load = JpegImagePlugin.JpegImageFile.load

    def spy(self):
        decoded.append(self.size)  # the size libjpeg decodes at, after the draft
        return load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    im = prepare_image(root / "images" / cases["huge"], SHORT_SIDE, MAX_PIXELS)
    assert decoded[0] == (HUGE[0] // 8, HUGE[1] // 8)  # DCT scaling at 1/8, never the full 24 MP
    assert im.shape == (SHORT_SIDE, 72, 3) and im.dtype == torch.uint8


@pytest.mark.parametrize("case", ["grey", "cmyk", "palette", "rgba", "sixteen_bit", "rotated", "huge"])
def test_predict_and_the_eval_loader_see_the_same_pixels(odd_corpus, odd_shards, case):
    """One preparation: a file through `eval_pixels` (what predict runs) equals, bit for bit, its
    shard member decoded by the eval loader's decode_image."""
    root, cases = odd_corpus
    out, manifest = odd_shards
    data_cfg = DataConfig(image_size=32)
    with tarfile.open(out / _read_back(out, manifest)[cases[case]]["shard"]) as tar:
        data = tar.extractfile(f"{sample_key(cases[case])}.jpg").read()
    loader = decode_image(data, "none", data_cfg, None)
    shard = ShardConfig(**{k: v for k, v in manifest["options"].items() if k in ShardConfig.__dataclass_fields__})
    assert np.array_equal(eval_pixels(root / "images" / cases[case], shard, data_cfg), loader)


@pytest.mark.parametrize("size", [(900, 700), (700, 1300), (640, 480), (4000, 3000)])
def test_bilinear_resample_is_pils_bilinear_up_to_rounding(size):
    # shard.resample=bilinear runs in torch; it must be PIL's filter, the right way round, at the right size.
    grid = np.random.default_rng(1).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    im = Image.fromarray(grid).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "PNG")  # no JPEG draft: the whole resize is the filter's
    ours = prepare_image(buf.getvalue(), 448, MAX_PIXELS, "bilinear")
    w, h = size
    expected = (448, round(h * 448 / w)) if w <= h else (round(w * 448 / h), 448)
    assert ours.shape == (expected[1], expected[0], 3) and ours.dtype == torch.uint8
    pil = im.resize(expected, Image.BILINEAR, reducing_gap=3.0)  # 4000x3000: reduced by 2 first, as PIL does
    diff = np.abs(np.asarray(ours).astype(int) - np.asarray(pil))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01  # the kernels' weights are rounded differently




def test_the_torch_jpeg_decoder_gives_the_pixels_pils_gives(real_sample, monkeypatch):
    # prepare_image decodes a plain full-scale JPEG with torchvision's libjpeg-turbo (transforms.jpeg_pixels):
    # every prepared picture must be the one PIL alone makes, resized or not, in every filter.
    noisy = Image.fromarray(np.random.default_rng(4).integers(0, 256, (517, 333, 3), dtype=np.uint8))
    sources = [_jpeg(noisy, quality=q, **kw) for q, kw in ((75, {}), (95, {"subsampling": 0}), (85, {"subsampling": 1}),
                                                           (80, {"progressive": True}))]
    sources += [_jpeg(_smooth((1000, 640)), quality=90), _jpeg(_smooth((120, 90), "L"), quality=75)]
    sources += [_jpeg(_smooth((300, 200)), exif=_oriented_exif(6))] + [f.read_bytes() for f in real_sample[:12]]
    used = []
    monkeypatch.setattr(transforms, "tv_decode_jpeg", _recording(transforms.tv_decode_jpeg, used))
    for source in sources:
        for side, resample in ((448, "bilinear"), (150, "bilinear"), (150, "hamming")):
            ours = prepare_image(source, side, MAX_PIXELS, resample)
            with monkeypatch.context() as pil_only:
                pil_only.setattr(transforms, "tv_decode_jpeg", None)
                pil = prepare_image(source, side, MAX_PIXELS, resample)
            assert ours.shape == pil.shape and np.array_equal(np.asarray(ours), np.asarray(pil)), (len(source), side)
    assert len(used) >= 3 * 5  # the four noisy ones and the smooth one each time; grey and turned ones by PIL
    with monkeypatch.context() as odd_layout:  # a chroma layout the agreement check did not cover: PIL's
        odd_layout.setattr(JpegImagePlugin, "get_sampling", lambda im: -1)
        before = len(used)
        prepare_image(sources[0], 448, MAX_PIXELS)
        assert len(used) == before
    # A file the torch decoder cannot read still gets PIL's verdict.
    with pytest.raises(BadImage, match="truncated"):
        prepare_image(sources[0][: len(sources[0]) // 2], 448, MAX_PIXELS)
    assert transforms.jpeg_pixels(sources[0][:100]) is None
    # A torchvision whose libjpeg decodes otherwise (here: one that flips) is not used at all.
    transforms._decoders_agree.cache_clear()
    try:
        monkeypatch.setattr(transforms, "tv_decode_jpeg", lambda data, mode: torchvision.io.decode_jpeg(data, mode=mode).flip(1))
        assert transforms.jpeg_pixels(sources[0]) is None
        assert np.array_equal(np.asarray(prepare_image(sources[0], 448, MAX_PIXELS)),
                              np.asarray(Image.open(io.BytesIO(sources[0]))))
    finally:
        transforms._decoders_agree.cache_clear()


def test_the_torch_jpeg_encoder_writes_the_bytes_pils_writes(real_sample, monkeypatch):
    # encode_image hands prepared pixels to torchvision's libjpeg-turbo: its bytes must be PIL's, or a
    # shard would depend on which encoder wrote it. Prepared pixels are HWC memory; a CHW-memory view
    # is checked too.
    noisy = torch.from_numpy(np.random.default_rng(4).integers(0, 256, (333, 517, 3), dtype=np.uint8))
    pictures = [noisy, noisy.permute(2, 0, 1).contiguous().permute(1, 2, 0), torch.zeros((1, 1, 3), dtype=torch.uint8)]
    pictures += [prepare_image(source, side, MAX_PIXELS) for source in (f.read_bytes() for f in real_sample[:8]) for side in (448, 150)]
    assert any(not p.is_contiguous() for p in pictures) and image._encoders_agree()
    used = []
    monkeypatch.setattr(image, "tv_encode_jpeg", _recording(image.tv_encode_jpeg, used))
    for pixels in pictures:
        for quality in (60, 85, 95):
            pil = Image.fromarray(np.ascontiguousarray(pixels.numpy()))
            assert encode_image(pixels, "jpeg", quality) == encode_image(pil, "jpeg", quality), (pixels.shape, quality)
    assert len(used) == 3 * len(pictures)
    # A torchvision whose encoder writes other bytes (here: one a quality step off) is not used at all.
    image._encoders_agree.cache_clear()
    try:
        monkeypatch.setattr(image, "tv_encode_jpeg",
                            lambda chw, quality: torchvision.io.encode_jpeg(chw, quality=max(quality - 1, 1)))
        pil = Image.fromarray(noisy.numpy())
        assert encode_image(noisy, "jpeg", 85) == encode_image(pil, "jpeg", 85)
        assert not image._encoders_agree()
    finally:
        image._encoders_agree.cache_clear()


def _recording(decode, calls: list):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return decode(*args, **kwargs)
    return wrapper


def _oriented_exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _smooth(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    grid = np.random.default_rng(2).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize(size, Image.BICUBIC).convert(mode)


def test_a_jpeg_that_needs_no_change_is_stored_as_it_is():
    plain = _jpeg(_smooth((120, 90)), quality=75)  # Pillow's defaults: baseline, 4:2:0, JFIF only
    im = prepare_image(plain, 448, MAX_PIXELS)
    data, own = shard_member(plain, im, "jpeg", 85, True)
    assert own and data == plain
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(im))  # what was hashed
    icc = b"\0" * 128  # any profile: its bytes would ride along
    reencoded = {
        "finer than shard.quality": _jpeg(_smooth((120, 90)), quality=95),
        "progressive": _jpeg(_smooth((120, 90)), quality=75, progressive=True),
        "4:4:4": _jpeg(_smooth((120, 90)), quality=75, subsampling=0),
        "exif": _jpeg(_smooth((120, 90)), quality=75, exif=Image.Exif().tobytes()),
        "comment": _jpeg(_smooth((120, 90)), quality=75, comment=b"scanned by me"),
        "icc": _jpeg(_smooth((120, 90)), quality=75, icc_profile=icc),
        "grey": _jpeg(_smooth((120, 90), "L"), quality=75),
    }
    for why, source in reencoded.items():
        data, own = shard_member(source, prepare_image(source, 448, MAX_PIXELS), "jpeg", 85, True)
        assert not own and data != source, why
        assert Image.open(io.BytesIO(data)).info.keys() <= {"jfif", "jfif_version", "jfif_unit", "jfif_density"}, why
    resized = prepare_image(plain, 64, MAX_PIXELS)
    assert shard_member(plain, resized, "jpeg", 85, True) == (shard_member(plain, resized, "jpeg", 85, False)[0], False)
    assert not shard_member(plain, im, "jpeg", 85, False)[1] and not shard_member(plain, im, "webp", 85, True)[1]
    # Predict's preparation follows the same rule: the same pixels as the stored bytes give the loader.
    data_cfg = DataConfig(image_size=32)
    assert np.array_equal(eval_pixels(plain, ShardConfig(), data_cfg), decode_image(plain, "none", data_cfg, None))


def test_shard_counts_and_keeps_the_jpegs_stored_as_they_are(tmp_path, capsys):
    root = tmp_path / "corpus"
    make_corpus(SynthConfig(out=str(root), images=24, seed=3, noise=0.0, size=64))
    files = sorted((root / "images").rglob("*.jpg"))
    for path in files[:10]:  # q90 from synth (re-encoded at q85); these ten at q75 (kept)
        path.write_bytes(_jpeg(Image.open(path).convert("RGB"), quality=75))
    out = tmp_path / "shards"
    manifest = shard_dataset(_config(root, out, max_short_side=448))  # 64 px pictures: no resize
    assert "(10 JPEGs stored as they are: shard.passthrough)" in capsys.readouterr().err
    samples = _read_back(out, manifest)
    for path in files:
        rel = str(path.relative_to(root / "images"))
        with tarfile.open(out / samples[rel]["shard"]) as tar:
            member = tar.extractfile(f"{samples[rel]['key']}.jpg").read()
        assert (member == path.read_bytes()) == (path in files[:10]), rel
    assert manifest["options"]["passthrough"] is True
    assert manifest["stored_as_is"] == sorted(str(p.relative_to(root / "images")) for p in files[:10])


def test_upright_rgb_pictures_are_not_copied():
    im = Image.new("RGB", (8, 6), (1, 2, 3))
    assert to_rgb(im) is im and upright(im) is im
    assert to_rgb(Image.new("L", (8, 6))) is not im


def test_predict_takes_the_shard_options_from_the_runs_manifest(odd_shards, tmp_path):
    out, manifest = odd_shards
    cfg = JobConfig()
    cfg.data.shards = str(out)
    assert (shard_options(cfg).max_short_side, shard_options(cfg).resample) == (SHORT_SIDE, "bilinear")
    old = {**manifest, "options": {k: v for k, v in manifest["options"].items() if k != "resample"}}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    cfg.data.shards = str(tmp_path)
    assert shard_options(cfg).resample == "lanczos"  # written before shard.resample existed
    cfg.data.shards = str(tmp_path / "elsewhere")
    assert shard_options(cfg) == cfg.shard  # no shards here: the run config's own shard section


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def test_eval_pixels_of_odd_modes():
    shard, data_cfg = ShardConfig(max_short_side=64), DataConfig(image_size=32)
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))  # a 16-bit PNG, mean 32767.5
    assert eval_pixels(_png_bytes(Image.fromarray(ramp)), shard, data_cfg).mean() == pytest.approx(127.5, abs=1.5)
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # fully transparent: white, not black
    assert eval_pixels(_png_bytes(rgba), shard, data_cfg).min() >= 250
    tall = Image.new("RGB", (32, 64), (200, 30, 30))
    tall.paste((30, 30, 200), (0, 32, 32, 64))  # red top, blue bottom
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned a quarter: rotate 90° counter-clockwise on display
    stored = tall.transpose(Image.Transpose.ROTATE_270)
    pixels = eval_pixels(_jpeg(stored, exif=exif.tobytes(), quality=95), shard, data_cfg).astype(int)
    assert np.abs(pixels[2, 16] - (200, 30, 30)).max() <= 12 and np.abs(pixels[-3, 16] - (30, 30, 200)).max() <= 12
    with pytest.raises(BadImage, match="not an image"):
        eval_pixels(b"no picture", shard, data_cfg)


def test_manifest_matches_the_files(odd_corpus, odd_shards):
    root, _ = odd_corpus
    out, manifest = odd_shards
    catalog = load_catalog(root / "labels")
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert read_manifest(out).to_json() == manifest  # the typed reader keeps every key
    assert manifest["format"] == "artdist-shards/1" and manifest["image_ext"] == "jpg"
    assert manifest["classes"] == catalog.classes
    assert manifest["anomalies"] == catalog.anomalies
    assert manifest["options"]["max_short_side"] == SHORT_SIDE and "out" not in manifest["options"]
    for task in TASKS:
        assert (out / f"class_names_{task}.txt").read_text().splitlines() == catalog.classes[task]
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert tars == sorted(s["name"] for info in manifest["splits"].values() for s in info["shards"])
    for split, info in manifest["splits"].items():
        assert info["num_samples"] == sum(s["num_samples"] for s in info["shards"])
        assert len(info["shards"]) >= min(8, info["num_samples"])
        for shard in info["shards"]:
            assert hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
            with tarfile.open(out / shard["name"]) as tar:
                members = tar.getmembers()
            assert len(members) == 2 * shard["num_samples"]
            assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "", 0o644)}
            assert all(m.name.count(".") == 1 for m in members)



def test_shards_mix_the_style_folders(demo_shards):
    # Ids follow the sorted paths (= style folders); written in that order, a 40-sample shard of this
    # 6-style corpus would hold one or two styles.
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        metas = [json.loads(member) for member in _json_members(demo_shards / shard["name"])]
        assert len({m["style"] for m in metas}) >= 4, shard["name"]
        assert [m["id"] for m in metas] != sorted(m["id"] for m in metas)


def _json_members(path: Path) -> list[bytes]:
    with tarfile.open(path) as tar:
        return [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".json")]


def test_shard_sizes_are_even():
    assert shard_ranges(10, 4, 8) == [(0, 1), (1, 2), (2, 3), (3, 5), (5, 6), (6, 7), (7, 8), (8, 10)]
    assert shard_ranges(100, 30, 2) == [(0, 25), (25, 50), (50, 75), (75, 100)]
    assert shard_ranges(3, 100, 8) == [(0, 1), (1, 2), (2, 3)]
    assert shard_ranges(0, 100, 8) == []


def _tarfile_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """What tarfile writes for `members` with the shards' fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("count", [0, 1, 7])
def test_tar_writer_writes_tarfiles_bytes(tmp_path, count):
    rng = np.random.default_rng(count)
    sizes = [0, 1, 511, 512, 513, 10_240, int(rng.integers(0, 70_000))]
    names = ["a.jpg", f"{'0f' * 8}.json", "x" * 99, "d" * 60 + "/" + "e" * 60 + ".jpg", "é.json"]  # the 4th splits
    members = [(names[i % len(names)], rng.integers(0, 256, sizes[i % len(sizes)], dtype=np.uint8).tobytes())
               for i in range(count)]
    with TarWriter(tmp_path / "t.tar") as tar:
        for name, data in members:
            tar.add(name, data)
    written = (tmp_path / "t.tar").read_bytes()
    assert written == _tarfile_bytes(members)
    assert tar.sha256 == hashlib.sha256(written).hexdigest() and tar.size == len(written)
    with tarfile.open(tmp_path / "t.tar") as back:
        assert [(m.name, back.extractfile(m).read()) for m in back] == members


def test_rerun_into_a_new_folder_is_byte_identical(odd_corpus, odd_shards, tmp_path):
    root, _ = odd_corpus
    out, _ = odd_shards
    shard_dataset(_config(root, tmp_path / "again"), progress=False)
    assert _files(tmp_path / "again") == _files(out)


def test_worker_pool_writes_the_same_shards(odd_corpus, odd_shards, tmp_path):
    root, _ = odd_corpus
    out, manifest = odd_shards
    pooled = shard_dataset(_config(root, tmp_path / "pool", workers=2), progress=False)
    assert pooled["splits"] == manifest["splits"] and pooled["skipped"] == manifest["skipped"]
    tars = {k: v for k, v in _files(out).items() if k.endswith(".tar")}
    assert {k: v for k, v in _files(tmp_path / "pool").items() if k.endswith(".tar")} == tars


def test_auto_workers_start_one_process_per_thousand_images():
    assert worker_count(0, 214, 24, 16) == 1  # a small folder: no pool, whose workers would import torch first
    assert worker_count(0, 1_260, 24, 16) == 1  # the demo
    assert worker_count(0, 2_140, 24, 16) == 2
    assert worker_count(0, 81_446, 100, 16) == 16  # WikiArt: every core
    assert worker_count(0, 81_446, 8, 16) == 8  # never more processes than shards
    assert worker_count(4, 214, 24, 16) == 4  # an explicit count is kept
    assert worker_count(0, 0, 0, 16) == 0


def test_interrupted_run_redoes_only_the_lost_shard(odd_corpus, odd_shards, tmp_path):
    root, _ = odd_corpus
    src, manifest = odd_shards
    out = tmp_path / "resume"
    shutil.copytree(src, out)
    lost = manifest["splits"]["train"]["shards"][1]["name"]
    (out / lost).unlink()
    (out / ".done" / f"{lost}.json").unlink()
    (out / "manifest.json").unlink()  # the manifest is written last: an interrupted run has none
    (out / "val-000000.tar.tmp").write_bytes(b"half a shard")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    shard_dataset(_config(root, out), progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert {name for name in after if after[name] != before.get(name)} == {lost}
    assert _files(out) == _files(src)


def test_changed_options_redo_every_shard(odd_corpus, odd_shards, tmp_path):
    root, _ = odd_corpus
    src, manifest = odd_shards
    out = tmp_path / "requality"
    shutil.copytree(src, out)
    changed = shard_dataset(_config(root, out, quality=50), progress=False)
    old = {s["name"]: s["sha256"] for info in manifest["splits"].values() for s in info["shards"]}
    new = {s["name"]: s["sha256"] for info in changed["splits"].values() for s in info["shards"]}
    assert old.keys() == new.keys() and all(old[k] != new[k] for k in old)


def test_fewer_shards_remove_the_stale_ones(odd_corpus, odd_shards, tmp_path):
    root, _ = odd_corpus
    src, _ = odd_shards
    out = tmp_path / "fewer"
    shutil.copytree(src, out)
    manifest = shard_dataset(_config(root, out, samples_per_shard=1000, min_shards=1), progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-000000.tar", "train-000000.tar", "val-000000.tar"]
    assert sorted(p.name for p in (out / ".done").iterdir()) == [f"{n}.json" for n in
                                                                  sorted(p.name for p in out.glob("*.tar"))]
    assert manifest["splits"]["train"]["shards"][0]["name"] == "train-000000.tar"


@pytest.mark.parametrize("fmt, ext", [("webp", "webp"), ("png", "png")])
def test_other_formats(tmp_path, fmt, ext):
    make_corpus(SynthConfig(out=str(tmp_path / "c"), images=30, seed=2, size=48))
    cfg = ShardConfig(images=str(tmp_path / "c" / "images"), labels=str(tmp_path / "c" / "labels"),
                      out=str(tmp_path / "a"), max_short_side=32, format=fmt, min_shards=2, workers=1)
    manifest = shard_dataset(cfg, progress=False)
    again = shard_dataset(dataclasses.replace(cfg, out=str(tmp_path / "b")), progress=False)
    assert manifest == again and _files(tmp_path / "a") == _files(tmp_path / "b")
    samples = _read_back(tmp_path / "a", manifest)
    assert manifest["image_ext"] == ext and len(samples) == 30
    assert {s["image"].format for s in samples.values()} == {fmt.upper()}
    assert {s["image"].size for s in samples.values()} == {(32, 32)}


def test_demo_shards_fixture(demo_shards, synth_corpus):
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    assert sum(info["num_samples"] for info in manifest["splits"].values()) == 400
    assert all(len(info["shards"]) == 8 for info in manifest["splits"].values())
    assert manifest["skipped"] == []


def test_no_image_found_is_a_user_error(synth_corpus, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = ShardConfig(images=str(tmp_path / "empty"), labels=str(synth_corpus / "labels"), out=str(tmp_path / "o"))
    first = load_catalog(synth_corpus / "labels").records[0].path
    with pytest.raises(UserError, match="looks wrong") as err:
        shard_dataset(cfg, progress=False)
    assert str(tmp_path / "empty" / first) in str(err.value)
    with pytest.raises(UserError, match="is not a folder"):
        shard_dataset(ShardConfig(images=str(tmp_path / "nope"), labels=str(synth_corpus / "labels")), progress=False)


def _raw_rows(labels: Path) -> dict[str, dict[str, list[int]]]:
    """task -> path -> labels of its rows, read naively from the six real train/val files."""
    files = {"style": ("style_train.csv", "style_val.csv"), "artist": ("artist_train", "artist_val"),
             "genre": ("genre_train.csv", "genre_val.csv")}
    rows: dict[str, dict[str, list[int]]] = {}
    for task, names in files.items():
        rows[task] = {}
        for name in names:
            for line in (labels / name).read_text(encoding="utf-8").splitlines():
                head, _, index = line.strip().rpartition(",")
                if head and index.isdigit():
                    rows[task].setdefault(head.rstrip(","), []).append(int(index))
    return rows


def test_real_labels_over_a_few_images(real_labels, tmp_path):
    rows = _raw_rows(real_labels)
    every = sorted(set().union(*rows.values()))
    unique = [p for p in every if all(len(rows[t].get(p, [])) <= 1 for t in TASKS)]
    chosen = unique[:: len(unique) // 5][:5] + [next(p for p in unique if not p.isascii())]
    for i, path in enumerate(chosen):
        (tmp_path / "images" / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (80, 60), (40 * i, 100, 200)).save(tmp_path / "images" / path, "JPEG")
    start = time.process_time()
    manifest = shard_dataset(ShardConfig(images=str(tmp_path / "images"), labels=str(real_labels),
                                         out=str(tmp_path / "out"), max_short_side=SHORT_SIDE, workers=1),
                             progress=False)
    assert time.process_time() - start < 30  # no per-file work for the 81k missing ones
    samples = _read_back(tmp_path / "out", manifest)
    assert sorted(samples) == sorted(chosen)
    for path in chosen:
        assert [samples[path]["meta"][t] for t in TASKS] == [rows[t].get(path, [-1])[0] for t in TASKS]
    assert sorted(s["path"] for s in manifest["skipped"]) == sorted(set(every) - set(chosen))
    assert {s["reason"] for s in manifest["skipped"]} == {"missing"}
    assert manifest["anomalies"]["cross_task_split"]["count"] > 0


def test_cli_flags_and_help(odd_corpus, tmp_path, capsys):
    root, _ = odd_corpus
    assert main(["shard", "--images", str(root / "images"), "--labels", str(root / "labels"),
                 "--out", str(tmp_path), "--max-short-side", "32", "--samples-per-shard", "100",
                 "--workers", "1", "--set", "shard.min_shards=2", "--set", f"shard.max_pixels={MAX_PIXELS}"]) == 0
    err = capsys.readouterr().err
    assert "label-file anomalies" in err and "shards" in err and "skipped 5: empty 1, missing 1" in err
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [len(manifest["splits"][s]["shards"]) for s in ("train", "val")] == [2, 2]
    assert manifest["options"]["max_short_side"] == 32
    with pytest.raises(SystemExit):
        main(["shard", "--help"])
    # --help points at the shard-count advice, which lives in the design notes
    assert 'How many shards to aim for: docs/design.md "Shard format"' in " ".join(capsys.readouterr().out.split())
    design = " ".join((Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text().split())
    assert "Training works with any number of shards" in design
    assert main(["shard", "--images", str(root / "images"), "--labels", str(root / "labels"),
                 "--out", str(tmp_path), "--quality", "0"]) == 2
    assert "shard.quality must be 1..100" in capsys.readouterr().err
