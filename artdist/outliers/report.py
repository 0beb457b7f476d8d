"""Outlier report files: sample lookup in shards, ranked CSV/JSON, self-contained HTML, TensorBoard grid."""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from artdist.data.manifest import Manifest, member_key

THUMB_SIDE = 128  # px, longer side: ~4 KB a JPEG keeps index.html a few MB even for 3 tasks x top 50
CAPTION_HEIGHT = 34  # px under each TensorBoard grid cell: two lines of PIL's default font
GRID_COLUMNS = 8
GRID_MAX = 32  # outliers per task in the TensorBoard grid

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # OWASP's list for CSV injection

ROW_FIELDS = (
    "rank", "id", "path", "assigned", "predicted", "combined", "max_softmax", "p_assigned", "margin",
    "energy", "mahalanobis", "mahalanobis_z", "feature_predicted", "feature_p_assigned", "flagged_max_softmax",
    "flagged_combined", "reasons",
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


def read_thumbnails(shards_dir: Path, index: dict[int, SampleRef], ids: set[int], image_ext: str,
                    side: int = THUMB_SIDE) -> dict[int, bytes]:
    """Small JPEG thumbnails of the given ids, reading only the shards that hold them."""
    wanted: dict[str, dict[str, int]] = {}
    for i in ids:
        ref = index[i]
        wanted.setdefault(ref.shard, {})[ref.key] = i
    thumbs: dict[int, bytes] = {}
    for shard, keys in wanted.items():
        with tarfile.open(Path(shards_dir) / shard) as tar:
            for member in tar:
                key, ext = member_key(member.name)
                if ext != image_ext or key not in keys:
                    continue
                with Image.open(tar.extractfile(member)) as img:
                    img = img.convert("RGB")
                    img.thumbnail((side, side))
                    buf = io.BytesIO()
                    img.save(buf, format="JPEG", quality=80)
                thumbs[keys[key]] = buf.getvalue()
    return thumbs


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
        out = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        out.writeheader()
        for row in rows:
            flat = dict(row)
            flat["reasons"] = "; ".join(row["reasons"])
            for flag in ("flagged_max_softmax", "flagged_combined"):
                flat[flag] = "yes" if row[flag] else "no"
            out.writerow({key: csv_cell(value) for key, value in flat.items()})
    json_path.write_text(json.dumps({**meta, "rows": rows}, indent=1))


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


_CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222}
section{margin-bottom:3em} .cls{border-top:1px solid #ccc;padding:.5em 0}
.row{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
figure{margin:0;width:170px;font-size:11px;word-break:break-all}
figure.outlier{background:#fff1ee;padding:4px} figure.typical{background:#eef6ee;padding:4px}
figure img{max-width:160px;max-height:160px;display:block}
ul{padding-left:1.1em;margin:.2em 0} table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right} .label{font-weight:bold}
"""


def _figure(kind: str, row: dict[str, Any], thumbs: dict[int, str], lines: list[str]) -> str:
    uri = thumbs.get(row["id"])
    img = f'<img src="{uri}" alt="">' if uri else "<div>(no image)</div>"
    caption = "<br>".join(html.escape(line) for line in lines)
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in row.get("reasons", []) if kind == "outlier")
    return (f'<figure class="{kind}" data-id="{row["id"]}">{img}<figcaption>{caption}'
            f'{"<ul>" + reasons + "</ul>" if reasons else ""}</figcaption></figure>')


def render_html(title: str, intro_html: str, tasks: dict[str, dict[str, Any]], thumbs: dict[int, str]) -> str:
    """The page: per task, the top outliers grouped by assigned class beside that class's typical samples.

    `tasks[task]` has "summary" (a line of text), "outliers" (ranked rows) and "typical" (class name ->
    rows of its most central samples). Images are data URIs so the file works offline and when mailed.
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{intro_html}"]
    parts.append("<p>" + " · ".join(f'<a href="#task-{t}">{t}</a>' for t in tasks) + "</p>")
    for task, info in tasks.items():
        parts.append(f'<section id="task-{task}"><h2>{task}</h2><p>{html.escape(info["summary"])}</p>')
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in info["outliers"]:  # ranked, so classes appear in order of their worst outlier
            groups.setdefault(row["assigned"], []).append(row)
        for cls, rows in groups.items():
            parts.append(f'<div class="cls"><h3>filed under <span class="label">{html.escape(cls)}</span>'
                         f" — {len(rows)} outlier(s)</h3><div class='row'>")
            for row in info["typical"].get(cls, []):
                parts.append(_figure("typical", row, thumbs, ["typical " + cls, row["path"]]))
            for row in rows:
                parts.append(_figure("outlier", row, thumbs, [
                    f"#{row['rank']} {row['path']}",
                    f"predicted {row['predicted']} ({row['max_softmax']:.2f})",
                ]))
            parts.append("</div></div>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "".join(parts)


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


def write_visuals(pages: dict[str, dict[str, Any]], index: dict[int, SampleRef], shards_dir: Path, image_ext: str,
                  out_dir: Path, title: str, intro_html: str, tag: str, writer: Any = None) -> None:
    """index.html (see render_html for `pages`) and, with a writer, one TensorBoard grid per task under
    `tag`/task; thumbnails are read from the shards only for the samples shown."""
    wanted = {r["id"] for p in pages.values() for r in p["outliers"]}
    wanted |= {r["id"] for p in pages.values() for rows in p["typical"].values() for r in rows}
    thumbs = read_thumbnails(shards_dir, index, wanted, image_ext)
    uris = {i: data_uri(b) for i, b in thumbs.items()}
    (out_dir / "index.html").write_text(render_html(title, intro_html, pages, uris))
    if writer is not None:
        for task, page in pages.items():
            writer.add_image(f"{tag}/{task}", outlier_grid(page["outliers"][:GRID_MAX], thumbs), dataformats="HWC")
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
