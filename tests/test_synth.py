"""artdist synth: ArtGAN layout and file formats, determinism, planted noise, class-dependent pictures."""
from __future__ import annotations

import csv
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from artdist.data.catalog import assign_splits, load_catalog
from artdist.cli import main
from artdist.config import TASKS, SynthConfig
from artdist.data.synth import make_corpus
from artdist.errors import ConfigError

LABEL_FILES = ("style_class.txt", "style_train.csv", "style_val.csv", "genre_class", "genre_train.csv",
               "genre_val.csv", "artist_class", "artist_train", "artist_val")


def _shape(path: Path) -> tuple:
    """A label file's format: line endings, its first two lines' kinds, the kinds of the rest.

    Kinds: class line, `path,idx` row, `path,,idx` row, blank; anything else (a header) verbatim.
    """
    lines = path.read_bytes().decode("utf-8").split("\n")
    assert lines[-1] == "", f"{path} must end with a newline"

    def kind(line: str) -> str:
        for name, pattern in (("class", r"\d+ \S+"), ("row", r"[^,]+\.jpg,\d+"), ("artist_row", r"[^,]+\.jpg,,\d+"),
                              ("blank", r"")):
            if re.fullmatch(pattern, line):
                return name
        return line

    body = lines[:-1]
    crlf = {line.endswith("\r") for line in body if line}
    kinds = [kind(line.rstrip("\r")) for line in body]
    return crlf, kinds[:2], set(kinds[2:])


def _pictures(corpus: Path, catalog) -> np.ndarray:
    return np.stack([np.asarray(Image.open(corpus / "images" / r.path).convert("RGB"), dtype=np.float32)
                     for r in catalog.records])


