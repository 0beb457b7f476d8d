"""Outlier report files: sample lookup in shards, thumbnails, ranked CSV/JSON, TensorBoard grid."""
from __future__ import annotations

import base64
import csv
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from artdist.data.manifest import Manifest, member_key

THUMB_SIDE = 128  # px, longer side: ~4 KB a JPEG, inlined in index.html
CAPTION_HEIGHT = 34  # px under each TensorBoard grid cell: two lines of PIL's default font
GRID_COLUMNS = 8
GRID_MAX = 32  # outliers per task in the TensorBoard grid

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # OWASP's list for CSV injection

ROW_FIELDS = (
    "rank", "id", "path", "assigned", "predicted", "combined", "max_softmax", "p_assigned", "margin",
    "energy", "mahalanobis", "mahalanobis_z", "feature_predicted", "feature_p_assigned", "flagged_max_softmax",
    "flagged_combined", "copy_labels", "several_classes", "reasons",
)


@dataclass(frozen=True)
class SampleRef:
    """Where one sample lives in the shards."""

    path: str
    shard: str
    key: str


def read_sample_index(manifest: Manifest, split: str) -> dict[int, SampleRef]:
    """id -> (path, shard, key) from the json members of a split's shards; image bytes are skipped."""
    return {int(s.meta["id"]): SampleRef(s.meta["path"], s.shard, s.key) for s in manifest.samples(split)}


def read_images(shards_dir: Path, index: dict[int, SampleRef], ids: set[int], image_ext: str,
                larger: tuple[int, ...] = ()) -> dict[int, tuple[bytes, ...]]:
    """JPEGs of the given ids, a THUMB_SIDE thumbnail then one per `larger` side (never upscaled),
    reading only the shards that hold them."""
    wanted: dict[str, dict[str, int]] = {}
    for i in ids:
        ref = index[i]
        wanted.setdefault(ref.shard, {})[ref.key] = i
    out: dict[int, tuple[bytes, ...]] = {}
    for shard, keys in wanted.items():
        with tarfile.open(Path(shards_dir) / shard) as tar:
            for member in tar:
                key, ext = member_key(member.name)
                if ext != image_ext or key not in keys:
                    continue
                with Image.open(tar.extractfile(member)) as img:
                    img = img.convert("RGB")
                    versions = []
                    for side in sorted((THUMB_SIDE, *larger), reverse=True):
                        img.thumbnail((side, side))
                        buf = io.BytesIO()
                        img.save(buf, format="JPEG", quality=80 if side == THUMB_SIDE else 85)
                        versions.append(buf.getvalue())
                out[keys[key]] = tuple(versions[::-1])
    return out


def csv_cell(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula (=, +, -, @, tab, CR first) gets a leading "'"; numbers
    stay numbers (a negative margin is data, not a formula)."""
    if isinstance(value, str) and value[:1] in FORMULA_STARTS:
        return "'" + value
    return value


def write_rows(rows: list[dict[str, Any]], csv_path: Path, json_path: Path, meta: dict[str, Any]) -> None:
    """One task's ranked rows as CSV (reasons '; '-joined, flags yes/no) and as JSON with `meta`."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ROW_FIELDS)  # rows may add columns
        out.writeheader()
        for row in rows:
            flat = dict(row)
            flat["reasons"] = "; ".join(row["reasons"])
            flat["copy_labels"] = " ".join(row.get("copy_labels", []))
            for flag in ("flagged_max_softmax", "flagged_combined", "several_classes"):
                flat[flag] = "yes" if row.get(flag) else "no"
            out.writerow({key: csv_cell(value) for key, value in flat.items()})
    json_path.write_text(json.dumps({**meta, "rows": rows}, indent=1))


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def outlier_grid(rows: list[dict[str, Any]], thumbs: dict[int, bytes], side: int = THUMB_SIDE) -> np.ndarray:
    """Captioned image grid (HWC uint8) of ranked rows, for `SummaryWriter.add_image(dataformats="HWC")`."""
    cols = min(GRID_COLUMNS, max(1, len(rows)))
    nrows = max(1, -(-len(rows) // cols))
    cell_h = side + CAPTION_HEIGHT
    canvas = Image.new("RGB", (cols * side, nrows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for n, row in enumerate(rows):
        x, y = (n % cols) * side, (n // cols) * cell_h
        if row["id"] in thumbs:
            with Image.open(io.BytesIO(thumbs[row["id"]])) as img:
                canvas.paste(img.convert("RGB"), (x + (side - img.width) // 2, y + (side - img.height) // 2))
        draw.text((x + 2, y + side + 2), f"#{row['rank']} filed {row['assigned']}"[:24], fill="black", font=font)
        draw.text((x + 2, y + side + 17), f"pred {row['predicted']} {row['max_softmax']:.2f}"[:24],
                  fill="firebrick", font=font)
    return np.asarray(canvas)


def write_grids(pages: dict[str, list[dict[str, Any]]], thumbs: dict[int, bytes], tag: str, writer: Any) -> None:
    """One captioned TensorBoard grid of ranked rows per task (`pages[task]`), under `tag`/task."""
    for task, rows in pages.items():
        writer.add_image(f"{tag}/{task}", outlier_grid(rows[:GRID_MAX], thumbs), dataformats="HWC")
    writer.flush()


def quality_table(split: str, quality: dict[str, dict[str, Any]]) -> str:
    """Text table of detection quality per task and score (max_softmax first, combined last)."""
    def fmt(x: float | None) -> str:
        return "  n/a" if x is None else f"{x:5.3f}"

    extra = next(iter(quality.values()))["extra_k"] if quality else 0
    lines = [f"planted-noise detection on '{split}': AUROC, precision@k (k = planted in the split) and @{extra}",
             f"{'task':8s} {'planted':>9s}  {'score':12s} {'AUROC':>5s}  {'P@k':>5s}  {'P@' + str(extra):>5s}"]
    for task, q in quality.items():
        for n, (name, s) in enumerate(q["scores"].items()):
            head = f"{task:8s} {str(q['planted']) + '/' + str(q['scored']):>9s}" if n == 0 else " " * 18
            lines.append(f"{head}  {name:12s} {fmt(s['auroc'])}  {fmt(s['precision_at_k'])}  "
                         f"{fmt(s['precision_at_extra_k'])}")
    return "\n".join(lines)
