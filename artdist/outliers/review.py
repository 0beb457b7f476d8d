"""The review page (index.html): every flagged row of every task, filtered, sorted and decided in the browser."""
from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from artdist.data.manifest import Manifest
from artdist.outliers.ranking import RANKED_SCORES, descending_ranks, finite_or_none, oriented_scores
from artdist.outliers.report import SampleRef, data_uri, read_images
from artdist.outliers.scores import TaskScores

LARGE_SIDE = 640  # px, longer side of the click-to-enlarge view (images/<id>.jpg beside index.html)
TEMPLATE = "review_page.html"
DATA_TOKEN = "__ARTDIST_DATA__"
RANKING_LABELS = {  # the page's ranking menu, in RANKED_SCORES' names
    "combined": "combined (classifier × embedding surprisal)",
    "max_softmax": "max_softmax (1 − max p)",
    "nll": "−log p(assigned)",
    "margin": "margin (best other p − p(assigned))",
    "energy": "energy",
    "mahalanobis": "distance to class mean",
    "feature_nll": "embedding −log p(assigned)",
}
# Reason kinds for the page's filter, matched on the texts of ranking.reasons_for (tested to cover them all).
REASON_KINDS = (
    ("predicted", "model predicts another class", re.compile(r"^predicted ")),
    ("low_p", "low p(assigned)", re.compile(r"^p\(")),
    ("embedding_class", "embedding nearer another class", re.compile(r"^embedding nearer|^no .* in training")),
    ("embedding_far", "embedding far from its class", re.compile(r"^embedding .*σ farther")),
    ("energy", "weak response to every class", re.compile(r"^weak response")),
    ("low_confidence", "below the max_softmax threshold", re.compile(r"^below .* confidence")),
    ("combined_top", "combined score in the top share", re.compile(r"^combined score in the top")),
)
# Lead byte of a two-byte UTF-8 sequence read as Latin-1, possibly lower-cased (WikiArt's names: Ã -> ã).
_MOJIBAKE_PAIR = re.compile("[\u00c2-\u00df\u00e2-\u00f6\u00f8-\u00fe][\u0080-\u00bf]")
_INITIAL = re.compile(r"(?:^|(?<=[\s.]))\w")  # first letter of each name and initial: m.c. escher -> M.C. Escher
_POSSESSIVE = re.compile(r"(?<=[a-z])-s(?=-|$)")  # WikiArt writes "artist's son" as artist-s-son
_YEAR = re.compile(r"-(1[0-9]{3}|20[0-9]{2})(?:-[0-9]{1,2})?$")


def repair_mojibake(text: str) -> str:
    """UTF-8 that was decoded as Latin-1 (and lower-cased, as WikiArt's file names are), decoded again.

    `joaquã\\xadn` -> `joaquín`; text that is not such mojibake comes back unchanged.
    """
    try:
        fixed = text.encode("latin-1").decode("utf-8")
        if fixed != text:
            return fixed
    except (UnicodeEncodeError, UnicodeDecodeError):
        pass

    def pair(m: re.Match) -> str:
        lead, cont = ord(m.group()[0]), ord(m.group()[1])
        if lead >= 0xE0:  # a lower-cased lead byte: upper-case Latin-1 letters are 0x20 below
            lead -= 0x20
        try:
            return bytes([lead, cont]).decode("utf-8")
        except UnicodeDecodeError:
            return m.group()

    return _MOJIBAKE_PAIR.sub(pair, text)


def parse_wikiart_name(path: str) -> dict[str, str]:
    """Artist, title and year from a WikiArt path `Style/artist-name_title-words-1890.jpg` (mojibake repaired)."""
    stem = repair_mojibake(path).rpartition("/")[2]
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    artist, sep, title = stem.partition("_")
    if not sep:
        artist, title = "", stem
    year = _YEAR.search(title)
    if year:
        title = title[:year.start()]
    words = _POSSESSIVE.sub("'s", title).replace("-", " ").strip()
    return {
        "artist": _INITIAL.sub(lambda m: m.group().upper(), " ".join(artist.replace("-", " ").split())),
        "title": words[:1].upper() + words[1:],
        "year": year.group(1) if year else "",
    }


def reason_kind(text: str) -> str:
    return next((kind for kind, _, pattern in REASON_KINDS if pattern.search(text)), "other")


def _lookup(scores: TaskScores, ids: list[int]) -> np.ndarray:
    """Position of each id in `scores` (sorted by id), -1 where the sample has no label in that task."""
    pos = np.searchsorted(scores.ids, ids)
    pos = np.minimum(pos, max(len(scores.ids) - 1, 0))
    found = (scores.ids[pos] == ids) if len(scores.ids) else np.zeros(len(ids), dtype=bool)
    return np.where(found, pos, -1)