def _planted(corpus: Path) -> list[dict]:
    with open(corpus / "planted_noise.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray, train: np.ndarray) -> float:
    """Fit class means on `train`, classify the rest by the nearest mean."""
    classes = np.unique(labels[train])
    means = np.stack([features[train & (labels == c)].mean(0) for c in classes])
    test = ~train
    pred = classes[((features[test, None, :] - means[None]) ** 2).sum(-1).argmin(1)]
    return float((pred == labels[test]).mean())


def test_label_files_have_the_real_names_and_formats(synth_corpus, real_labels):
    ours = sorted(p.name for p in (synth_corpus / "labels").iterdir())
    assert ours == sorted(p.name for p in real_labels.iterdir()) == sorted(LABEL_FILES)
    for name in LABEL_FILES:
        assert _shape(synth_corpus / "labels" / name) == _shape(real_labels / name), name


def test_class_names_are_real_ones(synth_corpus, real_labels):
    ours = load_catalog(synth_corpus / "labels").classes
    assert [len(ours[t]) for t in TASKS] == [6, 8, 5]
    for task, name in (("style", "style_class.txt"), ("artist", "artist_class"), ("genre", "genre_class")):
        real = {line.split(" ", 1)[1] for line in (real_labels / name).read_text().splitlines()}
        assert set(ours[task]) <= real
        assert ours[task] == sorted(ours[task])


def test_catalog_parses_and_images_match_labels(synth_corpus):
    catalog = load_catalog(synth_corpus / "labels")
    assert len(catalog.records) == 400
    assert catalog.anomalies["unparseable_rows"]["count"] == 0
    assert catalog.anomalies["header_lines"]["count"] == 2  # one per artist file, like the real ones
    on_disk = sorted(str(p.relative_to(synth_corpus / "images")) for p in (synth_corpus / "images").rglob("*.jpg"))
    assert on_disk == [r.path for r in catalog.records]
    styles = catalog.classes["style"]
    for r in catalog.records:
        folder = r.path.split("/")[0]
        assert folder == {"Art_Nouveau": "Art_Nouveau_Modern"}.get(styles[r.labels[0]], styles[r.labels[0]])
        assert r.labels[0] >= 0
    with Image.open(synth_corpus / "images" / catalog.records[0].path) as im:
        assert (im.format, im.size, im.mode) == ("JPEG", (64, 64), "RGB")


def test_real_quirks_are_planted(synth_corpus):
    catalog = load_catalog(synth_corpus / "labels")
    names = [r.path.split("/", 1)[1] for r in catalog.records]
    assert any(name.count(".") >= 3 for name in names), "a file name with several dots"
    assert any(not name.isascii() for name in names), "a non-ASCII file name"
    twins = [name for name in names if name.endswith("(1).jpg")]
    assert twins and all(t.replace("(1).jpg", ".jpg") in names for t in twins)
    assert any(r.path.startswith("Art_Nouveau_Modern/") for r in catalog.records)
    assert catalog.anomalies["style_folder_mismatch"]["examples"][0]["folder"] == "Art_Nouveau_Modern"
    dup = catalog.anomalies["duplicate_rows"]
    assert dup["count"] == 1 and dup["examples"][0]["task"] == "genre"
    assert dup["examples"][0]["rows"][0]["file"] == "genre_val.csv"
    assert catalog.anomalies["cross_task_split"]["count"] >= 1
    artists = np.array([r.labels[1] for r in catalog.records])
    genres = np.array([r.labels[2] for r in catalog.records])
    assert 0.5 < (artists >= 0).mean() < 0.85, "only part of the images have an artist label"
    assert 0.6 < (genres >= 0).mean() < 0.95


def test_same_seed_gives_identical_bytes(tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_corpus(SynthConfig(out=str(tmp_path / name), images=40, seed=seed, noise=0.2, size=32))
        runs[name] = files(tmp_path / name)
    assert len(runs["a"]) == 40 + 9 + 2  # images, label files, planted_noise.csv and planted_duplicates.csv
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_rerun_into_the_same_folder_replaces_the_corpus(tmp_path):
    make_corpus(SynthConfig(out=str(tmp_path), images=30, seed=1, size=32))
    make_corpus(SynthConfig(out=str(tmp_path), images=20, seed=2, size=32))
    on_disk = sorted(str(p.relative_to(tmp_path / "images")) for p in (tmp_path / "images").rglob("*.jpg"))
    assert on_disk == [r.path for r in load_catalog(tmp_path / "labels").records]


def test_planted_noise_is_really_mislabelled_at_the_asked_rate(synth_corpus):
    catalog = load_catalog(synth_corpus / "labels")
    by_path = {r.path: r for r in catalog.records}
    planted = _planted(synth_corpus)
    assert planted and list(planted[0]) == ["path", "task", "true_label", "assigned_label", "true_class",
                                            "assigned_class"]
    for row in planted:
        record = by_path[row["path"]]
        assert record.labels[TASKS.index(row["task"])] == int(row["assigned_label"]) != int(row["true_label"])
        names = catalog.classes[row["task"]]  # the class names beside the numbers are those of the label files
        assert (names[int(row["true_label"])], names[int(row["assigned_label"])]) == (row["true_class"],
                                                                                     row["assigned_class"])
    pairs = sum(label >= 0 for r in catalog.records for label in r.labels)
    assert abs(len(planted) / pairs - 0.1) < 0.01
    # Every split is noised at the same rate (the outlier work audits val and test too).
    splits = dict(zip((r.path for r in catalog.records), assign_splits(catalog, "artgan")))
    for split, tolerance in (("train", 0.02), ("val", 0.03), ("test", 0.08)):
        n_pairs = sum(label >= 0 for r in catalog.records if splits[r.path] == split for label in r.labels)
        n_noisy = sum(splits[row["path"]] == split for row in planted)
        assert abs(n_noisy / n_pairs - 0.1) < tolerance, split


def test_no_noise_writes_only_the_header(tmp_path):
    make_corpus(SynthConfig(out=str(tmp_path), images=20, seed=0, noise=0.0, size=32))
    assert (tmp_path / "planted_noise.csv").read_text() == "path,task,true_label,assigned_label,true_class,assigned_class\n"


def test_pictures_follow_the_true_classes(synth_corpus):
    catalog = load_catalog(synth_corpus / "labels")
    pictures = _pictures(synth_corpus, catalog)
    true = np.array([r.labels for r in catalog.records])
    for row in _planted(synth_corpus):
        i = next(r.id for r in catalog.records if r.path == row["path"])
        true[i, TASKS.index(row["task"])] = int(row["true_label"])
    train = np.arange(len(true)) % 2 == 0
    # Style: the colour distribution alone (a 4x4x4-bin RGB histogram) separates the styles.
    bins = (pictures // 64).astype(np.int64) @ np.array([16, 4, 1])
    colour = np.stack([np.bincount(b.ravel(), minlength=64) for b in bins]) / bins[0].size
    assert _nearest_centroid_accuracy(colour, true[:, 0], train) > 0.9
    # Genre: the composition, seen as a coarse brightness layout with colour and contrast removed.
    grey = pictures.mean(-1).reshape(len(true), 8, 8, 8, 8).mean((2, 4)).reshape(len(true), -1)
    layout = (grey - grey.mean(1, keepdims=True)) / (grey.std(1, keepdims=True) + 1e-6)
    has_genre = true[:, 2] >= 0
    assert _nearest_centroid_accuracy(layout[has_genre], true[has_genre, 2], train[has_genre]) > 0.6
    # Artist: the signature motif is drawn in near-black or near-white ink; unlabelled artists have none.
    ink = ((pictures.max(-1) < 30) | (pictures.min(-1) > 225)).mean((1, 2))
    assert np.median(ink[true[:, 1] >= 0]) > 3 * np.median(ink[true[:, 1] < 0])


def test_speed_1500_images_at_96px(tmp_path):
    # CPU time of 300 pictures, scaled: wall time on a shared machine says little.
    start = time.process_time()
    summary = make_corpus(SynthConfig(out=str(tmp_path), images=300, seed=0, noise=0.1, size=96))
    assert summary["images"] == 300
    assert (time.process_time() - start) * 1500 / 300 < 30


def test_cli_flags_override_config(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("synth:\n  images: 500\n  size: 48\n")
    assert main(["synth", "--config", str(config), "--set", "synth.seed=5", "--out", str(tmp_path / "c"),
                 "--images", "12", "--styles", "3", "--artists", "2", "--genres", "2"]) == 0
    assert "wrote 12 images (48 px)" in capsys.readouterr().out
    catalog = load_catalog(tmp_path / "c" / "labels")
    assert len(catalog.records) == 12 and [len(catalog.classes[t]) for t in TASKS] == [3, 2, 2]


@pytest.mark.parametrize("args, message", [
    (["--noise", "1.5"], "synth.noise must be in [0, 1)"),
    (["--images", "3"], "synth.images must be >= 8"),
    (["--genres", "11"], "number of genre classes must be 2..10"),
])
def test_cli_rejects_bad_values(tmp_path, capsys, args, message):
    assert main(["synth", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_make_corpus_rejects_tiny_pictures(tmp_path):
    with pytest.raises(ConfigError, match="synth.size"):
        make_corpus(SynthConfig(out=str(tmp_path), images=20, size=8))
