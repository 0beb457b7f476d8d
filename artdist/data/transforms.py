"""Image preparation: crop/resize/flip geometry shared by the CPU and GPU paths, decoding, device-side normalization."""
from __future__ import annotations

import contextlib
import functools
import io
import math
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torchvision
from torchvision.transforms.v2 import functional as tv_functional
from PIL import Image, JpegImagePlugin

try:  # deprecated in torchvision 0.29 for TorchCodec; without it PIL decodes everything
    from torchvision.io import ImageReadMode, decode_jpeg as tv_decode_jpeg
except ImportError:  # pragma: no cover
    tv_decode_jpeg = None

from artdist.config import DataConfig
from artdist.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RRC_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
RRC_TRIES = 10
EXIF_ORIENTATION = 0x0112
DECODER_CHECKED = (0, 1, 2)  # Pillow's chroma subsampling codes: 4:4:4, 4:2:2, 4:2:0


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
    # Boxes are in whole source pixels where the recipe allows: resize_window does those fastest.
    if augment == "none":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return Geometry((left, top, left + side, top + side))
    if augment == "crop_flip":
        # The usual recipe: resize shorter side to size, zero-pad by crop_padding, random crop.
        scale = size / min(width, height)
        pad = data_cfg.crop_padding
        x = int(rng.integers(round(width * scale) + 2 * pad - size + 1)) - pad
        y = int(rng.integers(round(height * scale) + 2 * pad - size + 1)) - pad
        flip = bool(rng.random() < 0.5)
        if scale < 1:  # a downscale: the offset on the nearest source pixel, a box resize_window does fastest
            side = min(width, height)
            left, top = round(x / scale), round(y / scale)
            return Geometry((left, top, left + side, top + side), flip)
        return Geometry((x / scale, y / scale, (x + size) / scale, (y + size) / scale), flip)
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
        left, top = (width - w) // 2, (height - h) // 2
        return Geometry((left, top, left + w, top + h), bool(rng.random() < 0.5))
    raise ValueError(f"unknown augment {augment!r}")


