"""Parse the ArtGAN label files, join the three tasks per image, report anomalies, assign splits.

Parsing rules (the files are read as bytes and split on LF, so a stray CR, a BOM or mojibake
characters that Python counts as line breaks never change a path or a line number):
- a row is `path,index` (style, genre) or `path,,index` (artist); paths are kept exactly as
  written, since the double-encoded UTF-8 in them is the file name on disk;
- blank lines are skipped; a first non-blank line whose index is not a number is a header
  (the artist files have one) and is reported under `header_lines`;
- any other row that cannot be used (not UTF-8, no index, index not an integer, index outside
  the class file, empty or escaping path) is reported with file, line, text and reason;
- a task whose class file is missing or empty, or whose train and val files are both missing,
  is unknown for every image: its label is -1 and `classes[task]` is empty.

Within one task an image listed more than once keeps the label of its first row, train files
being read before val files (so a train label wins over a val one); all its rows are reported
(`conflicting_labels` when labels differ, `duplicate_rows` for each repeated path+label). Its
per-task split is 'val' when any of its rows in that task is in the val file.

Splits (`assign_splits`):
- `artgan`: the official train/val. An image that ANY task puts in val goes to val, keeping all
  its known labels, so nothing evaluated in val is ever trained on (566 images of the real files
  are in train for one task and val for another). `test` is then carved out of the rest: per
  style class, the train images sorted by sha1(seed:path) give their lowest round(fraction * n)
  to test (rare styles still get test images); images without a style go to test when their
  hash falls below the fraction.
- `random`: a stratified 60/20/20 train/val/test; the stratum is the style label (or the first
  known label in TASKS order); within a stratum images are sorted by sha1(seed:path) and cut.
Both then keep the copies of a painting together: a file name in several style folders is one
painting filed under several styles (1,349 of the real files), and all its copies take the split
of the copy nearest evaluation (val, then test, then train), so no painting is both trained on
and evaluated. Both depend only on the paths, labels and seed: stable across runs, machines and
Python versions.

Copies share `Record.painting_id` (`painting_id(path)`: 63 bits of sha1 of the file name, the
path after its last '/'); `multi_filed` reports their groups with counts per split combination.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

from artdist.config import TASKS
from artdist.errors import UserError

# task -> (class file, train file, val file), named as in the ArtGAN release.
LABEL_FILES = {
    "style": ("style_class.txt", "style_train.csv", "style_val.csv"),
    "artist": ("artist_class", "artist_train", "artist_val"),
    "genre": ("genre_class", "genre_train.csv", "genre_val.csv"),
}
# Other spellings a user's copy may have; the ArtGAN name is tried first.
NAME_VARIANTS = ("", ".txt", ".csv")
ANOMALY_KINDS = (
    "missing_files",
    "missing_tasks",
    "header_lines",
    "unparseable_rows",
    "label_out_of_range",
    "duplicate_rows",
    "conflicting_labels",
    "cross_task_split",
    "style_folder_mismatch",
    "multi_filed",
)
INDEX = re.compile(r"-?[0-9]+")
MAX_EXAMPLES = 10
MAX_TEXT = 200
SPLITS = ("train", "val", "test")
RANDOM_FRACTIONS = (0.6, 0.2, 0.2)
STYLE = TASKS.index("style")
CONFLICT_RULE = "the first row wins (train files are read before val files)"


@dataclass(frozen=True)
class Record:
    """One image: its path as in the label files and its label per task (TASKS order)."""

    path: str
    id: int  # index in the catalog sorted by path
    labels: tuple[int, int, int]  # -1: unknown
    source_split: tuple[str, str, str]  # 'train' | 'val' | '' (not in that task)
    painting_id: int = -1  # shared by the copies of one painting (painting_id(path))


@dataclass
class Catalog:
    """All images named by the label files, sorted by path (ids 0..N-1)."""

    records: list[Record]
    classes: dict[str, list[str]]  # task -> class names by index; empty: task unavailable
    anomalies: dict  # kind -> {"count": n, "examples": [...]}, JSON-serialisable
    rows: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> split -> usable rows

    def summary(self) -> str:
        """A human-readable report: images, classes and rows per task and split, anomalies."""
        lines = [f"{len(self.records):,} images"]
        for t, task in enumerate(TASKS):
            if not self.classes.get(task):
                lines.append(f"  {task:<6}  unavailable (see missing_tasks)")
                continue
            images = Counter(r.source_split[t] for r in self.records if r.source_split[t])
            rows = self.rows.get(task, {})
            lines.append(
                f"  {task:<6}  {len(self.classes[task])} classes; "
                f"rows train {rows.get('train', 0):,} val {rows.get('val', 0):,}; "
                f"images train {images['train']:,} val {images['val']:,}"
            )
        found = [(k, v) for k, v in self.anomalies.items() if v["count"]]
        lines.append("label-file anomalies (all listed in manifest.json):" if found else "label-file anomalies: none")
        lines.extend(f"  {describe_anomaly(kind, entry)}" for kind, entry in found)
        return "\n".join(lines)


# Anomalies the real ArtGAN files have, with their counts there: reported, handled, and nothing to fix.
WIKIART_ANOMALIES = {"header_lines": 2, "conflicting_labels": 1, "cross_task_split": 566, "style_folder_mismatch": 4334,
                     "multi_filed": 1349}


def describe_anomaly(kind: str, entry: dict) -> str:
    """One readable line for one anomaly kind: what it is, what was done, an example, and whether the
    real WikiArt label files have it too."""
    n, examples = entry["count"], entry["examples"]
    first = examples[0] if examples else {}
    where = f"{first.get('file')} line {first.get('line')}" if "line" in first else ""
    if kind == "missing_files":
        text = f"{n:,} label file(s) missing: {', '.join(e['file'] for e in examples)}"
    elif kind == "missing_tasks":
        text = f"{n:,} task(s) without labels: " + "; ".join(f"{e['task']} ({e['reason']})" for e in examples)
    elif kind == "header_lines":
        text = f"{n:,} header line(s) skipped ({', '.join(e['file'] for e in examples)})"
    elif kind in ("unparseable_rows", "label_out_of_range"):
        what = "row(s) that cannot be used" if kind == "unparseable_rows" else "row(s) with a label outside the class file"
        text = f"{n:,} {what}, skipped; e.g. {where}: {first.get('reason', '')}"
    elif kind == "duplicate_rows":
        text = f"{n:,} repeated row(s) (same image, same label), read once; e.g. {first.get('task')} {first.get('path')}"
    elif kind == "conflicting_labels":
        said = ", ".join(f"{r['file']} line {r['line']} says {r['label']}" for r in first.get("rows", []))
        text = (f"{n:,} image(s) with two different labels in one task: {CONFLICT_RULE}; e.g. {first.get('task')} "
                f"{first.get('path')}: {said}")
    elif kind == "cross_task_split":
        splits = ", ".join(f"{t} {s}" for t, s in first.get("splits", {}).items())
        text = (f"{n:,} image(s) in train for one task and val for another (the artgan split puts "
                f"them in val for every task); e.g. {first.get('path')} ({splits})")
    elif kind == "style_folder_mismatch":
        text = f"{n:,} image(s) in a folder not named after their style: " + ", ".join(
            f"{e['folder']}/ holds {e['class']} ({e['count']:,})" for e in examples)
    elif kind == "multi_filed":
        by_splits = ", ".join(f"{k} {m:,}" for k, m in entry.get("by_splits", {}).items())
        text = (f"{n:,} painting(s) filed under several style folders (by split: {by_splits}); "
                f"{entry.get('rule', '')}; e.g. " + ", ".join(c["path"] for c in first.get("copies", [])))
    else:
        text = f"{n:,} {kind.replace('_', ' ')}; e.g. {first}"
    if kind in WIKIART_ANOMALIES:
        text += f" -- expected for WikiArt (the ArtGAN files have {WIKIART_ANOMALIES[kind]:,})"
    return text


class _Row(NamedTuple):
    label: int
    split: str
    file: str
    line: int


def _note(anomalies: dict, kind: str, example: dict, count: int = 1) -> None:
    entry = anomalies[kind]
    entry["count"] += count
    if len(entry["examples"]) < MAX_EXAMPLES:
        entry["examples"].append(example)


def _bad_row(anomalies: dict, kind: str, file: str, line: int, text: str, reason: str) -> None:
    _note(anomalies, kind, {"file": file, "line": line, "text": text[:MAX_TEXT], "reason": reason})


def _find(labels_dir: Path, name: str) -> Path | None:
    stem = name.rsplit(".", 1)[0] if name.endswith((".txt", ".csv")) else name
    for candidate in (name, *(stem + ext for ext in NAME_VARIANTS)):
        if (labels_dir / candidate).is_file():
            return labels_dir / candidate
    return None


def _lines(path: Path, anomalies: dict) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank lines; lines that are not UTF-8 are reported."""
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            _bad_row(anomalies, "unparseable_rows", path.name, number,
                     raw.decode("utf-8", "replace"), "not valid UTF-8")
            continue
        if text.strip():
            yield number, text