def page_rows(task: str, rows: list[dict[str, Any]], per_task: dict[str, TaskScores], combined: np.ndarray,
              classes: dict[str, list[str]], planted: set[tuple[str, str]] | None) -> list[dict[str, Any]]:
    """One task's report rows as the page shows them: score and rank under every ranking, the painting's
    labels and predictions in the other tasks, the reason kinds, the planted mark."""
    scores = per_task[task]
    oriented = oriented_scores(scores, combined)
    ranks = {name: descending_ranks(oriented[name], scores.ids) for name in RANKED_SCORES}
    ids = [r["id"] for r in rows]
    here = _lookup(scores, ids)
    others = {t: _lookup(s, ids) for t, s in per_task.items() if t != task}
    out = []
    for n, row in enumerate(rows):
        i = int(here[n])
        other = {}
        for t, pos in others.items():
            j = int(pos[n])
            if j >= 0:
                other[t] = [classes[t][per_task[t].assigned[j]], classes[t][per_task[t].predicted[j]]]
        out.append({
            "task": task, "id": row["id"], "assigned": row["assigned"], "predicted": row["predicted"],
            "max_softmax": row["max_softmax"], "p_assigned": row["p_assigned"],
            "feature_predicted": row["feature_predicted"],
            "scores": {name: finite_or_none(float(oriented[name][i])) for name in RANKED_SCORES},
            "ranks": {name: int(ranks[name][i]) for name in RANKED_SCORES},
            "reasons": row["reasons"], "kinds": sorted({reason_kind(r) for r in row["reasons"]}),
            "planted": planted is not None and (task, row["path"]) in planted,
            "others": other,
            "copy_labels": row["copy_labels"], "several_classes": row["several_classes"],
        })
    return out


def original_uri(images_dir: str, path: str) -> str | None:
    """file:// address of the original image when the folder `artdist shard` read is reachable from here."""
    if not images_dir:
        return None
    full = Path(images_dir) / path
    return full.resolve().as_uri() if full.is_file() else None


def render_page(data: dict[str, Any]) -> str:
    """The page: the template with `data` inlined as JSON (no `</` inside, so no tag can close early)."""
    template = resources.files("artdist.outliers").joinpath(TEMPLATE).read_text(encoding="utf-8")
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    return template.replace(DATA_TOKEN, blob)


def write_page(out_dir: Path, pages: dict[str, dict[str, Any]], per_task: dict[str, TaskScores], manifest: Manifest,
               index: dict[int, SampleRef], shards_dir: Path, planted: set[tuple[str, str]] | None,
               summary: dict[str, Any], title: str, page_rows_max: int, storage_key: str) -> dict[int, bytes]:
    """index.html + images/<id>.jpg (the enlarged views); returns the thumbnails (JPEG bytes) it read.

    `pages[task]` holds "rows" (the task's report rows in combined rank order), "combined" (the
    combined score of every scored sample) and "typical" (class -> central samples).
    """
    rows = []
    for task, page in pages.items():
        rows += page_rows(task, page["rows"][:page_rows_max], per_task, page["combined"], manifest.classes,
                          planted)
    typical = {task: {cls: [r["id"] for r in members] for cls, members in page["typical"].items()}
               for task, page in pages.items()}
    ids = {r["id"] for r in rows} | {i for t in typical.values() for members in t.values() for i in members}
    images = read_images(shards_dir, index, ids, manifest.image_ext, (LARGE_SIDE,))
    large_dir = out_dir / "images"
    large_dir.mkdir(parents=True, exist_ok=True)
    for i, (_, large) in images.items():
        (large_dir / f"{i}.jpg").write_bytes(large)
    images_dir = manifest.extra.get("options", {}).get("images", "")
    paths = {i: index[i].path for i in sorted(ids)}
    data = {
        "title": title, "split": summary["split"], "storage_key": storage_key,
        "num_samples": summary["num_samples"], "threshold": summary["threshold"],
        "flag_fraction": summary["flag_fraction"], "combined": summary["combined"],
        "tasks": list(pages), "classes": {t: manifest.classes[t] for t in pages},
        "rankings": [[name, RANKING_LABELS.get(name, name)] for name in RANKED_SCORES],
        "reason_kinds": [[kind, label] for kind, label, _ in REASON_KINDS],
        "summaries": {t: pages[t]["summary"] for t in pages},
        "flagged": {t: len(pages[t]["rows"]) for t in pages},
        "quality": {t: s["quality"] for t, s in summary["tasks"].items() if "quality" in s} or None,
        "links": {"summary": "summary.json", "csv": {t: f"{t}.csv" for t in pages},
                  "json": {t: f"{t}.json" for t in pages}},
        "paths": paths,
        "names": {i: parse_wikiart_name(p) for i, p in paths.items()},
        "display_paths": {i: repair_mojibake(p) for i, p in paths.items()},
        "originals": {i: uri for i, p in paths.items() if (uri := original_uri(images_dir, p))},
        "thumbs": {i: data_uri(images[i][0]) for i in sorted(images)},
        "large": {i: f"images/{i}.jpg" for i in sorted(images)},
        "typical": typical,
        "rows": rows,
    }
    (out_dir / "index.html").write_text(render_page(data), encoding="utf-8")
    return {i: v[0] for i, v in images.items()}
