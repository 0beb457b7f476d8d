"""The resume contract of `artdist train` on an existing run dir, and what a run shows in TensorBoard."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from artdist import cli
from artdist.config import save_config
from artdist.data.manifest import read_manifest
from artdist.rundir import RunDir
from artdist.train import resume, trainer
from artdist.train.checkpoint import Checkpointer
from artdist.train.resume import set_aside
from test_train import tiny_config

STEPS = 16  # the global step the crafted run stopped at


def _config_file(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}.yaml"


@pytest.fixture(scope="module")
def stopped_run(demo_shards, tmp_path_factory) -> Path:
    """A run whose one epoch is saved in model_last.pt but whose test and reports never ran (a job
    killed during its test evaluation): untrained weights, saved with the trainer's own functions."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = tiny_config(demo_shards, run_dir, "train.epochs=1")
    manifest = read_manifest(demo_shards)
    model, optimizer, scaler, _ = trainer.build_training(cfg, manifest.num_classes, None, torch.device("cpu"),
                                                         None, False)
    run_dir.mkdir()
    position = {"epoch": 1, "step_in_epoch": 0, "global_step": STEPS, "best_metric": 0.1, "metrics": {}}
    layout = {"steps_per_epoch": STEPS, "world_size": 1, "workers": 0, "batch_size": 16, "accum_steps": 1}
    Checkpointer(run_dir, model, optimizer, scaler, cfg, manifest.classes, layout).save(position, best=True)
    save_config(cfg, RunDir(run_dir).config)
    save_config(cfg, _config_file(run_dir))
    return run_dir


@pytest.fixture
def run_copy(stopped_run, tmp_path) -> Path:
    run_dir = tmp_path / "tiny"
    shutil.copytree(stopped_run, run_dir)
    text = _config_file(stopped_run).read_text().replace(str(stopped_run), str(run_dir))
    _config_file(run_dir).write_text(text)
    return run_dir


def _train(run_dir: Path, *args: str) -> int:
    return cli.main(["train", "--config", str(_config_file(run_dir)), *args])


