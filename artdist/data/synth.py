"""Synthetic WikiArt-like corpus in the exact ArtGAN layout, with optional planted label noise and copies."""
from __future__ import annotations

import colorsys
import csv
import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance

from artdist.config import TASKS, SynthConfig
from artdist.data.duplicates import PLANTED_FIELDS, PLANTED_NAME
from artdist.errors import ConfigError

# Real ArtGAN class names, in the order the generator takes them (most distinct looks first);
# the label files list the chosen ones alphabetically, like the real ones.
STYLES = (
    "Impressionism", "Baroque", "Art_Nouveau", "Cubism", "Ukiyo_e", "Pop_Art", "Pointillism",
    "Realism", "Romanticism", "Expressionism", "Abstract_Expressionism", "Fauvism", "Symbolism",
    "Rococo", "Minimalism", "Post_Impressionism", "Northern_Renaissance", "Early_Renaissance",
    "High_Renaissance", "Mannerism_Late_Renaissance", "Naive_Art_Primitivism", "Color_Field_Painting",
    "Contemporary_Realism", "New_Realism", "Action_painting", "Analytical_Cubism", "Synthetic_Cubism",
)
ARTISTS = (
    "Claude_Monet", "Rembrandt", "Pablo_Picasso", "Vincent_van_Gogh", "Albrecht_Durer",
    "Salvador_Dali", "Ivan_Aivazovsky", "Marc_Chagall", "Edgar_Degas", "Paul_Cezanne",
    "Gustave_Dore", "Ilya_Repin", "Ivan_Shishkin", "John_Singer_Sargent", "Camille_Pissarro",
    "Boris_Kustodiev", "Childe_Hassam", "Eugene_Boudin", "Martiros_Saryan", "Nicholas_Roerich",
    "Pierre_Auguste_Renoir", "Pyotr_Konchalovsky", "Raphael_Kirchner",
)
GENRES = (
    "landscape", "portrait", "cityscape", "still_life", "abstract_painting", "religious_painting",
    "genre_painting", "nude_painting", "sketch_and_study", "illustration",
)
# Artists outside the artist task (no artist label), spelled like the real file names: several
# dots, double-encoded UTF-8 ("grã©goire" is how WikiArt's "grégoire" appears in the real files).
OTHER_ARTISTS = (
    "j.-e.-h.-macdonald", "grã©goire-michonze", "m.c.-escher", "arnold-bã¶cklin", "gustav-klimt",
    "ivan-bilibin", "n.c.-wyeth", "joaquã­n-sorolla", "leon-bakst", "t.-c.-steele",
)
# The real corpus keeps Art Nouveau images in a folder whose name differs from the class name.
STYLE_FOLDERS = {"Art_Nouveau": "Art_Nouveau_Modern"}
DEFAULT_COUNTS = {"style": 6, "artist": 8, "genre": 5}
# Shares of images with a label in the artist / genre files (every image has a style), the val
# share of each task's rows, and the share whose split differs between two tasks. Like the real
# files (65k of 81k images have a genre, 30% in val) but with more artist labels than their 19k,
# so a small corpus still has enough examples per artist to learn from.
ARTIST_SHARE = 0.7
GENRE_SHARE = 0.8
VAL_SHARE = 0.3
SPLIT_CONFLICT_SHARE = 0.03
JPEG_QUALITY = 90
TITLE_WORDS = (
    "morning", "evening", "river", "garden", "church", "harbour", "woman", "portrait", "study",
    "the-sea", "winter", "bridge", "village", "still-life", "flowers", "self-portrait", "road",
    "mountains", "boats", "dancers", "fields", "the-artist-s-son", "moonlight", "market", "pond",
)
ARTIST_HEADER = {"train": "(Path to image),, (Groundtruth class) ", "val": "(Path to image),, (Groundtruth class)"}
ARTIST_FILES = {"train": "artist_train", "val": "artist_val"}
CLASS_FILES = {"style": "style_class.txt", "artist": "artist_class", "genre": "genre_class"}
CSV_FILES = {("style", "train"): "style_train.csv", ("style", "val"): "style_val.csv",
             ("genre", "train"): "genre_train.csv", ("genre", "val"): "genre_val.csv"}