def _read_classes(path: Path, anomalies: dict) -> list[str]:
    """`<index> <Name>` lines -> names by index; indices must be exactly 0..K-1."""
    names: dict[int, str] = {}
    for number, text in _lines(path, anomalies):
        parts = text.strip().split(None, 1)
        if len(parts) != 2 or not (parts[0].isascii() and parts[0].isdigit()):
            _bad_row(anomalies, "unparseable_rows", path.name, number, text,
                     "expected '<index> <class name>'")
            continue
        index = int(parts[0])
        if index in names:
            raise UserError(f"{path}: line {number} repeats class index {index}; "
                            "each class needs its own index 0..K-1")
        names[index] = parts[1].strip()
    if sorted(names) != list(range(len(names))):
        missing = sorted(set(range(max(names) + 1)) - set(names))
        raise UserError(f"{path}: class indices must run 0..K-1 without gaps; missing {missing[:10]}")
    return [names[i] for i in range(len(names))]


def _parse_row(text: str) -> tuple[str, str] | str:
    """(path, index text) of a `path,index` or `path,,index` row, or the reason it is unusable."""
    if "," not in text:
        return "expected 'path,index' or 'path,,index'"
    head, index = text.rsplit(",", 1)
    path = head.rstrip(",").strip(" \t")
    if not path:
        return "empty path"
    if path.startswith("/") or ".." in path.split("/"):
        return "path must be relative to the images folder, without '..'"
    return path, index.strip(" \t")


