"""One image preparation for every entry point: a file -> the upright RGB picture, at most max_short_side."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import math
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from artdist.config import DataConfig, JobConfig, ShardConfig
from artdist.data.manifest import read_manifest
from artdist.data.transforms import (EXIF_ORIENTATION, as_pil, as_pixels, decode_image, jpeg_pixels, picture_size,
                                     plain_jpeg, resize_pixels, resize_window)
from artdist.errors import UserError

try:  # deprecated in torchvision 0.29 for TorchCodec; without it PIL encodes everything
    from torchvision.io import encode_jpeg as tv_encode_jpeg
except ImportError:  # pragma: no cover
    tv_encode_jpeg = None

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Antialiased filters for the downscale left after the JPEG draft (choices of shard.resample). bilinear
# runs through torch's vectorised kernel (transforms.resize_window): PIL's filter but for a level on a few
# pixels in a thousand, and faster; its bytes differ between x86 CPUs with AVX2 and others, PIL's
# filters' do not (docs/benchmarks.md).
RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "hamming": Image.Resampling.HAMMING,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}
# Non-JPEG files (no DCT draft) are first reduced by whole factors while 3x the target remains,
# which Pillow documents as indistinguishable from a direct resample.
REDUCING_GAP = 3.0
WEBP_METHOD = 4
PNG_COMPRESS_LEVEL = 6
# The JPEG standard's luminance table (Annex K), which libjpeg scales by the quality.
JPEG_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
             14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
             49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
# The only JPEG segments a file stored as is may carry: the JFIF header and Adobe's colour transform.
KEPT_SEGMENTS = {"APP0": b"JFIF\x00", "APP14": b"Adobe"}


class BadImage(Exception):
    """A file that cannot be used as a picture; reason is a short fixed word (manifest 'skipped' entries)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """PIL's decompression-bomb check at max_pixels, raising instead of warning above it."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB of any mode: 16-bit scaled to 8 (PIL's own conversion clips), alpha composited on white;
    an RGB picture is returned as it is, not copied."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in SIXTEEN_BIT_MODES or (im.mode == "I" and np.asarray(im).max() > 255):
        im = Image.fromarray((np.asarray(im, dtype=np.float32) / 257 + 0.5).clip(0, 255).astype(np.uint8))
    elif im.mode in ("I", "F"):
        im = Image.fromarray(np.asarray(im, dtype=np.float32).clip(0, 255).astype(np.uint8))
    if im.mode in ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def upright(im: Image.Image) -> Image.Image:
    """The picture turned as its EXIF orientation says; untouched (no copy) when it says nothing."""
    if im.getexif().get(EXIF_ORIENTATION, 1) not in range(2, 9):
        return im
    return ImageOps.exif_transpose(im)


def short_side_size(width: int, height: int, max_short_side: int) -> tuple[int, int] | None:
    """(width, height) with the shorter side max_short_side, or None when it is not longer than that."""
    if min(width, height) <= max_short_side:
        return None
    if width <= height:
        return max_short_side, max(1, round(height * max_short_side / width))
    return max(1, round(width * max_short_side / height)), max_short_side


def read_source(path: Path) -> bytes:
    """A source file's bytes, read once for both its content hash and its decode; BadImage when unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadImage("missing") from None
    except OSError as exc:
        raise BadImage("unreadable", exc.strerror or str(exc)) from None