@dataclasses.dataclass
class _Image:
    """One generated painting: true classes (indices into the chosen lists) and label-file rows."""

    style: int
    genre: int
    artist: int  # -1: one of OTHER_ARTISTS, no artist label
    slug: str
    title: str
    splits: dict[str, str]  # task -> "train"/"val", only for tasks the image is labelled in
    assigned: dict[str, int] = dataclasses.field(default_factory=dict)  # task -> label written

    def folder(self, style_names: list[str]) -> str:
        name = style_names[self.assigned["style"]]
        return STYLE_FOLDERS.get(name, name)


# --------------------------------------------------------------------------- pictures
Rng = np.random.Generator
Grid = np.ndarray  # one value per pixel, coordinates y, x in [0, 1]
# Style -> palette hue and brush texture; artist -> motif shape and stroke direction; genre ->
# composition layout. Every cue survives a horizontal flip (the training augmentation).


def _palette(style: int, n_styles: int, rng: np.random.Generator) -> np.ndarray:
    """Four RGB colours around the style's hue (hues spread evenly over the chosen styles)."""
    hue = style / n_styles + rng.uniform(-0.25, 0.25) / n_styles
    sat = 0.45 + 0.35 * ((style * 7) % 5) / 4
    values = (0.95, 0.45, 0.2, 0.7) if style % 2 else (0.88, 0.38, 0.15, 0.62)
    cols = []
    for i, v in enumerate(values):
        h = (hue + 0.04 * (i - 1.5) + rng.normal(0, 0.01)) % 1.0
        s = np.clip(sat * rng.uniform(0.85, 1.1), 0, 1)
        cols.append(colorsys.hsv_to_rgb(h, s, np.clip(v * rng.uniform(0.9, 1.1), 0, 1)))
    return np.asarray(cols, dtype=np.float32)