def _read_rows(path: Path, task: str, split: str, num_classes: int, anomalies: dict,
               rows: dict[str, list[_Row]]) -> int:
    """Add a train/val file's rows to `rows` (path -> rows); returns the usable row count."""
    used = 0
    first = True
    name = path.name
    for number, text in _lines(path, anomalies):
        parsed = _parse_row(text)
        is_header = first and (isinstance(parsed, str) or not INDEX.fullmatch(parsed[1]))
        first = False
        if is_header:
            _note(anomalies, "header_lines", {"file": name, "line": number, "text": text[:MAX_TEXT]})
            continue
        if isinstance(parsed, str):
            _bad_row(anomalies, "unparseable_rows", name, number, text, parsed)
            continue
        image, index = parsed
        if not INDEX.fullmatch(index):
            _bad_row(anomalies, "unparseable_rows", name, number, text,
                     f"class index {index!r} is not an integer")
            continue
        label = int(index)
        if not 0 <= label < num_classes:
            _bad_row(anomalies, "label_out_of_range", name, number, text,
                     f"class index {label} outside 0..{num_classes - 1} of the {task} class file")
            continue
        rows[image].append(_Row(label, split, name, number))
        used += 1
    return used


def _resolve(task: str, image: str, rows: list[_Row], anomalies: dict) -> tuple[int, str]:
    """One label and split for an image listed one or more times in a task's files."""
    if len(rows) == 1:
        return rows[0].label, rows[0].split
    split = "val" if any(r.split == "val" for r in rows) else "train"
    label = rows[0].label  # train files are read first, so a train row wins over a val row
    where = [{"file": r.file, "line": r.line, "label": r.label} for r in rows]
    if len({r.label for r in rows}) > 1:
        _note(anomalies, "conflicting_labels",
              {"task": task, "path": image, "rows": where, "kept": label, "rule": CONFLICT_RULE})
    repeats = Counter(r.label for r in rows)
    for repeated, n in repeats.items():
        if n > 1:
            _note(anomalies, "duplicate_rows",
                  {"task": task, "path": image, "label": repeated,
                   "rows": [w for w in where if w["label"] == repeated]}, count=n - 1)
    return label, split


