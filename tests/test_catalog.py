"""Tests for artdist.catalog: the real ArtGAN label files, broken hand-written ones, and splits."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from artdist.data.catalog import (
    LABEL_FILES,
    Catalog,
    assign_splits,
    copies,
    painting_id,
    load_catalog,
    split_counts,
)
from artdist.errors import ConfigError, UserError
from artdist.config import TASKS, load_config

SHARED = Path(__file__).resolve().parents[2] / "shared" / "wikiart_csv"  # where the project got them
SPLITS_IN_ORDER = ("train", "val", "test")


@pytest.fixture(scope="module")
def real(real_labels) -> Catalog:
    return load_catalog(real_labels)


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"no original label files at {SHARED} to compare with")
def test_bundled_label_files_are_the_originals(real_labels):
    assert sorted(p.name for p in real_labels.iterdir()) == sorted(p.name for p in SHARED.iterdir())
    for original in SHARED.iterdir():
        assert (real_labels / original.name).read_bytes() == original.read_bytes(), original.name


def _images_per_split(catalog: Catalog) -> dict[str, Counter]:
    return {task: Counter(r.source_split[t] for r in catalog.records if r.source_split[t])
            for t, task in enumerate(TASKS)}


# --------------------------------------------------------------------------- real files


def test_real_row_and_image_counts(real):
    assert real.rows == {
        "style": {"train": 57_025, "val": 24_421},
        "artist": {"train": 13_346, "val": 5_706},
        "genre": {"train": 45_503, "val": 19_492},
    }
    images = _images_per_split(real)
    assert images["style"] == {"train": 57_025, "val": 24_421}
    assert images["artist"] == {"train": 13_346, "val": 5_706}
    # genre_val lists one image twice (with two labels): one image fewer than rows.
    assert images["genre"] == {"train": 45_503, "val": 19_491}
    assert len(real.records) == 81_446


def test_real_records_are_sorted_complete_and_in_range(real):
    paths = [r.path for r in real.records]
    assert paths == sorted(set(paths))
    assert [r.id for r in real.records] == list(range(len(real.records)))
    sizes = {task: len(names) for task, names in real.classes.items()}
    assert sizes == {"style": 27, "artist": 23, "genre": 10}
    for r in real.records:
        assert any(label >= 0 for label in r.labels)
        for t, task in enumerate(TASKS):
            assert -1 <= r.labels[t] < len(real.classes[task])
            assert (r.labels[t] == -1) == (r.source_split[t] == "")


def test_real_paths_are_kept_byte_exact(real, real_labels):
    raw = b"".join((real_labels / name).read_bytes() for names in LABEL_FILES.values() for name in names[1:])
    odd = [r.path for r in real.records if "arnold-b" in r.path or "j.-e.-h.-macdonald" in r.path]
    assert any(not p.isascii() for p in odd) and any(p.count(".") > 2 for p in odd)
    for path in odd:
        assert path.encode("utf-8") + b"," in raw
    assert any("(" in r.path for r in real.records)


def test_real_anomalies(real):
    a = real.anomalies
    json.dumps(a)  # must be JSON-serialisable for the shard manifest
    assert a["conflicting_labels"]["count"] == 1
    conflict = a["conflicting_labels"]["examples"][0]
    village = "Post_Impressionism/maurice-de-vlaminck_the-village.jpg"
    assert conflict["task"] == "genre" and conflict["path"] == village
    assert [row["file"] for row in conflict["rows"]] == ["genre_val.csv", "genre_val.csv"]
    assert len({row["label"] for row in conflict["rows"]}) == 2
    record = next(r for r in real.records if r.path == village)
    assert record.labels[TASKS.index("genre")] == conflict["kept"] == conflict["rows"][0]["label"]
    assert a["duplicate_rows"]["count"] == 0  # the genre_val repeat has two different labels
    assert a["cross_task_split"]["count"] == 566
    assert real.classes["style"][3] == "Art_Nouveau"
    assert a["style_folder_mismatch"]["examples"] == [
        {"folder": "Art_Nouveau_Modern", "class": "Art_Nouveau", "count": 4334}
    ]
    assert a["header_lines"]["count"] == 2
    for kind in ("unparseable_rows", "label_out_of_range", "missing_files", "missing_tasks"):
        assert a[kind] == {"count": 0, "examples": []}
    summary = real.summary()
    assert "81,446 images" in summary and "Art_Nouveau_Modern" in summary
    anomaly_lines = summary.split("label-file anomalies", 1)[1].splitlines()[1:]
    # one readable line per kind, no raw dicts, and the real files' anomalies are marked as expected
    assert len(anomaly_lines) == 5 and not any("{" in line for line in anomaly_lines)
    assert all(line.endswith(f"expected for WikiArt (the ArtGAN files have {n})")
               for line, n in zip(anomaly_lines, ("2", "1", "566", "4,334", "1,349")))
    assert "1 image(s) with two different labels in one task" in anomaly_lines[1]


def test_real_artgan_split(real):
    splits = assign_splits(real, "artgan", test_fraction=0.1, seed=0)
    assert len(splits) == len(real.records) and set(splits) == set(SPLITS_IN_ORDER)
    val_paintings = {r.painting_id for r in real.records if "val" in r.source_split}
    for r, split in zip(real.records, splits):
        assert (split == "val") == (r.painting_id in val_paintings)
    n = Counter(splits)
    assert abs(n["test"] / (n["train"] + n["test"]) - 0.1) < 0.005
    # stratified by style: every style's train share is carved ~10%, rare ones included (a painting's
    # copies in other styles follow it into test, so a style may get a few more)
    counts = split_counts(real, splits)
    for name in real.classes["style"]:
        carved = counts["test"]["style"][name]
        pool = carved + counts["train"]["style"][name]
        assert abs(carved - 0.1 * pool) <= 0.5 + 0.02 * pool, name
    assert counts["test"]["style"]["Action_painting"] > 0
    assert sum(c["total"] for c in counts.values()) == len(real.records)
    assert assign_splits(real, "artgan", 0.1, 0) == splits
    assert assign_splits(real, "artgan", 0.1, 1) != splits
    assert "test" not in assign_splits(real, "artgan", 0.0, 0)


def test_real_multi_filed_paintings(real):
    """1,349 file names are in two style folders: 941 pairs both in style_train, 399 both in style_val, 9 in one each."""
    entry = real.anomalies["multi_filed"]
    groups = copies(real.records)
    assert entry["count"] == len(groups) == 1349
    assert entry["by_splits"] == {"train/train": 941, "train/val": 9, "val/val": 399}
    assert sum(len(g) for g in groups) == 2698
    for members in groups:
        paths = [real.records[i].path for i in members]
        assert len({p.rsplit("/", 1)[1] for p in paths}) == 1 and len({p.split("/")[0] for p in paths}) == len(paths)
        assert len({real.records[i].painting_id for i in members}) == 1
        assert len({real.records[i].labels[TASKS.index("style")] for i in members}) == len(members)
    pieta = [e for e in entry["examples"] if any("pieta" in c["path"] for c in e["copies"])]
    assert all(e["painting_id"] == painting_id(e["copies"][0]["path"]) for e in entry["examples"])
    assert len({r.painting_id for r in real.records}) == len(real.records) - 1349
    assert ("1,349 painting(s) filed under several style folders (by split: train/train 941, train/val 9, "
            "val/val 399)") in real.summary()
    assert pieta == [] or pieta[0]["copies"][0]["style"] != pieta[0]["copies"][1]["style"]
    for scheme in ("artgan", "random"):
        splits = assign_splits(real, scheme, 0.1, 0)
        assert all(len({splits[i] for i in members}) == 1 for members in groups), scheme
        straddling = [g for g in groups if len({real.records[i].source_split[0] for i in g}) > 1]
        if scheme == "artgan":  # the evaluation side wins
            assert len(straddling) == 9 and all(splits[g[0]] == "val" for g in straddling)


def test_real_random_split(real):
    splits = assign_splits(real, "random", seed=0)
    n = Counter(splits)
    for split, share in zip(SPLITS_IN_ORDER, (0.6, 0.2, 0.2)):
        assert abs(n[split] / len(splits) - share) < 0.005
    counts = split_counts(real, splits)
    for name in ("Impressionism", "Action_painting", "Analytical_Cubism", "Art_Nouveau", "Pop_Art"):
        per_split = [counts[s]["style"][name] for s in SPLITS_IN_ORDER]
        total = sum(per_split)
        for count, share in zip(per_split, (0.6, 0.2, 0.2)):
            assert abs(count - share * total) <= 1 + 0.02 * total, (name, per_split)
    assert assign_splits(real, "random", seed=0) == splits
    other = assign_splits(real, "random", seed=7)
    assert other != splits and Counter(other) == n  # same strata sizes, different members


# --------------------------------------------------------------------------- hand-written files


def _write(path: Path, text: str, bom: bool = False) -> None:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))


@pytest.fixture
def broken(tmp_path) -> Path:
    """Style with BOM/CRLF and bad rows, genre with a header and LF, no artist files at all."""
    _write(tmp_path / "style_class.txt", "0 Baroque\r\n1 Cubism\r\n2 Art_Nouveau\r\n\r\n", bom=True)
    _write(tmp_path / "style_train.csv", (
        "Baroque/a.jpg,0\r\n"                       # 1 ok
        "Cubism/b-(1).x.y.jpg,1\r\n"                # 2 ok, parentheses and dots
        "Cubism/c.jpg,abc\r\n"                      # 3 bad index
        "Cubism/d.jpg,7\r\n"                        # 4 out of range
        "garbage without a comma\r\n"               # 5 garbage
        "Baroque/a.jpg,0\r\n"                       # 6 duplicate of line 1
        "Baroque/e.jpg,0\r\n"                       # 7 conflicts with val line 2
        "../etc/passwd,0\r\n"                       # 8 escaping path
        "Art_Nouveau_Modern/f\u00c3\u00b6.jpg,2\r\n"  # 9 ok, mojibake, folder != class name
        "\r\n\r\n"
    ), bom=True)
    _write(tmp_path / "style_val.csv", "Cubism/g.jpg,1\nBaroque/e.jpg,1\n-1 no comma here\n")
    _write(tmp_path / "genre_class", "0 portrait\n1 landscape\n")
    _write(tmp_path / "genre_train.csv", "path,label\nBaroque/a.jpg,0\nCubism/g.jpg,1\n")
    (tmp_path / "genre_val.csv").write_bytes(b"Cubism/h.jpg,1\nCubism/\xff.jpg,0\n")
    return tmp_path


def test_broken_files_are_reported_not_fatal(broken):
    c = load_catalog(broken)
    a = c.anomalies
    json.dumps(a)
    assert c.classes == {
        "style": ["Baroque", "Cubism", "Art_Nouveau"], "artist": [], "genre": ["portrait", "landscape"]
    }
    assert [r.path for r in c.records] == sorted(
        ["Baroque/a.jpg", "Cubism/b-(1).x.y.jpg", "Baroque/e.jpg", "Art_Nouveau_Modern/f\u00c3\u00b6.jpg",
         "Cubism/g.jpg", "Cubism/h.jpg"])
    assert all(r.labels[TASKS.index("artist")] == -1 for r in c.records)
    assert a["missing_tasks"]["examples"][0]["task"] == "artist"
    assert {e["file"] for e in a["missing_files"]["examples"]} == set(LABEL_FILES["artist"])

    bad = {(e["file"], e["line"]): e for e in a["unparseable_rows"]["examples"]}
    assert set(bad) == {("style_train.csv", 3), ("style_train.csv", 5), ("style_train.csv", 8),
                        ("style_val.csv", 3), ("genre_val.csv", 2)}
    assert "abc" in bad[("style_train.csv", 3)]["text"] and bad[("style_train.csv", 3)]["reason"]
    assert "UTF-8" in bad[("genre_val.csv", 2)]["reason"]
    assert a["label_out_of_range"]["count"] == 1
    out = a["label_out_of_range"]["examples"][0]
    assert (out["file"], out["line"], out["text"]) == ("style_train.csv", 4, "Cubism/d.jpg,7")

    assert a["duplicate_rows"]["count"] == 1
    assert a["duplicate_rows"]["examples"][0]["path"] == "Baroque/a.jpg"
    conflict = a["conflicting_labels"]["examples"]
    assert len(conflict) == 1 and conflict[0]["path"] == "Baroque/e.jpg" and conflict[0]["kept"] == 0
    by_path = {r.path: r for r in c.records}
    assert by_path["Baroque/e.jpg"].labels[0] == 0 and by_path["Baroque/e.jpg"].source_split[0] == "val"
    assert a["header_lines"]["examples"] == [{"file": "genre_train.csv", "line": 1, "text": "path,label"}]
    assert a["style_folder_mismatch"]["examples"] == [
        {"folder": "Art_Nouveau_Modern", "class": "Art_Nouveau", "count": 1}
    ]
    # g.jpg: genre train, style val -> cross-task, and the val side wins in the artgan split
    assert [e["path"] for e in a["cross_task_split"]["examples"]] == ["Cubism/g.jpg"]
    splits = dict(zip(by_path, assign_splits(c, "artgan", test_fraction=0.5)))
    assert splits["Cubism/g.jpg"] == "val" and splits["Baroque/e.jpg"] == "val"
    assert c.rows == {"style": {"train": 5, "val": 2}, "genre": {"train": 2, "val": 1}}
    assert "artist" in c.summary() and "unavailable" in c.summary()


def test_missing_folder_or_files_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="style_class.txt"):
        load_catalog(tmp_path / "nope")
    with pytest.raises(UserError, match="artist_train"):
        load_catalog(tmp_path)


def test_gapped_class_file_is_a_user_error(tmp_path):
    _write(tmp_path / "style_class.txt", "0 Baroque\n2 Cubism\n")
    _write(tmp_path / "style_train.csv", "Baroque/a.jpg,0\n")
    with pytest.raises(UserError, match=r"missing \[1\]"):
        load_catalog(tmp_path)


def test_split_arguments_are_checked():
    # assign_splits gets them from a ShardConfig, whose schema checks them once
    with pytest.raises(ConfigError, match="artgan"):
        load_config(None, ["shard.split=kfold"])
    with pytest.raises(ConfigError, match="shard.test_fraction must be in"):
        load_config(None, ["shard.test_fraction=1.0"])