def _snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_change_of_what_is_trained_is_refused_with_a_one_line_diff_and_nothing_written(run_copy, capsys):
    before = _snapshot(run_copy)
    assert _train(run_copy, "--set", "train.lr=0.5", "--set", "data.augment=rrc", "--set",
                  "data.num_workers=1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "data.augment 'crop_flip' -> 'rrc', train.lr 0.002 -> 0.5." in err  # the layout change is not listed
    assert "--fresh" in err and "--set name=NEW" in err and "--resume-with-changes" in err
    assert _snapshot(run_copy) == before  # config.yaml is not rewritten with values never trained with


def test_resume_with_changes_records_them_then_a_finished_run_does_nothing(run_copy, capsys):
    event_dir = run_copy / "tb" / run_copy.name
    earlier = set(event_dir.glob("*"))
    with SummaryWriter(str(event_dir)) as stray:  # what a killed process logged after its last checkpoint
        stray.add_scalar("train/loss", 99.0, STEPS + 5)
    # ...a second ago: TensorBoard reads a folder's files in name order (events.out.tfevents.TIME.HOST.PID.COUNT),
    # and in the same second this process's next file, "….10", would sort before the stray one, "….9".
    (stray_file,) = set(event_dir.iterdir()) - earlier
    name = stray_file.name.split(".")
    name[3] = f"{int(name[3]) - 1:010d}"
    stray_file.rename(event_dir / ".".join(name))
    assert _train(run_copy, "--resume-with-changes", "--set", "train.label_smoothing=0.2") == 0
    out = capsys.readouterr().out
    assert "--resume-with-changes: train.label_smoothing 0.1 -> 0.2" in out
    history = yaml.safe_load((run_copy / "config_changes.yaml").read_text())
    assert len(history) == 1 and history[0]["changes"] == {"train.label_smoothing": [0.1, 0.2]}
    assert history[0]["resumed_at"] == {"epoch": 1, "step_in_epoch": 0, "global_step": STEPS}
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["train"]["label_smoothing"] == 0.2
    assert json.loads((run_copy / "finished.json").read_text())["epochs"] == 1
    assert (run_copy / "eval_test.json").is_file()

    # TensorBoard: the run is named after the run, the stray point is purged, the config is in the
    # TEXT tab, the test metrics are a table and labelled pictures, never one-point charts
    assert sorted(p.name for p in (run_copy / "tb").iterdir()) == [run_copy.name]
    events = EventAccumulator(str(event_dir), size_guidance={"images": 0, "tensors": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert all(not t.startswith(("hparam", "test/")) for t in tags["scalars"]), tags["scalars"]
    assert "train/loss" not in tags["scalars"] or all(e.step < STEPS for e in events.Scalars("train/loss"))
    assert {"config/resolved/text_summary", "test/metrics/text_summary"} <= set(tags["tensors"])
    config_text = events.Tensors("config/resolved/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "label_smoothing: 0.2" in config_text
    classes = read_manifest(yaml.safe_load((run_copy / "config.yaml").read_text())["data"]["shards"]).classes
    for task in ("style", "artist", "genre"):
        image = events.Images(f"test/{task}/confusion")[0]
        # room for the class names beside a matrix of len(classes) cells: far wider than the bare matrix
        assert image.width > 200 and image.height > 22 * len(classes[task])

    # the same command again: the run says it is finished and changes nothing
    before = _snapshot(run_copy)
    assert _train(run_copy, "--set", "train.label_smoothing=0.2") == 0
    assert "is finished (1 of 1 epochs" in capsys.readouterr().out
    assert _train(run_copy, "--set", "train.label_smoothing=0.2", "--set", "data.num_workers=1") == 0  # layout only
    assert "is finished" in capsys.readouterr().out
    assert _snapshot(run_copy) == before
    # the config the weights were last accepted with is what a rerun is held to
    assert _train(run_copy) == 2 and "train.label_smoothing 0.2 -> 0.1" in capsys.readouterr().err


def test_fresh_keeps_the_old_run_aside_and_a_failed_start_leaves_no_run_dir(run_copy, tmp_path, capsys):
    assert _train(run_copy, "--fresh", "--set", f"data.shards={tmp_path / 'no-shards'}") == 2
    captured = capsys.readouterr()
    assert "no-shards" in captured.err and "Traceback" not in captured.err
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("tiny.replaced-")]
    assert len(kept) == 1 and (kept[0] / "model_last.pt").is_file() and f"kept as {kept[0]}" in captured.out
    assert not run_copy.exists()  # the failed start removed the run dir it had created


def test_fresh_twice_in_one_second_keeps_both_old_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(resume.time, "strftime", lambda *args: "20261205-120000")
    run_dir = RunDir(tmp_path / "run")
    for version in ("1", "2"):
        run_dir.path.mkdir()
        (run_dir.path / "model_last.pt").write_text(version)
        assert set_aside(run_dir) == tmp_path / ("run.replaced-20261205-120000" + ("" if version == "1" else "-2"))
    assert [(tmp_path / name / "model_last.pt").read_text() for name in
            ("run.replaced-20261205-120000", "run.replaced-20261205-120000-2")] == ["1", "2"]


def test_imagenet_weights_are_checked_before_any_loader_and_leave_no_run_dir(demo_shards, tmp_path, monkeypatch,
                                                                             capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(trainer, "TrainLoader", lambda *a, **k: pytest.fail("a loader started before the check"))
    run_dir = tmp_path / "run"
    config = tmp_path / "job.yaml"
    save_config(tiny_config(demo_shards, run_dir, "model.weights=imagenet"), config)
    assert cli.main(["train", "--config", str(config)]) == 2
    assert "not in the torchvision cache" in capsys.readouterr().err
    assert not run_dir.exists()