def load_catalog(labels_dir: str | Path) -> Catalog:
    """Read the nine ArtGAN label files in `labels_dir` into one record per image."""
    labels_dir = Path(labels_dir)
    expected = ", ".join(name for names in LABEL_FILES.values() for name in names)
    if not labels_dir.is_dir():
        raise UserError(f"labels folder {labels_dir} does not exist; it should hold the ArtGAN "
                        f"label files ({expected})")
    anomalies: dict = {kind: {"count": 0, "examples": []} for kind in ANOMALY_KINDS}
    classes: dict[str, list[str]] = {}
    row_counts: dict[str, dict[str, int]] = {}
    resolved: dict[str, dict[str, tuple[int, str]]] = {}
    for task, names in LABEL_FILES.items():
        paths = [_find(labels_dir, name) for name in names]
        for name, path in zip(names, paths):
            if path is None:
                _note(anomalies, "missing_files", {"task": task, "file": name})
        class_file, *split_files = paths
        names_by_index = _read_classes(class_file, anomalies) if class_file else []
        if class_file is None:
            reason = f"no {names[0]}"
        elif not names_by_index:
            reason = f"{class_file.name} lists no classes"
        elif not any(split_files):
            reason = f"neither {names[1]} nor {names[2]}"
        else:
            reason = ""
        if reason:
            _note(anomalies, "missing_tasks", {"task": task, "reason": f"{reason}: labels unknown"})
            classes[task] = []
            continue
        classes[task] = names_by_index
        rows: dict[str, list[_Row]] = defaultdict(list)
        row_counts[task] = {
            split: _read_rows(path, task, split, len(names_by_index), anomalies, rows)
            for split, path in zip(("train", "val"), split_files) if path is not None
        }
        resolved[task] = {image: _resolve(task, image, r, anomalies) for image, r in rows.items()}
    if not resolved:
        raise UserError(f"no usable ArtGAN label files in {labels_dir}: expected {expected} "
                        "(each task needs its class file and a train or val file)")

    records = []
    for i, image in enumerate(sorted(set().union(*resolved.values()))):
        found = [resolved.get(task, {}).get(image, (-1, "")) for task in TASKS]
        record = Record(image, i, tuple(f[0] for f in found), tuple(f[1] for f in found), painting_id(image))
        records.append(record)
        if {"train", "val"} <= set(record.source_split):
            _note(anomalies, "cross_task_split",
                  {"path": image, "splits": {t: s for t, s in zip(TASKS, record.source_split) if s}})
    _note_folder_mismatches(records, classes["style"], anomalies)
    _note_multi_filed(records, classes, anomalies)
    return Catalog(records, classes, anomalies, row_counts)


def painting_id(path: str) -> int:
    """The id shared by a painting's copies: 63 bits of sha1(file name), the same everywhere."""
    name = path.rsplit("/", 1)[-1]
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") >> 1


def copies(records: list[Record]) -> list[list[int]]:
    """Record indices of each painting with more than one record (same file name), in path order."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[r.painting_id].append(i)
    return [members for members in groups.values() if len(members) > 1]


def _style_file_split(record: Record) -> str:
    """The style file (train/val) that lists the record; for a record without a style, any task's."""
    return record.source_split[STYLE] or ("val" if "val" in record.source_split else "train")


def _note_multi_filed(records: list[Record], classes: dict[str, list[str]], anomalies: dict) -> None:
    """One painting filed under several style folders: one entry per group, counted per combination of
    the style files (train/val) its rows are in."""
    by_splits: Counter = Counter()
    for members in copies(records):
        group = [records[i] for i in members]
        by_splits["/".join(sorted(_style_file_split(r) for r in group))] += 1
        _note(anomalies, "multi_filed", {
            "painting_id": group[0].painting_id,
            "copies": [{"path": r.path, "split": _style_file_split(r),
                        **{task: classes[task][r.labels[t]] for t, task in enumerate(TASKS) if r.labels[t] >= 0}}
                       for r in group]})
    anomalies["multi_filed"]["by_splits"] = dict(sorted(by_splits.items()))
    anomalies["multi_filed"]["rule"] = "all copies take the split nearest evaluation (val, test, train)"


