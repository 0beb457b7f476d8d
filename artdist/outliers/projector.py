"""TensorBoard's embedding projector: a bounded set of a split's embeddings with thumbnail sprites and labels."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from artdist.data.manifest import Manifest
from artdist.outliers.ranking import combined_score, descending_ranks
from artdist.outliers.report import SampleRef, read_images
from artdist.outliers.scores import TaskScores

SPRITE_SIDE = 64  # px per painting in the sprite sheet (TensorBoard caps the sheet at 8192 px a side)


def _priority(ids: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random order of ids (Knuth's multiplicative hash), the same on every rank and run."""
    return (ids.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)


def _worst_combined(ids: np.ndarray, per_task: dict[str, TaskScores]) -> np.ndarray:
    """Per id, the highest combined score over the tasks it is labelled in (-inf where in none)."""
    worst = np.full(len(ids), -np.inf)
    for scores in per_task.values():
        pos = np.searchsorted(ids, scores.ids).clip(0, max(len(ids) - 1, 0))
        here = ids[pos] == scores.ids if len(ids) else np.zeros(len(scores.ids), bool)
        np.maximum.at(worst, pos[here], combined_score(scores)[here])
    return worst


def _choose(ids: np.ndarray, worst: np.ndarray, count: int) -> np.ndarray:
    """Positions of the chosen samples: the ceil(count/2) worst combined scores, then the fixed sample."""
    top = descending_ranks(worst, ids) <= math.ceil(count / 2)
    rest = np.flatnonzero(~top)
    fill = rest[np.lexsort((ids[rest], _priority(ids[rest])))][: max(0, count - int(top.sum()))]
    return np.sort(np.concatenate([np.flatnonzero(top), fill]))


def candidates(ids: np.ndarray, embeddings: np.ndarray, per_task: dict[str, TaskScores],
               count: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's share of what rank 0 may choose: its own choice of 2 x count (a superset of what
    the global choice takes from this rank), so ranks send O(count) embeddings, not the split."""
    order = np.argsort(ids)
    ids, embeddings = ids[order], embeddings[order]
    keep = _choose(ids, _worst_combined(ids, per_task), 2 * count)
    return ids[keep], embeddings[keep]


def select(parts: list[tuple[np.ndarray, np.ndarray]], per_task: dict[str, TaskScores],
           count: int) -> tuple[np.ndarray, np.ndarray]:
    """The chosen ids (sorted) and embeddings from every rank's candidates: identical for any number of ranks."""
    ids = np.concatenate([p[0] for p in parts])
    embeddings = np.concatenate([p[1] for p in parts])
    order = np.argsort(ids)
    ids, embeddings = ids[order], embeddings[order]
    keep = _choose(ids, _worst_combined(ids, per_task), count)
    return ids[keep], embeddings[keep]


def metadata(ids: np.ndarray, per_task: dict[str, TaskScores], classes: dict[str, list[str]],
             index: dict[int, SampleRef]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: path, then per task the label on file, the prediction and the combined outlier rank."""
    header = ["path"] + [f"{t}{suffix}" for t in per_task for suffix in ("", "_predicted", "_outlier_rank")]
    columns = [[index[int(i)].path.replace("\t", " ") for i in ids]]
    for task, scores in per_task.items():
        rank = descending_ranks(combined_score(scores), scores.ids)
        pos = np.searchsorted(scores.ids, ids).clip(0, max(len(scores.ids) - 1, 0))
        found = scores.ids[pos] == ids if len(scores.ids) else np.zeros(len(ids), bool)
        names = classes[task]
        columns.append([names[scores.assigned[p]] if f else "" for p, f in zip(pos, found)])
        columns.append([names[scores.predicted[p]] if f else "" for p, f in zip(pos, found)])
        columns.append([str(rank[p]) if f else "" for p, f in zip(pos, found)])
    return header, [list(row) for row in zip(*columns)]


def sprites(thumbs: dict[int, bytes], ids: np.ndarray) -> torch.Tensor:
    """[N, 3, SPRITE_SIDE, SPRITE_SIDE] in [0, 1]: each thumbnail letterboxed on white (grey when missing)."""
    out = torch.full((len(ids), 3, SPRITE_SIDE, SPRITE_SIDE), 0.5)
    for n, i in enumerate(ids.tolist()):
        if i not in thumbs:
            continue
        with Image.open(io.BytesIO(thumbs[i])) as img:
            img = img.convert("RGB")
            img.thumbnail((SPRITE_SIDE, SPRITE_SIDE))
            canvas = Image.new("RGB", (SPRITE_SIDE, SPRITE_SIDE), "white")
            canvas.paste(img, ((SPRITE_SIDE - img.width) // 2, (SPRITE_SIDE - img.height) // 2))
        out[n] = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255
    return out


def write_projector(writer: Any, ids: np.ndarray, embeddings: np.ndarray, per_task: dict[str, TaskScores],
                    manifest: Manifest, index: dict[int, SampleRef], shards_dir: Path, tag: str) -> None:
    """The chosen embeddings, sprites and metadata as one TensorBoard projector tensor under `tag`."""
    thumbs = {i: v[0] for i, v in read_images(shards_dir, index, set(ids.tolist()), manifest.image_ext).items()}
    header, rows = metadata(ids, per_task, manifest.classes, index)
    writer.add_embedding(torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)), metadata=rows,
                         label_img=sprites(thumbs, ids), metadata_header=header, tag=tag)
    writer.flush()