def prepare_image(source: str | Path | bytes, max_short_side: int, max_pixels: int,
                  resample: str = "bilinear") -> torch.Tensor:
    """The RGB pixels of a file (path or bytes), uint8 [h, w, 3]: upright, any mode converted (to_rgb),
    shorter side exactly max_short_side when larger (never upscaled). Raises BadImage saying why not.

    JPEGs are decoded at 1/2-1/8 scale in the DCT domain when that still leaves max_short_side, so a
    17 MP painting is never decoded at full size; at full scale a plain one goes through jpeg_pixels
    (the same pixels, faster); `resample` (a RESAMPLE key) does the rest. Pixels, not PIL: the
    sharder's resize, hash and encode all run on them, with no PIL copy in between (docs/benchmarks.md).
    """
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise BadImage("empty")
        opened = io.BytesIO(source)
    else:
        try:
            if Path(source).stat().st_size == 0:
                raise BadImage("empty")
        except FileNotFoundError:
            raise BadImage("missing") from None
        opened = source
    try:
        with pixel_limit(max_pixels), Image.open(opened) as im:
            if im.width * im.height > max_pixels:
                raise BadImage("too large", f"{im.width}x{im.height} px > max_pixels {max_pixels}")
            scale, full = max_short_side / min(im.size), im.size
            if isinstance(im, JpegImagePlugin.JpegImageFile) and scale < 1:
                im.draft(None, (math.ceil(im.width * scale), math.ceil(im.height * scale)))
            pixels = jpeg_pixels(source) if isinstance(source, (bytes, bytearray)) and plain_jpeg(im, full) else None
            if pixels is None:
                im.load()
                out = to_rgb(upright(im))
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage("missing") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage("too large", str(exc)) from None
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except OSError as exc:
        # strerror, not str(exc): the latter names the absolute path, which the manifest must not hold.
        raise BadImage("truncated" if "truncated" in str(exc) else "unreadable", exc.strerror or str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on corrupt files; one must not stop 80k
        raise BadImage("undecodable", f"{type(exc).__name__}: {exc}") from None
    if pixels is not None:
        size = short_side_size(pixels.shape[1], pixels.shape[0], max_short_side)
        if size is None:
            return pixels
        if resample == "bilinear":
            return resize_pixels(pixels, size)
        out = as_pil(pixels)
    size = short_side_size(out.width, out.height, max_short_side)
    if size is None:
        return as_pixels(out)
    if resample == "bilinear":
        # Pillow's reducing_gap by hand: the whole-factor reduction keeps a large PNG's tensor copies small.
        factor = int(min(out.width / size[0], out.height / size[1]) / REDUCING_GAP)
        out = out.reduce(factor) if factor > 1 else out
        return resize_window(out, (0, 0, out.width, out.height), size)
    return as_pixels(out.resize(size, RESAMPLE[resample], reducing_gap=REDUCING_GAP))


@functools.cache
def _libjpeg_luma_total(quality: int) -> int:
    """Sum of the luminance quantisation table libjpeg (so Pillow) writes at `quality`."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return sum(min(max((q * scale + 50) // 100, 1), 255) for q in JPEG_LUMA)


def stored_as_is(source: bytes, pixels: torch.Tensor, fmt: str, quality: int) -> bool:
    """Whether `source` can be its own shard member, `pixels` being its prepared picture: a JPEG decoded as
    it is (no resize, no turn, no mode change), baseline 4:2:0, with no metadata beyond JFIF/Adobe, and
    quantised at least as coarsely as `quality` would. Re-encoding such a file only loses detail and
    adds bytes (docs/benchmarks.md); its bytes decode to `pixels` exactly."""
    if fmt != "jpeg":
        return False
    try:
        with Image.open(io.BytesIO(source)) as f:
            return (isinstance(f, JpegImagePlugin.JpegImageFile) and f.mode == "RGB" and f.size == picture_size(pixels)
                    and not (f.info.get("progressive") or f.info.get("progression") or "comment" in f.info)
                    and JpegImagePlugin.get_sampling(f) == 2
                    and all(data.startswith(KEPT_SEGMENTS.get(marker, b"\xff")) for marker, data in f.applist)
                    and bool(f.quantization) and sum(f.quantization[0]) >= _libjpeg_luma_total(quality))
    except Exception:  # noqa: BLE001 - any doubt about the file: re-encode it, as before
        return False


def shard_member(source: bytes, pixels: torch.Tensor, fmt: str, quality: int, passthrough: bool) -> tuple[bytes, bool]:
    """The bytes `artdist shard` stores for a file (`source`, its bytes; `pixels`, its prepared picture)
    with shard.format, .quality and .passthrough, and whether they are the source's own."""
    if passthrough and stored_as_is(source, pixels, fmt, quality):
        return bytes(source), True
    return encode_image(pixels, fmt, quality), False


def encode_image(img: Image.Image | torch.Tensor, fmt: str, quality: int) -> bytes:
    """A picture (PIL, or uint8 [h, w, 3] pixels) encoded with fixed settings and no metadata, so the
    bytes depend on the pixels only. Pixels to JPEG go through torchvision's libjpeg-turbo where it
    writes PIL's very bytes (_encoders_agree), sparing the PIL copy of the picture."""
    if fmt == "jpeg" and isinstance(img, torch.Tensor) and _encoders_agree():
        data = _torch_encode(img, quality)
        if data is not None:
            return data
    im = as_pil(img)
    im.info = {}  # PIL's encoders copy some source metadata (a JPEG comment, a PNG's ICC profile)
    buf = io.BytesIO()
    if fmt == "jpeg":
        im.save(buf, "JPEG", quality=quality)
    elif fmt == "webp":
        im.save(buf, "WEBP", quality=quality, method=WEBP_METHOD)
    else:
        im.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _torch_encode(pixels: torch.Tensor, quality: int) -> bytes | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
            return tv_encode_jpeg(pixels.permute(2, 0, 1), quality=quality).numpy().tobytes()
    except Exception:  # noqa: BLE001 - PIL encodes whatever torchvision will not
        return None


@functools.cache
def _encoders_agree() -> bool:
    """Whether torchvision's JPEG encoder writes PIL's bytes in this environment (probes at two qualities,
    odd sizes): shards must not depend on which encoder wrote them."""
    if tv_encode_jpeg is None:
        return False
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (37, 51, 3), dtype=np.uint8))
    smooth = torch.arange(64 * 45 * 3).remainder(251).to(torch.uint8).view(45, 64, 3)
    for probe in (noise, smooth):
        for quality in (50, 95):
            buf = io.BytesIO()
            Image.fromarray(probe.numpy()).save(buf, "JPEG", quality=quality)
            if _torch_encode(probe, quality) != buf.getvalue():
                return False
    return True