def _placement(box: tuple[float, float, float, float], width: int, height: int,
               size: tuple[int, int]) -> tuple[tuple[float, float, float, float], tuple[int, int, int, int]]:
    """The part of `box` inside the image, and the output rectangle (of `size`, w x h) it lands in."""
    left, top, right, bottom = box
    sx, sy = size[0] / (right - left), size[1] / (bottom - top)
    src = (max(left, 0.0), max(top, 0.0), min(right, float(width)), min(bottom, float(height)))
    x0, y0 = min(round((src[0] - left) * sx), size[0] - 1), min(round((src[1] - top) * sy), size[1] - 1)
    x1, y1 = round((src[2] - left) * sx), round((src[3] - top) * sy)
    return src, (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to n inside. Per-image tensor ops must run on one, as in a DataLoader
    worker: in the main process a second thread spins through each small op and doubles its CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def apply_geometry(img: Image.Image | torch.Tensor, geom: Geometry, size: int) -> np.ndarray:
    """The crop for `geom` of a picture (PIL, or uint8 [h, w, 3] pixels): uint8 [size, size, 3], zero
    outside the picture, flipped if asked."""
    left, top, right, bottom = geom.box
    if abs(right - left - size) < 1 and abs(bottom - top - size) < 1:
        # After a JPEG draft the box is often at output scale already: a crop (zero-filled outside
        # the image, like the padding below) replaces a near no-op resample (docs/benchmarks.md).
        x, y = round(left), round(top)
        out = as_pil(img).crop((x, y, x + size, y + size))
        return np.asarray(out.transpose(Image.FLIP_LEFT_RIGHT) if geom.flip else out)
    pixels = resize_window(img, geom.box, (size, size))
    return (pixels.flip(1) if geom.flip else pixels).numpy()


def resize_window(img: Image.Image | torch.Tensor, box: tuple[float, float, float, float],
                  size: tuple[int, int]) -> torch.Tensor:
    """img's `box` (img: PIL, or uint8 [h, w, 3] pixels), zero outside the picture, resampled to `size`
    (w, h) with an antialiased triangle filter: uint8 [h, w, 3] in HWC memory.

    A downscale of a box in whole pixels goes through torch's vectorised uint8 kernel (faster than PIL's,
    docs/benchmarks.md); a sub-pixel box, which torch cannot place, and an upscale, through PIL. The
    torch path sees the box alone where PIL reads past it, so their edge pixels differ by a few levels
    (docs/benchmarks.md).
    """
    left, top, right, bottom = box
    if (all(float(v).is_integer() for v in box) and right - left >= size[0] and bottom - top >= size[1]
            and (right - left, bottom - top) != tuple(size)):  # torchvision would hand back its input
        width, height = picture_size(img)
        inside = (max(int(left), 0), max(int(top), 0), min(int(right), width), min(int(bottom), height))
        if isinstance(img, torch.Tensor):  # a cropped view is copied: torch's kernel wants HWC memory
            pixels = img[inside[1]:inside[3], inside[0]:inside[2]].contiguous()
        else:
            pixels = as_pixels(img if inside == (0, 0, width, height) else img.crop(inside), writable=False)
        if inside != box:
            padded = torch.zeros((int(bottom - top), int(right - left), 3), dtype=torch.uint8)
            padded[inside[1] - int(top):inside[3] - int(top), inside[0] - int(left):inside[2] - int(left)] = pixels
            pixels = padded
        return resize_pixels(pixels, size)
    # PIL's box must lie inside the picture: resize that part into its place in a zero canvas.
    img = as_pil(img)
    src, (x0, y0, x1, y1) = _placement(box, img.width, img.height, size)
    pixels = as_pixels(img.resize((x1 - x0, y1 - y0), Image.BILINEAR, box=src))
    if (x0, y0, x1, y1) != (0, 0, *size):
        canvas = torch.zeros((size[1], size[0], 3), dtype=torch.uint8)
        canvas[y0:y1, x0:x1] = pixels
        pixels = canvas
    return pixels


def resize_pixels(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [h, w, 3] HWC pixels resampled to `size` (w, h) by torch's vectorised antialiased bilinear
    kernel, one thread: uint8 [size h, size w, 3] in HWC memory."""
    # torchvision's resize, not interpolate: it keeps the HWC (channels_last) memory, so that neither
    # the resize nor the batch's np.stack transposes (each would cost about as much as the resize).
    with torch_threads(1):
        return tv_functional.resize(pixels.permute(2, 0, 1), [size[1], size[0]], antialias=True).permute(1, 2, 0)


def plain_jpeg(im: Image.Image, size: tuple[int, int]) -> bool:
    """Whether an opened file is a JPEG that jpeg_pixels decodes to the very picture PIL would (as
    prepare_image makes it): RGB, 4:4:4, 4:2:2 or 4:2:0 (the layouts _decoders_agree checks), not
    reduced by a draft from its `size`, not turned by its EXIF orientation."""
    return (isinstance(im, JpegImagePlugin.JpegImageFile) and im.mode == "RGB" and im.size == size
            and JpegImagePlugin.get_sampling(im) in DECODER_CHECKED
            and im.getexif().get(EXIF_ORIENTATION, 1) not in range(2, 9))


def jpeg_pixels(source: bytes) -> torch.Tensor | None:
    """A JPEG's pixels at full scale, uint8 [h, w, 3] HWC, by torchvision's libjpeg-turbo decoder: the
    pixels PIL's gives, faster (no chunked reads, no 4-byte pixels to pack back; docs/benchmarks.md). None on any
    doubt (no such decoder, one that disagrees with PIL's here, an error, a libjpeg warning): PIL then
    decodes and says what is wrong."""
    if tv_decode_jpeg is None or not _decoders_agree():
        return None
    return _torch_decode(source)


def _torch_decode(source: bytes) -> torch.Tensor | None:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision 0.29 points to TorchCodec
            pixels = tv_decode_jpeg(torch.frombuffer(bytearray(source), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Exception:  # noqa: BLE001 - a truncated or odd file: PIL's decode names the reason
        return None
    return None if caught else pixels.permute(1, 2, 0)


@functools.cache
def _decoders_agree() -> bool:
    """Whether torchvision's JPEG decoder gives PIL's pixels in this environment, on noise saved in each
    DECODER_CHECKED layout: another libjpeg build (IJG's 9 upsamples chroma differently) would change the
    shards' bytes."""
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 51, 3), dtype=np.uint8))
    for subsampling in DECODER_CHECKED:
        buf = io.BytesIO()
        noise.save(buf, "JPEG", quality=90, subsampling=subsampling)
        ours = _torch_decode(buf.getvalue())
        if ours is None or not np.array_equal(ours.numpy(), np.asarray(Image.open(io.BytesIO(buf.getvalue())))):
            return False
    return True


def picture_size(img: Image.Image | torch.Tensor) -> tuple[int, int]:
    """(width, height) of a picture, PIL or uint8 [h, w, 3] pixels."""
    return (img.shape[1], img.shape[0]) if isinstance(img, torch.Tensor) else img.size


def as_pil(img: Image.Image | torch.Tensor) -> Image.Image:
    """A picture as PIL, for the few steps done there (sub-pixel boxes, upscales, output-scale crops)."""
    return Image.fromarray(img.numpy()) if isinstance(img, torch.Tensor) else img


def as_pixels(img: Image.Image, writable: bool = True) -> torch.Tensor:
    """An RGB picture's pixels as uint8 [h, w, 3]. writable=False spares a copy of them (a resize's
    input: read only, and never handed out); torch warns about read-only memory, which is then meant."""
    data = img.tobytes()
    if writable:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(img.height, img.width, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8).view(img.height, img.width, 3)


def crop_resize_batch(images: list[torch.Tensor], geoms: list[Geometry], size: int) -> torch.Tensor:
    """uint8 [3, H_i, W_i] images on one device -> uint8 [N, 3, size, size]: every crop/resize/flip at once.

    One roi_align over the zero-padded batch replaces ~8 small kernels per image (the GPU-decode path
    was host-bound at 64 images per step). Its adaptive sampling averages ceil(scale)^2 bilinear
    samples per output pixel, an antialiased downscale close to PIL's; the bound is in tests/test_data.py.
    """
    # A 1-px zero border all round: roi_align clamps samples within 1 px outside its input to the edge
    # pixel, where the CPU path pads with zeros.
    height = max(img.shape[-2] for img in images) + 2
    width = max(img.shape[-1] for img in images) + 2
    canvas = torch.zeros((len(images), 3, height, width), dtype=torch.float32, device=images[0].device)
    for i, img in enumerate(images):
        canvas[i, :, 1:img.shape[-2] + 1, 1:img.shape[-1] + 1] = img
    boxes = torch.tensor([(i, *(v + 1 for v in g.box)) for i, g in enumerate(geoms)], dtype=torch.float32,
                         device=canvas.device)
    out = torchvision.ops.roi_align(canvas, boxes, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    flips = [i for i, g in enumerate(geoms) if g.flip]
    if flips:
        index = torch.tensor(flips, device=out.device)
        out[index] = out[index].flip(-1)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def decode_drafted(data: bytes, augment: str, data_cfg: DataConfig,
                   rng: np.random.Generator | None) -> tuple[Image.Image | torch.Tensor, Geometry]:
    """Encoded image -> (RGB picture, its crop for `augment` in that picture's pixels), decoded by
    libjpeg at 1/2-1/8 scale (PIL's draft) whenever the crop needs fewer pixels than the file holds,
    else by jpeg_pixels where it can (uint8 [h, w, 3] pixels)."""
    size = data_cfg.image_size
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    geom = sample_geometry(augment, width, height, data_cfg, rng)
    left, top, right, bottom = geom.box
    # Rounded down: draft only reduces by 2/4/8 when the file is at least that many times the
    # request, and 597x448 -> 298.5x224 must still allow 1/2. At worst this upsamples by < 1 px.
    img.draft("RGB", (max(1, int(width * size / (right - left))), max(1, int(height * size / (bottom - top)))))
    pixels = jpeg_pixels(data) if plain_jpeg(img, (width, height)) else None
    if pixels is not None:
        return pixels, geom
    if img.mode == "RGB":
        img.load()  # convert("RGB") would copy the decoded picture
    else:
        img = img.convert("RGB")
    fx, fy = img.width / width, img.height / height
    return img, Geometry((left * fx, top * fy, right * fx, bottom * fy), geom.flip)


def decode_image(data: bytes, augment: str, data_cfg: DataConfig, rng: np.random.Generator | None) -> np.ndarray:
    """Encoded image -> uint8 [S, S, 3]: decoded by decode_drafted, cropped by apply_geometry.

    PIL's JPEG draft mode lets libjpeg decode at 1/2-1/8 scale whenever the crop needs fewer pixels than
    the file holds; a full-scale decode goes through jpeg_pixels (the same pixels, faster). The output is
    HWC memory, never a reversed or cropped numpy view: those made the batch's np.stack several times
    slower (docs/benchmarks.md).
    """
    img, geom = decode_drafted(data, augment, data_cfg, rng)
    return apply_geometry(img, geom, data_cfg.image_size)


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
        """Batched nvJPEG decode, then the whole batch's crop/resize/flip in one roi_align.

        The crop randomness comes from torch's global generator (seeded by the trainer), not
        per-sample seeds: the encoded batch carries no epoch/worker information.
        """
        decoded = torchvision.io.decode_jpeg(list(encoded), mode=torchvision.io.ImageReadMode.RGB,
                                             device=self.device)
        rng = np.random.default_rng(int(torch.randint(2**62, ()).item()))
        geoms = [sample_geometry(self.augment, img.shape[-1], img.shape[-2], self.data_cfg, rng) for img in decoded]
        return crop_resize_batch(decoded, geoms, self.data_cfg.image_size)