def _note_folder_mismatches(records: list[Record], styles: list[str], anomalies: dict) -> None:
    """Count images whose top folder is not their style's class name, per folder/class pair."""
    pairs: Counter = Counter()
    for r in records:
        folder = r.path.split("/", 1)[0] if "/" in r.path else ""
        if folder and r.labels[STYLE] >= 0 and folder != styles[r.labels[STYLE]]:
            pairs[folder, styles[r.labels[STYLE]]] += 1
    for (folder, name), n in pairs.most_common():
        _note(anomalies, "style_folder_mismatch", {"folder": folder, "class": name, "count": n}, count=n)


def path_key(salt: object, path: str) -> int:
    """A 64-bit sort key from sha1(salt:path): the same on every machine and Python version."""
    return int.from_bytes(hashlib.sha1(f"{salt}:{path}".encode("utf-8")).digest()[:8], "big")


def assign_splits(catalog: Catalog, scheme: str, test_fraction: float = 0.1, seed: int = 0) -> list[str]:
    """'train' | 'val' | 'test' per record, in record order (see the module docstring)."""
    records = catalog.records
    keys = [path_key(seed, r.path) for r in records]
    # A painting filed under several styles is cut as one unit, led by its first copy, in a stratum of
    # its own: in a style's stratum its copies would pull other styles' counts off their fractions.
    groups = {g[0]: g for g in copies(records)}
    followers = {i for g in groups.values() for i in g[1:]}
    strata: dict[tuple[int, int], list[int]] = defaultdict(list)
    if scheme == "artgan":
        splits = _keep_copies_together(records, ["val" if "val" in r.source_split else "train" for r in records])
        for i, r in enumerate(records):
            if splits[i] != "train" or i in followers:
                continue
            if i in groups:
                strata[COPIES_STRATUM].append(i)
            elif r.labels[STYLE] >= 0:
                strata[(STYLE, r.labels[STYLE])].append(i)
            elif keys[i] < test_fraction * 2**64:
                splits[i] = "test"
        for members in strata.values():
            members.sort(key=keys.__getitem__)
            for i in members[: round(test_fraction * len(members))]:
                splits[i] = "test"
        return _spread(groups, splits)

    splits = [""] * len(records)
    for i, r in enumerate(records):
        if i in followers:
            continue
        known = [(t, label) for t, label in enumerate(r.labels) if label >= 0]
        strata[COPIES_STRATUM if i in groups else known[0] if known else (-1, -1)].append(i)
    for members in strata.values():
        members.sort(key=keys.__getitem__)
        n = len(members)
        train_end = round(RANDOM_FRACTIONS[0] * n)
        val_end = round((RANDOM_FRACTIONS[0] + RANDOM_FRACTIONS[1]) * n)
        for rank, i in enumerate(members):
            splits[i] = "train" if rank < train_end else "val" if rank < val_end else "test"
    return _spread(groups, splits)


COPIES_STRATUM = (-2, -2)
EVALUATION_ORDER = ("val", "test", "train")  # the split a painting's copies join: the first any copy has


def _spread(groups: dict[int, list[int]], splits: list[str]) -> list[str]:
    """Every copy of a painting takes the split of its first copy."""
    for lead, members in groups.items():
        for i in members:
            splits[i] = splits[lead]
    return splits


def _keep_copies_together(records: list[Record], splits: list[str]) -> list[str]:
    for members in copies(records):
        target = min((splits[i] for i in members), key=EVALUATION_ORDER.index)
        for i in members:
            splits[i] = target
    return splits


def split_counts(catalog: Catalog, splits: list[str]) -> dict:
    """{split: {"total": n, task: {class name: images}}} over train, val and test."""
    counts: dict = {
        split: {"total": 0, **{task: dict.fromkeys(catalog.classes[task], 0) for task in TASKS}}
        for split in SPLITS
    }
    for record, split in zip(catalog.records, splits, strict=True):
        counts[split]["total"] += 1
        for task, label in zip(TASKS, record.labels):
            if label >= 0:
                counts[split][task][catalog.classes[task][label]] += 1
    return counts