def eval_pixels(source: str | Path | bytes, shard: ShardConfig, data_cfg: DataConfig) -> np.ndarray:
    """A file as evaluation sees it, uint8 [S, S, 3]: prepared and encoded as `artdist shard` does with
    `shard`'s options, then decoded and center-cropped as the eval loader does (bit for bit the pixels
    it gets from that file's shard member). Raises BadImage."""
    data = source if isinstance(source, (bytes, bytearray)) else read_source(Path(source))
    pixels = prepare_image(data, shard.max_short_side, shard.max_pixels, shard.resample)
    member, _ = shard_member(data, pixels, shard.format, shard.quality, shard.passthrough)
    return decode_image(member, "none", data_cfg, None)


def shard_options(cfg: JobConfig) -> ShardConfig:
    """The options a run's training pictures were prepared with: those in its shards' manifest when
    the folder is readable here, else the run config's shard section."""
    try:
        options = read_manifest(cfg.data.shards).extra.get("options", {})
    except UserError:
        return cfg.shard
    # Manifests written before shard.resample existed were made with LANCZOS, before passthrough without it.
    options = {"resample": "lanczos", "passthrough": False, **options}
    usable = {k: v for k, v in options.items()
              if k in ("max_short_side", "format", "quality", "max_pixels", "resample", "passthrough")
              and type(v) is type(getattr(cfg.shard, k)) and (k != "resample" or v in RESAMPLE)}
    return dataclasses.replace(cfg.shard, **usable)
