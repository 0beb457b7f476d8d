"""Review page helpers (WikiArt names, mojibake) and `artdist relabel` on the demo shards."""
from __future__ import annotations

import csv
import hashlib
import json
import re
import tarfile
from pathlib import Path

import pytest

from artdist.cli import main as cli_main
from artdist.data.manifest import read_manifest
from artdist.data.relabel import relabel_shards
from artdist.errors import UserError
from artdist.outliers.review import parse_wikiart_name, render_page, repair_mojibake

# --------------------------------------------------------------------------- names


def test_wikiart_names_parse_into_artist_title_year():
    assert parse_wikiart_name("Impressionism/joaqu\u00e3\u00adn-sorolla_valencia-two-little-girls-on-a-beach-1904.jpg") \
        == {"artist": "Joaquín Sorolla", "title": "Valencia two little girls on a beach", "year": "1904"}
    assert parse_wikiart_name("Abstract_Art/ad-reinhardt_study-for-a-painting-1938-2.jpg") \
        == {"artist": "Ad Reinhardt", "title": "Study for a painting", "year": "1938"}
    assert parse_wikiart_name("Realism/ivan-shishkin_the-artist-s-son.jpg") \
        == {"artist": "Ivan Shishkin", "title": "The artist's son", "year": ""}
    assert parse_wikiart_name("Cubism/m.c.-escher_portrait-bridge-1886.jpg")["artist"] == "M.C. Escher"
    assert parse_wikiart_name("Cubism/untitled.jpg") == {"artist": "", "title": "Untitled", "year": ""}


def test_mojibake_of_the_real_label_files_is_repaired_and_clean_text_kept(real_labels):
    paths = set()
    for name in ("style_train.csv", "style_val.csv", "genre_train.csv", "artist_train"):
        for line in (real_labels / name).read_bytes().decode("utf-8").splitlines():
            if any(ord(ch) > 127 for ch in line):
                paths.add(line.split(",")[0])
    assert len(paths) > 100
    leftover = re.compile("[\u00c2-\u00fe][\u0080-\u00bf]")  # a lead byte still followed by a continuation byte
    for path in paths:
        fixed = repair_mojibake(path)
        assert not leftover.search(fixed), (path, fixed)
        assert len(fixed) < len(path)  # each two-character sequence became one character
    assert repair_mojibake("Impressionism/joaqu\u00e3\u00adn-sorolla_x.jpg") == "Impressionism/joaquín-sorolla_x.jpg"
    assert repair_mojibake("Impressionism/joaqu\u00c3\u00adn") == "Impressionism/joaquín"  # not lower-cased
    assert repair_mojibake("Na\u00efve_Art_(Primitivism)/x.jpg") == "Na\u00efve_Art_(Primitivism)/x.jpg"
    assert repair_mojibake("plain/ascii.jpg") == "plain/ascii.jpg"


def test_page_data_cannot_close_its_script_tag():
    page = render_page({"rows": [], "title": "</script><script>alert(1)</script>"})
    blob = re.search(r'<script type="application/json" id="artdist-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(blob)["title"] == "</script><script>alert(1)</script>"


# --------------------------------------------------------------------------- relabel


def write_decisions(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["path", "task", "assigned", "decision", "suggested_label"])
        out.writerows(rows)
    return path


def shard_labels(shards: Path) -> dict[str, dict]:
    out = {}
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    out[meta["path"]] = meta
    return out


def test_relabel_applies_the_wrong_labels_with_a_suggestion_and_records_them(demo_shards, tmp_path, capsys):
    manifest = read_manifest(demo_shards)
    before = shard_labels(demo_shards)
    classes = manifest.classes
    a, b, c = sorted(p for p, m in before.items() if m["genre"] >= 0)[:3]
    new_style = next(x for x in classes["style"] if x != classes["style"][before[a]["style"]])
    new_genre = next(x for x in classes["genre"] if x != classes["genre"][before[b]["genre"]])
    decisions = write_decisions(tmp_path / "d.csv", [
        [a, "style", classes["style"][before[a]["style"]], "wrong", new_style],
        [b, "genre", classes["genre"][before[b]["genre"]], "wrong", new_genre],
        [c, "style", classes["style"][before[c]["style"]], "wrong", ""],
        [c, "genre", classes["genre"][before[c]["genre"]], "fine", ""],
        [a, "genre", classes["genre"][before[a]["genre"]], "unsure", ""],
    ])
    out = tmp_path / "new"
    assert cli_main(["relabel", str(decisions), "--shards", str(demo_shards), "--out", str(out)]) == 0
    assert "2 label correction(s)" in capsys.readouterr().out
    after = shard_labels(out)
    assert set(after) == set(before)
    for path, meta in before.items():
        expect = dict(meta)
        if path == a:
            expect["style"] = classes["style"].index(new_style)
        if path == b:
            expect["genre"] = classes["genre"].index(new_genre)
        assert after[path] == expect
    new_manifest = read_manifest(out)
    [record] = new_manifest.extra["relabels"]
    assert {(r["path"], r["task"], r["to"]) for r in record["corrections"]} == {(a, "style", new_style),
                                                                              (b, "genre", new_genre)}
    assert record["not_applied"] == {"fine": 1, "unsure": 1, "wrong without a suggested label": 1}
    # images untouched, checksums of the new tars, the source shards unchanged
    assert new_manifest.num_samples("train") == manifest.num_samples("train")
    assert shard_labels(demo_shards) == before

    for split in new_manifest.splits.values():
        for shard in split.shards:
            assert hashlib.sha256((out / shard.name).read_bytes()).hexdigest() == shard.sha256
    # a second review on the corrected shards adds to the history
    again = write_decisions(tmp_path / "d2.csv", [[a, "style", new_style, "wrong", classes["style"][before[a]["style"]]]])
    assert len(relabel_shards(out, again, tmp_path / "new2")["relabels"]) == 2


def test_relabel_explains_bad_decisions_and_leaves_nothing_behind(demo_shards, tmp_path, capsys):
    manifest = read_manifest(demo_shards)
    path, meta = next(iter(shard_labels(demo_shards).items()))
    label = manifest.classes["style"][meta["style"]]
    other = next(x for x in manifest.classes["style"] if x != label)

    def error(rows, out=None) -> str:
        decisions = write_decisions(tmp_path / "d.csv", rows) if rows is not None else tmp_path / "none.csv"
        target = out or tmp_path / "out"
        assert cli_main(["relabel", str(decisions), "--shards", str(demo_shards), "--out", str(target)]) == 2
        assert not (tmp_path / "out").exists()
        return capsys.readouterr().err

    assert "does not exist" in error(None)
    assert "not a style class" in error([[path, "style", label, "wrong", "Pointillism-ish"]])
    assert "unknown task" in error([[path, "colour", label, "wrong", other]])
    assert "unknown decision" in error([[path, "style", label, "maybe", other]])
    assert "the shards say" in error([[path, "style", other, "wrong", label]])
    assert "not in" in error([["Nowhere/none.jpg", "style", label, "wrong", other]])
    assert "two different" in error([[path, "style", label, "wrong", other], [path, "style", label, "wrong", label]])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    assert "not empty" in error([[path, "style", label, "wrong", other]], tmp_path / "full")
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep"
    (tmp_path / "bad.csv").write_text("path,task\nx,style\n")
    with pytest.raises(UserError, match="lacks column"):
        relabel_shards(demo_shards, tmp_path / "bad.csv", tmp_path / "out")