def _blobs(rng: Rng, size: int, cell: tuple[int, int]) -> Grid:
    """Piecewise-constant noise in [-1, 1] with cells of `cell` px (y, x): brush dabs."""
    h, w = -(-size // cell[0]), -(-size // cell[1])
    low = rng.uniform(-1, 1, (h, w)).astype(np.float32)
    return np.repeat(np.repeat(low, cell[0], 0), cell[1], 1)[:size, :size]


def _tex_dabs(rng: Rng, y: Grid, x: Grid, regions: Grid, horizontal: bool) -> Grid:
    s = y.shape[0]
    long, short = max(2, s // 10), max(1, s // 40)
    return 0.2 * _blobs(rng, s, (short, long) if horizontal else (long, short))


def _tex_chiaroscuro(rng: Rng, y: Grid, x: Grid, regions: Grid, horizontal: bool) -> Grid:
    vignette = ((y - 0.45) ** 2 + (x - 0.5) ** 2) * 1.2
    return -vignette + 0.12 * rng.standard_normal(y.shape).astype(np.float32)


def _tex_swirl(rng: Rng, y: Grid, x: Grid, regions: Grid, horizontal: bool) -> Grid:
    f, g, ph = rng.uniform(14, 20), rng.uniform(5, 8), rng.uniform(0, 6.3)
    a, b = (y, x) if horizontal else (x, y)
    return 0.22 * np.sin(f * a + 1.5 * np.sin(g * b + ph))


def _tex_facets(rng: Rng, y: Grid, x: Grid, regions: Grid, horizontal: bool) -> Grid:
    pts = rng.uniform(0, 1, (14, 2)).astype(np.float32)
    d = (y[..., None] - pts[:, 0]) ** 2 + (x[..., None] - pts[:, 1]) ** 2
    shade = rng.uniform(-0.18, 0.18, 14).astype(np.float32)
    return shade[d.argmin(-1)]


def _tex_outline(rng: Rng, y: Grid, x: Grid, regions: Grid, horizontal: bool) -> Grid:
    edge = np.zeros(regions.shape, dtype=bool)
    edge[1:, :] |= regions[1:, :] != regions[:-1, :]
    edge[:, 1:] |= regions[:, 1:] != regions[:, :-1]
    edge[:-1, :] |= edge[1:, :].copy()
    edge[:, :-1] |= edge[:, 1:].copy()
    return np.where(edge, -0.8, 0.0).astype(np.float32)


def _tex_dots(rng: Rng, y: Grid, x: Grid, regions: Grid, horizontal: bool) -> Grid:
    f = y.shape[0] / rng.uniform(3.5, 4.5) * np.pi
    ph = rng.uniform(0, 6.3, 2)
    return np.where(np.sin(f * y + ph[0]) * np.sin(f * x + ph[1]) > 0.35, 0.3, -0.15).astype(np.float32)


TEXTURES: tuple[Callable, ...] = (_tex_dabs, _tex_chiaroscuro, _tex_swirl, _tex_facets, _tex_outline, _tex_dots)


# Layouts return, per pixel, which of the four palette colours paints it: 0 light, 1 mid, 2 dark,
# 3 mid-light. How light and dark share the picture is part of a genre's look (light skies, dark
# portrait and still-life backgrounds, lit windows).


def _ellipse(y: Grid, x: Grid, cy: float, cx: float, ry: float, rx: float) -> Grid:
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def _lay_landscape(rng: Rng, y: Grid, x: Grid) -> Grid:
    horizon = rng.uniform(0.4, 0.55) + 0.06 * np.sin(rng.uniform(5, 9) * x + rng.uniform(0, 6.3))
    reg = np.where(y < horizon, 0, 1)
    return np.where(y > rng.uniform(0.75, 0.85), 2, reg)


def _lay_portrait(rng: Rng, y: Grid, x: Grid) -> Grid:
    cx = 0.5 + rng.uniform(-0.05, 0.05)
    reg = np.where(_ellipse(y, x, 1.0, cx, 0.42, 0.38), 1, 2)
    return np.where(_ellipse(y, x, rng.uniform(0.35, 0.42), cx, 0.22, 0.16), 0, reg)


def _lay_cityscape(rng: Rng, y: Grid, x: Grid) -> Grid:
    reg = np.full(y.shape, 3, dtype=np.int64)
    edges = np.sort(rng.uniform(0.05, 0.95, 6))
    for i, (a, b) in enumerate(zip(np.r_[0.0, edges], np.r_[edges, 1.0])):
        top = rng.uniform(0.25, 0.6)
        inside = (x >= a) & (x < b) & (y > top)
        reg[inside] = 2 - i % 2
        windows = inside & (np.sin(y * 90) > 0.5) & (np.sin(x * 110) > 0.4)
        reg[windows] = 0
    return reg


def _lay_still_life(rng: Rng, y: Grid, x: Grid) -> Grid:
    table = rng.uniform(0.55, 0.65)
    reg = np.where(y > table, 2, 1)
    for i in range(rng.integers(2, 5)):
        r = rng.uniform(0.07, 0.12)
        reg[_ellipse(y, x, table - r * 0.6, rng.uniform(0.2, 0.8), r, r)] = 3 * (i % 2)
    return reg


def _lay_abstract(rng: Rng, y: Grid, x: Grid) -> Grid:
    rows = np.searchsorted(np.sort(rng.uniform(0.1, 0.9, 2)), y)
    cols = np.searchsorted(np.sort(rng.uniform(0.1, 0.9, 2)), x)
    return (rows + 2 * cols + rng.integers(0, 4)) % 4


def _lay_religious(rng: Rng, y: Grid, x: Grid) -> Grid:
    arch = (np.abs(x - 0.5) < 0.3) & ((y > 0.35) | _ellipse(y, x, 0.35, 0.5, 0.3, 0.3))
    reg = np.where(arch, 1, 2)
    reg[np.abs(x - 0.5) < (y - 0.3) * 0.45] = 0
    ring = ((y - 0.3) ** 2 + (x - 0.5) ** 2)
    reg[(ring > 0.008) & (ring < 0.016)] = 3
    return reg


def _lay_genre_painting(rng: Rng, y: Grid, x: Grid) -> Grid:
    ground = rng.uniform(0.6, 0.7)
    reg = np.where(y > ground, 1, 0)
    for cx in rng.uniform(0.1, 0.9, rng.integers(3, 6)):
        reg[_ellipse(y, x, ground - 0.12, cx, 0.12, 0.04)] = 2
        reg[_ellipse(y, x, ground - 0.28, cx, 0.035, 0.035)] = 3
    return reg


def _lay_nude(rng: Rng, y: Grid, x: Grid) -> Grid:
    cy = rng.uniform(0.5, 0.6)
    reg = np.where(_ellipse(y, x, cy, 0.5, 0.1, 0.36), 2, 0)
    return np.where(y > cy + 0.08, 1, reg)


def _lay_sketch(rng: Rng, y: Grid, x: Grid) -> Grid:
    reg = np.zeros(y.shape, dtype=np.int64)
    for _ in range(rng.integers(4, 8)):
        a, f, ph = rng.uniform(0.2, 0.8), rng.uniform(2, 8), rng.uniform(0, 6.3)
        reg[np.abs(y - a - 0.1 * np.sin(f * x + ph)) < 0.012] = 2
    return reg


def _lay_illustration(rng: Rng, y: Grid, x: Grid) -> Grid:
    m = rng.uniform(0.08, 0.14)
    inner = (y > m) & (y < 1 - m) & (x > m) & (x < 1 - m)
    reg = np.where(inner, 1, 3)
    reg[_ellipse(y, x, 0.5, 0.5, 0.2, 0.2)] = 2
    return reg


# Same order as GENRES.
LAYOUTS: tuple[Callable, ...] = (
    _lay_landscape, _lay_portrait, _lay_cityscape, _lay_still_life, _lay_abstract, _lay_religious,
    _lay_genre_painting, _lay_nude, _lay_sketch, _lay_illustration,
)


# Motif colours, one per shape; a contrasting rim makes each motif stand out on any palette.
INKS = ((0.9, 0.1, 0.1), (0.1, 0.3, 0.95), (0.95, 0.85, 0.1), (0.05, 0.05, 0.05), (0.97, 0.97, 0.97),
        (0.1, 0.8, 0.3), (0.8, 0.2, 0.9), (0.1, 0.85, 0.9))
# Motif masks from the offsets to the motif centre (sy, sx), radius r and stroke width t; each is
# symmetric under a horizontal flip. Artist k draws shape k % 8 in ink k % 8 at size MOTIF_SIZES[k // 8].
SHAPES: tuple[Callable, ...] = (
    lambda sy, sx, r, t: sy ** 2 + sx ** 2 <= r ** 2,  # disc
    lambda sy, sx, r, t: (np.abs(sy) <= r * 0.85) & (np.abs(sx) <= r * 0.85),  # square
    lambda sy, sx, r, t: (sy <= r * 0.8) & (np.abs(sx) <= (sy + r) * 0.6),  # triangle
    lambda sy, sx, r, t: ((np.abs(sy) <= t) & (np.abs(sx) <= r)) | ((np.abs(sx) <= t) & (np.abs(sy) <= r)),  # plus
    lambda sy, sx, r, t: np.abs(np.sqrt(sy ** 2 + sx ** 2) - r * 0.75) <= t * 0.8,  # ring
    lambda sy, sx, r, t: np.abs(sy) + np.abs(sx) <= r,  # diamond
    lambda sy, sx, r, t: (np.abs(np.abs(sy) - np.abs(sx)) <= t) & (np.abs(sy) <= r * 0.8),  # X
    lambda sy, sx, r, t: (np.abs(np.abs(sy) - r * 0.45) <= t * 0.8) & (np.abs(sx) <= r),  # two bars
)
MOTIF_SIZES = (1.0, 0.7, 1.35)


def _draw(img: _Image, n_styles: int, size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    regions = LAYOUTS[img.genre % len(LAYOUTS)](rng, y, x)
    palette = _palette(img.style, n_styles, rng)
    # The artist's brushwork: stroke direction and length (random for unlabelled artists).
    hand = img.artist if img.artist >= 0 else int(rng.integers(4))
    horizontal = hand % 2 == 0
    cell = (max(1, size // 32), max(2, size // (4 if hand // 2 % 2 else 10)))
    tex = TEXTURES[img.style % len(TEXTURES)](rng, y, x, regions, horizontal)
    strokes = _blobs(rng, size, cell if horizontal else cell[::-1])
    rgb = palette[regions] * (1 + tex + 0.1 * strokes)[..., None]
    if img.artist >= 0:
        shape = SHAPES[img.artist % len(SHAPES)]
        ink = np.asarray(INKS[img.artist % len(INKS)], dtype=np.float32)
        rim = np.float32(0.0 if ink.mean() > 0.5 else 1.0)
        for _ in range(rng.integers(3, 5)):
            r = rng.uniform(0.11, 0.15) * MOTIF_SIZES[img.artist // len(SHAPES)]
            cy, cx = rng.uniform(0.15, 0.85, 2)
            rgb[shape(y - cy, x - cx, r * 1.3, r * 0.39)] = rim
            rgb[shape(y - cy, x - cx, r, r * 0.3)] = ink + rng.normal(0, 0.04, 3).astype(np.float32)
    rgb += rng.normal(0, 0.035, rgb.shape).astype(np.float32)
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- metadata


def _slug(name: str) -> str:
    return name.lower().replace("_", "-")


def _plan(n: int, counts: dict[str, int], rng: np.random.Generator) -> list[_Image]:
    """Classes, names and splits of n images, with the real files' quirks planted."""
    # Mildly imbalanced classes, like (far milder than) the real ones.
    probs = {t: np.linspace(1.0, 0.5, counts[t]) / np.linspace(1.0, 0.5, counts[t]).sum() for t in TASKS}
    images, seen = [], set()
    for i in range(n):
        style = int(rng.choice(counts["style"], p=probs["style"]))
        genre = int(rng.choice(counts["genre"], p=probs["genre"]))
        # The first images carry the unlabelled-artist name quirks (dots, non-ASCII).
        labelled = i >= 2 and rng.random() < ARTIST_SHARE
        artist = int(rng.choice(counts["artist"], p=probs["artist"])) if labelled else -1
        slug = _slug(ARTISTS[artist]) if labelled else OTHER_ARTISTS[i if i < 2 else rng.integers(len(OTHER_ARTISTS))]
        words = rng.choice(len(TITLE_WORDS), 2, replace=False)
        title = f"{TITLE_WORDS[words[0]]}-{TITLE_WORDS[words[1]]}-{1850 + int(rng.integers(120))}"
        base, k = title, 1
        while (slug, title) in seen:
            k += 1
            title = f"{base}-{k}"
        seen.add((slug, title))
        split = "val" if rng.random() < VAL_SHARE else "train"
        has_genre = i < 4 or rng.random() < GENRE_SHARE  # the quirk images all have every label they can
        tasks = ["style"] + (["artist"] if labelled else []) + (["genre"] if has_genre else [])
        images.append(_Image(style, genre, artist, slug, title, {t: split for t in tasks}))
    # A "(1)" twin: same artist and title as another image, as WikiArt names re-uploads.
    first, twin = images[2], images[3]
    twin.artist, twin.slug, twin.title = first.artist, first.slug, first.title + "(1)"
    twin.splits.pop("artist", None)
    if twin.artist >= 0:
        twin.splits["artist"] = twin.splits["style"]
    # Some images sit in train for one task and in val for another.
    for img in images[4:]:
        if len(img.splits) > 1 and rng.random() < SPLIT_CONFLICT_SHARE:
            task = sorted(img.splits)[int(rng.integers(1, len(img.splits)))]
            img.splits[task] = "val" if img.splits[task] == "train" else "train"
    multi = [img for img in images[4:] if "genre" in img.splits]
    if multi and not any(len(set(img.splits.values())) > 1 for img in images):
        img = multi[0]
        img.splits["genre"] = "val" if img.splits["style"] == "train" else "train"
    return images


def _plant_noise(images: list[_Image], counts: dict[str, int], noise: float,
                 rng: np.random.Generator) -> list[tuple[int, str]]:
    """Give `noise` of the labelled (image, task) pairs a wrong label, at the same rate in each
    task's train and val files; returns the (image index, task) pairs changed."""
    for img in images:
        img.assigned = {t: (img.style, img.artist, img.genre)[TASKS.index(t)] for t in img.splits}
    planted = []
    for task in TASKS:
        for split in ("train", "val"):
            pairs = [i for i, img in enumerate(images) if img.splits.get(task) == split]
            k = int(round(noise * len(pairs)))
            for i in sorted(rng.choice(pairs, k, replace=False).tolist()) if k else []:
                wrong = int(rng.integers(counts[task] - 1))
                true = images[i].assigned[task]
                images[i].assigned[task] = wrong + (wrong >= true)
                planted.append((i, task))
    return planted


# Planted copies, in turn: the same file under another style folder (as WikiArt files one painting under
# several styles), then copies that only a hash or an embedding can find.
COPY_KINDS = ("exact", "reencoded", "resized", "cropped", "jittered")
COPY_ACROSS_SPLITS = 0.3  # share of the other kinds whose copy sits in the other split (leakage)
REENCODE_QUALITY = 60
RESIZE_FACTOR = (0.6, 0.85)
CROP_KEEP = (0.95, 0.98)  # kept share of each side: at most ~10% of the area goes
JITTER = (0.85, 1.15)  # brightness, contrast and saturation factors


def _plant_copies(images: list[_Image], paths: list[str], fraction: float, names: dict[str, list[str]],
                  rng: np.random.Generator) -> list[tuple[int, _Image, str, str]]:
    """Copies of `fraction` of the paintings: (original index, copy, its path, kind), kinds in turn."""
    k = int(round(fraction * len(images)))
    originals = sorted(rng.choice(len(images), k, replace=False).tolist()) if k else []
    planted = []
    for n, i in enumerate(originals):
        img, kind = images[i], COPY_KINDS[n % len(COPY_KINDS)]
        copy = dataclasses.replace(img, splits=dict(img.splits), assigned=dict(img.assigned))
        folder, name = paths[i].split("/", 1)
        if kind == "exact":
            other = int(rng.integers(len(names["style"]) - 1))
            copy.assigned["style"] = other + (other >= img.assigned["style"])
            path = f"{copy.folder(names['style'])}/{name}"
        else:
            path = f"{folder}/{name.rsplit('.', 1)[0]}-{kind}.jpg"
            if rng.random() < COPY_ACROSS_SPLITS:
                copy.splits = {t: "val" if s == "train" else "train" for t, s in img.splits.items()}
        planted.append((i, copy, path, kind))
    return planted


def _copy_picture(source: Path, dest: Path, kind: str, rng: np.random.Generator) -> None:
    if kind == "exact":
        dest.write_bytes(source.read_bytes())
        return
    with Image.open(source) as im:
        im = im.convert("RGB")
    w, h = im.size
    if kind == "resized":
        f = rng.uniform(*RESIZE_FACTOR)
        im = im.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.LANCZOS)
    elif kind == "cropped":
        kw, kh = round(w * rng.uniform(*CROP_KEEP)), round(h * rng.uniform(*CROP_KEEP))
        x, y = int(rng.integers(w - kw + 1)), int(rng.integers(h - kh + 1))
        im = im.crop((x, y, x + kw, y + kh))
    elif kind == "jittered":
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            im = enhance(im).enhance(rng.uniform(*JITTER))
    im.save(dest, "JPEG", quality=REENCODE_QUALITY if kind == "reencoded" else JPEG_QUALITY)


# --------------------------------------------------------------------------- files


def _write_labels(labels: Path, images: list[_Image], paths: list[str], names: dict[str, list[str]],
                  rng: np.random.Generator) -> None:
    labels.mkdir(parents=True, exist_ok=True)
    for task, fname in CLASS_FILES.items():
        (labels / fname).write_text("".join(f"{i} {n}\n" for i, n in enumerate(names[task])), encoding="utf-8")
    for task in TASKS:
        for split in ("train", "val"):
            rows = [(paths[i], img.assigned[task]) for i, img in enumerate(images) if img.splits.get(task) == split]
            # The real files are shuffled, and genre_val lists one image twice.
            rows = [rows[j] for j in rng.permutation(len(rows))]
            if (task, split) == ("genre", "val") and rows:
                rows.insert(len(rows) // 2, rows[0])
            if task == "artist":
                body = "".join(f"{p},,{c}\n" for p, c in rows)
                text = f"{ARTIST_HEADER[split]}\n\n{body}"
                (labels / ARTIST_FILES[split]).write_text(text, encoding="utf-8", newline="")
            else:
                text = "".join(f"{p},{c}\r\n" for p, c in rows)
                (labels / CSV_FILES[task, split]).write_text(text, encoding="utf-8", newline="")


def _split_of(img: _Image) -> str:
    return "val" if "val" in img.splits.values() else "train"


def _check_counts(counts: dict[str, int]) -> None:
    """Class counts come from flags, not the config (whose ranges were checked when it was built)."""
    limits = {"style": len(STYLES), "artist": len(ARTISTS), "genre": len(GENRES)}
    for task, k in counts.items():
        if not 2 <= k <= limits[task]:
            raise ConfigError(f"number of {task} classes must be 2..{limits[task]}, got {k}")


def make_corpus(cfg: SynthConfig, num_styles: int = DEFAULT_COUNTS["style"],
                num_artists: int = DEFAULT_COUNTS["artist"], num_genres: int = DEFAULT_COUNTS["genre"]) -> dict:
    """Write cfg.out/images, cfg.out/labels, cfg.out/planted_noise.csv and planted_duplicates.csv; return a summary.

    Deterministic: the same config gives byte-identical files. Rerunning into the same folder
    replaces the corpus (pictures of the earlier run are removed).
    """
    counts = {"style": num_styles, "artist": num_artists, "genre": num_genres}
    _check_counts(counts)
    start = time.perf_counter()
    out = Path(cfg.out)
    chosen = {"style": STYLES[:num_styles], "artist": ARTISTS[:num_artists], "genre": GENRES[:num_genres]}
    names = {t: sorted(chosen[t]) for t in TASKS}
    # Generator index -> alphabetical class index, so labels match the class files.
    to_label = {t: [names[t].index(c) for c in chosen[t]] for t in TASKS}
    seq = np.random.SeedSequence(cfg.seed)
    plan_seq, noise_seq, file_seq, draw_seq, copy_seq = seq.spawn(5)  # the fifth: corpora without copies unchanged
    images = _plan(cfg.images, counts, np.random.default_rng(plan_seq))
    planted = _plant_noise(images, counts, cfg.noise, np.random.default_rng(noise_seq))
    for img in images:
        img.assigned = {t: to_label[t][c] for t, c in img.assigned.items()}
    paths = [f"{img.folder(names['style'])}/{img.slug}_{img.title}.jpg" for img in images]

    for img, path, child in zip(images, paths, draw_seq.spawn(len(images))):
        dest = out / "images" / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        pixels = _draw(img, num_styles, cfg.size, np.random.default_rng(child))
        Image.fromarray(pixels).save(dest, "JPEG", quality=JPEG_QUALITY)
    copy_rng = np.random.default_rng(copy_seq)
    copies = _plant_copies(images, paths, cfg.duplicates, names, copy_rng)
    for i, copy, path, kind in copies:
        (out / "images" / path).parent.mkdir(parents=True, exist_ok=True)
        _copy_picture(out / "images" / paths[i], out / "images" / path, kind, copy_rng)
    originals = [paths[i] for i, *_ in copies]
    images += [copy for _, copy, _, _ in copies]
    paths += [path for _, _, path, _ in copies]
    # Pictures of an earlier run into the same folder would otherwise linger beside the new ones.
    for stale in set((out / "images").glob("*/*.jpg")) - {out / "images" / p for p in paths}:
        stale.unlink()
    _write_labels(out / "labels", images, paths, names, np.random.default_rng(file_seq))

    with open(out / PLANTED_NAME, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(PLANTED_FIELDS)
        for (i, copy, path, kind), original in sorted(zip(copies, originals), key=lambda c: c[0][2]):
            writer.writerow([path, original, kind, _split_of(copy), _split_of(images[i])])
    # planted_noise.csv last: launch.sh takes its presence to mean a complete corpus.
    with open(out / "planted_noise.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "task", "true_label", "assigned_label", "true_class", "assigned_class"])
        for i, task in sorted(planted, key=lambda p: (paths[p[0]], TASKS.index(p[1]))):
            true = to_label[task][(images[i].style, images[i].artist, images[i].genre)[TASKS.index(task)]]
            assigned = images[i].assigned[task]
            writer.writerow([paths[i], task, true, assigned, names[task][true], names[task][assigned]])

    per_task = {t: {s: sum(img.splits.get(t) == s for img in images) for s in ("train", "val")} for t in TASKS}
    return {
        "out": str(out),
        "images": len(images),
        "size": cfg.size,
        "classes": names,
        "labelled": per_task,
        "planted_noise": len(planted),
        "planted_duplicates": len(copies),
        "seconds": round(time.perf_counter() - start, 2),
    }
