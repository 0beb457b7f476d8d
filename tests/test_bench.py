"""Tests for artdist.bench: a tiny full run through the CLI, the timing arithmetic, corpus and flags."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from artdist import cli
from artdist.bench import Clock, build_corpus, loader_batches, tiled
from artdist.data.manifest import Manifest, ShardInfo, SplitInfo

TINY = ["--images", "24", "--full-size", "64", "--workers", "0,1", "--steps", "1",
        "--set", "data.image_size=32", "--set", "data.batch_size=4", "--set", "shard.max_short_side=40",
        "--set", "model.lstm_hidden=16", "--set", "model.lstm_layers=1", "--set", "data.shuffle_buffer=8"]


def _main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, dict, str]:
    """`artdist bench` on 24 pictures of 64x48, one timed step: (stdout JSON, --json file, stdout)."""
    work = tmp_path_factory.mktemp("bench")
    code, out, err = _main(["bench", "--workdir", str(work), "--json", str(work / "result.json"), *TINY])
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1]), json.loads((work / "result.json").read_text()), out


def _positive_rate(row: dict) -> float:
    rate = row["images_per_s"]
    assert math.isfinite(rate) and rate > 0, row
    return rate


def test_every_part_measured_with_positive_finite_rates(tiny_run):
    result, _, _ = tiny_run
    for part in ("loader", "imagefolder"):
        assert [row["workers"] for row in result[part]] == [0, 1]
        for row in result[part]:
            _positive_rate(row)
            assert row["images"] >= 24  # at least one corpus-worth of images after the warm-up batches
            assert row["images_per_s_per_core"] == pytest.approx(row["images_per_s"] / row["cores"])
    for part in ("model", "e2e"):
        _positive_rate(result[part])
        assert result[part]["images"] == 4  # one timed step of batch 4; the warm-up step is left out
        assert 0 <= result[part]["data_wait_fraction"] < 1
    assert result["e2e"]["decode"] == "cpu"
    assert result["corpus"]["width"] == 64 and result["corpus"]["height"] == 48
    assert result["settings"]["cpu_defaults"] or torch.cuda.is_available()


def test_shard_part_compares_the_sharder_with_naive_and_the_floor(tiny_run):
    result, _, out = tiny_run
    shard = result["shard"]
    ms = shard["ms_per_image"]
    assert shard["images"] == 24 and shard["resample"] == "bilinear"
    assert set(ms) == {"floor", "floor_pil", "naive", "sharder_bilinear", "sharder_lanczos"}
    for key, value in ms.items():
        assert math.isfinite(value) and value > 0, key
        assert shard["ratio_to_floor"][key] == pytest.approx(value / ms["floor"], rel=1e-12)
    assert shard["speedup_over_naive"] == pytest.approx(ms["naive"] / ms["sharder_bilinear"], rel=1e-12)
    assert shard["stored_as_is"] == 0  # every picture resized (below): none can keep its bytes
    diff = shard["filter_difference"]  # 64x48 pictures -> 40 px short side: every one resized
    assert diff["resized_images"] == 24
    assert 20 < diff["min_psnr_db_at_image_size"] <= diff["psnr_db_at_image_size"] < math.inf
    assert 0 < diff["max_abs_error_at_image_size"] <= 255
    assert "x floor" in out and "speed-up over naive" in out


def test_loader_floors_are_measured_on_the_same_shards(tiny_run):
    result, _, out = tiny_run
    floor = result["loader_floor"]
    assert floor["augment"] == "crop_flip" and floor["images"] == 24
    loader_ms = 1000 / result["loader"][0]["images_per_cpu_s"]
    assert floor["loader_ms"] == pytest.approx(loader_ms)
    for key in ("decode", "decode_pil", "draft_decode", "decode_box_resize", "decode_image"):
        assert math.isfinite(floor[key]) and floor[key] > 0
        assert floor["ratio"][key] == pytest.approx(loader_ms / floor[key])
    assert "loader floors on the same shard members" in out


def test_images_dir_replaces_the_synthetic_corpus(tmp_path):
    folder = tmp_path / "paintings" / "Some_Style"
    folder.mkdir(parents=True)
    for i in range(9):
        size = (60 + 7 * i, 50 + 5 * i)
        Image.new("RGB", size, (20 * i, 100, 200 - 10 * i)).save(folder / f"p{i}.jpg", quality=90)
    Image.new("RGBA", (70, 90), (0, 0, 0, 0)).save(folder / "odd name.png\"", "PNG")  # a real name seen in WikiArt files
    (tmp_path / "paintings" / "README.md").write_text("not a picture")
    work = tmp_path / "work"
    code, out, err = _main(["bench", "--workdir", str(work), "--images-dir", str(tmp_path / "paintings"),
                            "--only", "shard,loader", "--workers", "0", "--images", "24", *TINY[6:]])
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["corpus"]["images"] == 10 and str(tmp_path / "paintings") in result["corpus"]["how"]
    assert result["shard"]["images"] == 10 and result["loader"][0]["images"] >= 10
    assert result["imagefolder"] == {"skipped": "not selected (--only)"}
    code, _, err = _main(["bench", "--workdir", str(work), "--images-dir", str(tmp_path / "nosuch")])
    assert code == 2 and "--images-dir" in err and "Traceback" not in err


def test_ratio_is_loader_over_imagefolder(tiny_run):
    result, _, _ = tiny_run
    loader = {row["workers"]: row["images_per_s"] for row in result["loader"]}
    folder = {row["workers"]: row["images_per_s"] for row in result["imagefolder"]}
    assert [r["workers"] for r in result["ratio"]] == [0, 1]
    for row in result["ratio"]:
        assert row["ratio"] == pytest.approx(loader[row["workers"]] / folder[row["workers"]], rel=1e-12)
    a, b = result["loader"][0], result["imagefolder"][0]
    assert a["images_per_cpu_s"] == pytest.approx(a["images"] / a["cpu_seconds"])
    assert result["ratio"][0]["ratio_cpu"] == pytest.approx(a["images_per_cpu_s"] / b["images_per_cpu_s"], rel=1e-12)
    assert "ratio_cpu" not in result["ratio"][1]  # worker processes' CPU time is not this process's


def test_json_file_matches_stdout_and_table_is_printed(tiny_run):
    stdout_json, file_json, out = tiny_run
    assert stdout_json == file_json
    assert "(a)/(b)" in out and "(c) model train step" in out and "(d) end to end" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU parts run on a CUDA machine")
def test_gpu_parts_skipped_on_cpu(tiny_run):
    result, _, out = tiny_run
    assert result["gpu"] == {"skipped": "no CUDA device"}
    assert "(e) GPU: skipped: no CUDA device" in out


def test_clock_rate_leaves_out_warmup_batches():
    clock = Clock([])
    clock.start, clock.end, clock.end_cpu = 0.0, 6.0, 3.5
    clock.asked = [0.0, 2.0, 3.0, 4.5]
    clock.asked_cpu = [0.0, 1.0, 2.0, 3.0]
    clock.got = [1.0, 2.5, 3.0, 5.0]
    clock.sizes = [8, 8, 8, 4]
    rate = clock.rate(warmup=1)
    # From batch 1 being asked for (t=2) to the end (t=6): 20 images in 4 s, 1 s of it waiting.
    assert rate["images"] == 20
    assert rate["images_per_s"] == pytest.approx(5.0)
    assert rate["data_wait_fraction"] == pytest.approx(0.25)
    assert rate["first_batch_s"] == pytest.approx(1.0)
    assert rate["cpu_seconds"] == pytest.approx(2.5)
    with pytest.raises(ValueError):
        clock.rate(warmup=4)


def test_clock_passes_batches_through_and_records_them():
    batches = [(torch.zeros(3, 1), torch.zeros(3, 3)), (torch.zeros(2, 1), torch.zeros(2, 3))]
    clock = Clock(batches)
    assert list(clock) == batches
    assert clock.sizes == [3, 2]
    assert len(clock.asked) == 3 and len(clock.got) == 2  # the last ask met StopIteration
    assert all(a <= g for a, g in zip(clock.asked, clock.got))


def test_loader_batches_cover_images_and_enough_rounds():
    assert loader_batches(0, 400, 16) == (2, 2 + 25)  # 2 warm-up batches, then 400 images
    assert loader_batches(2, 400, 16) == (4, 4 + 25)
    # 400 images are 7 batches of 64, less than one round of 15 workers: 4 rounds are timed instead.
    assert loader_batches(15, 400, 64) == (30, 30 + 60)


def test_corpus_has_wikiart_shape_and_is_reused(tmp_path):
    info = build_corpus(tmp_path / "c", images=8, full_size=64)
    files = sorted((tmp_path / "c" / "images").rglob("*.jpg"))
    assert info["images"] == len(files) == 8
    for path in files:
        with Image.open(path) as im:
            assert im.size == (64, 48)
    stamp = (tmp_path / "c" / "corpus.json").stat().st_mtime_ns
    assert build_corpus(tmp_path / "c", images=8, full_size=64) == info
    assert (tmp_path / "c" / "corpus.json").stat().st_mtime_ns == stamp


def test_tiled_manifest_repeats_the_split():
    manifest = Manifest(Path("shards"), {"train": SplitInfo(30, (ShardInfo("a", 10), ShardInfo("b", 20)))}, {}, "jpg")
    tiles = tiled(manifest, "train", 100)
    assert tiles.splits["train"].num_samples == 120
    assert [s.name for s in tiles.splits["train"].shards] == ["a", "b"] * 4
    assert manifest.splits["train"].num_samples == 30  # the original is untouched


@pytest.mark.parametrize("flags, words", [
    (["--only", "loader,bogus"], "bogus"),
    (["--workers", "0,x"], "--workers"),
    (["--steps", "0"], "--steps"),
    (["--images", "3"], "--images"),
])
def test_bad_flags_are_one_line_errors(tmp_path, flags, words):
    code, _, err = _main(["bench", "--workdir", str(tmp_path), *flags])
    assert code == 2
    assert words in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # rejected before building anything


def test_shard_sizes_benchmark_reports_each_size_class(tmp_path, capsys):
    # benchmarks/shard_sizes.py (docs/benchmarks.md's by-size table) on three files: one per size class.
    import runpy
    for name, size in {"small": (500, 400), "mid": (800, 600), "large": (1400, 1000)}.items():
        Image.new("RGB", size, (120, 60, 30)).save(tmp_path / f"{name}.jpg", quality=90)
    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "shard_sizes.py"))
    script["main"](tmp_path)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("3 files of")
    rows = {line.split(":")[0].strip(): line for line in lines[1:]}
    assert set(rows) == {"0-0.3 MP", "0.3-0.5 MP", ">= 1 MP", ">= 0 MP", ">= 0.47 MP"}
    assert all("x naive" in row and "x floor" in row for row in rows.values())
    assert rows[">= 0 MP"].split()[3] == "3" and rows[">= 0.47 MP"].split()[3] == "2"
