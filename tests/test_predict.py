"""`artdist predict` on folders and glob patterns, with --json and --csv output."""
import csv
import json

import pytest
import torch

from artdist import cli
from artdist.config import TASKS, load_config, to_dict
from artdist.data.manifest import read_manifest
from artdist.model import build_model
from artdist.train.checkpoint import FORMAT


@pytest.fixture(scope="module")
def checkpoint(demo_shards, tmp_path_factory):
    """An untrained tiny model saved as a weights-only checkpoint: predict needs no trained weights."""
    cfg = load_config(None, [f"data.shards={demo_shards}", "data.image_size=32", "model.backbone=resnet18",
                             "model.sequence=pooled", "model.lstm_hidden=16", "model.lstm_layers=1",
                             "train.device=cpu"])
    names = read_manifest(demo_shards).classes
    model = build_model(cfg.model, {t: len(names[t]) for t in TASKS})
    path = tmp_path_factory.mktemp("predict") / "model_best.pt"
    torch.save({"format": FORMAT, "model": model.state_dict(), "config": to_dict(cfg), "class_names": names}, path)
    return path


def test_a_folder_and_a_glob_give_every_image_once_in_json_and_csv(checkpoint, synth_corpus, tmp_path, capsys):
    style_dir = sorted(p for p in (synth_corpus / "images").iterdir() if p.is_dir())[0]
    images = sorted(style_dir.glob("*.jpg"))
    assert len(images) >= 2
    out_json, out_csv = tmp_path / "p.json", tmp_path / "p.csv"
    assert cli.main(["predict", "--checkpoint", str(checkpoint), str(style_dir), "--top-k", "2",
                     "--json", str(out_json), "--csv", str(out_csv)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # the files replace the console listing; progress goes to stderr
    assert f"predict: {len(images)}/{len(images)} images" in captured.err
    results = json.loads(out_json.read_text())
    assert [r["path"] for r in results] == [str(p) for p in images]
    for r in results:
        assert list(r["tasks"]) == list(TASKS)
        for picks in r["tasks"].values():
            assert len(picks) == 2 and picks[0]["probability"] >= picks[1]["probability"]
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == len(images) * len(TASKS) * 2
    assert {(row["path"], row["task"], row["rank"], row["class"]) for row in rows} == {
        (r["path"], t, str(k + 1), p["class"]) for r in results for t, picks in r["tasks"].items()
        for k, p in enumerate(picks)}
    # the same images through a quoted glob pattern, JSON on stdout
    assert cli.main(["predict", "--checkpoint", str(checkpoint), str(style_dir / "*.jpg"), "--top-k", "2",
                     "--json", "-"]) == 0
    assert [r["path"] for r in json.loads(capsys.readouterr().out)] == [str(p) for p in images]


def test_unmatched_patterns_and_empty_folders_are_one_line_errors(checkpoint, tmp_path, capsys):
    assert cli.main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "*.jpg")]) == 2
    assert "the pattern matches no file" in capsys.readouterr().err
    assert cli.main(["predict", "--checkpoint", str(checkpoint), str(tmp_path)]) == 2
    assert "folder holds no images" in capsys.readouterr().err
