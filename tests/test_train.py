"""The trainer on 2 CPU ranks (gloo): identical replicas, equal steps on uneven shards, exactly-once
evaluation, rank-0-only files, bit-identical kill/preempt + resume, non-finite loss, learning."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.multiprocessing import ProcessExitedException

from _ddp import Job, reshard_uneven, run_ranks
from artdist import cli
from artdist.config import TASKS, load_config
from artdist.data.manifest import read_manifest
from artdist.data.shard import shard_dataset
from artdist.data.synth import make_corpus
from artdist.errors import UserError
from artdist.rundir import BEST, LAST, STOP_FILE
from artdist.train.loss import MultiTaskLoss, class_weights
from artdist.train.numerics import resolve_amp
from artdist.train.preempt import PreemptionWatch, requeue_slurm_job
from artdist.train.trainer import lr_factor

BATCH = 16
WORLD = 2
UNEVEN = [150, 3, 60, 1]  # train shard sizes; the rest of the split goes into a fifth shard
DEMO = Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml"
KILLED_SAVE_EVERY = 2  # train.checkpoint_every of the killed run


def tiny_config(shards: Path, run_dir: Path, *overrides: str):
    """resnet18 at 32 px, 2 epochs, deterministic CPU: a few seconds of compute per run."""
    return load_config(None, [
        "name=tiny", f"out_dir={run_dir}", f"data.shards={shards}", "data.image_size=32",
        f"data.batch_size={BATCH}", "data.num_workers=0", "data.shuffle_buffer=50", "data.crop_padding=4",
        "model.backbone=resnet18", "model.sequence=pooled", "model.lstm_hidden=32", "model.lstm_layers=1",
        "model.dropout=0.1", "train.epochs=2", "train.lr=2e-3", "train.backbone_lr=2e-3", "train.warmup_epochs=0.5",
        "train.deterministic=true", "train.device=cpu", "train.log_every=2", "outliers.enabled=false", *overrides])


def demo_config(shards: Path, run_dir: Path, epochs: int):
    """jobs/demo.yaml for `epochs` epochs, loaders in-process, no outlier reports."""
    return load_config(DEMO, [f"out_dir={run_dir}", f"data.shards={shards}", f"train.epochs={epochs}",
                              "data.num_workers=0", "outliers.enabled=false", "train.log_every=1000"])


def weights(run_dir: Path, name: str = LAST) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / name, weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def majority_rates(shards: Path, split: str) -> dict[str, float]:
    """Accuracy of always answering the split's most frequent class, per task."""
    manifest = json.loads((shards / "manifest.json").read_text())
    counts = read_manifest(shards).label_counts(split)
    return {t: max(c) / sum(c) for t, c in counts.items()}


@pytest.fixture(scope="module")
def shards(demo_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uneven") / "shards"
    reshard_uneven(demo_shards, out, "train", UNEVEN)
    return out


@pytest.fixture(scope="module")
def manifest(shards) -> dict:
    return json.loads((shards / "manifest.json").read_text())


@pytest.fixture(scope="module")
def steps_per_epoch(manifest) -> int:
    return math.ceil(manifest["splits"]["train"]["num_samples"] / (WORLD * BATCH))


@pytest.fixture(scope="module")
def demo_corpus_shards(tmp_path_factory) -> Path:
    """The corpus jobs/demo.yaml makes (1200 pictures), sharded as it says."""
    demo = load_config(DEMO)
    out = tmp_path_factory.mktemp("demo")
    make_corpus(dataclasses.replace(demo.synth, out=str(out / "synth")))
    shard_dataset(dataclasses.replace(demo.shard, images=str(out / "synth" / "images"),
                                      labels=str(out / "synth" / "labels"), out=str(out / "shards"), workers=1),
                  progress=False)
    return out / "shards"


@pytest.fixture(scope="module")
def runs(shards, demo_corpus_shards, steps_per_epoch, tmp_path_factory) -> dict:
    """Every 2-rank run of this file; starting processes dominates, so one set of ranks runs them in turn.

    killed: every rank exits in mid epoch 2 (own processes: they exit), saving every KILLED_SAVE_EVERY
    steps, then resumed from the last of those saves; preempted:
    stop file after step 3, then resumed; baseline: uninterrupted; accum: 2 micro-batches per step;
    learn: the demo config for 2 epochs; nan: lr=1e30.
    """
    out = tmp_path_factory.mktemp("runs")
    dirs = {name: out / name for name in ("baseline", "preempted", "killed", "accum", "learn", "nan")}
    kill_at = steps_per_epoch + steps_per_epoch // 2
    with pytest.raises(ProcessExitedException) as killed:
        run_ranks([Job(tiny_config(shards, dirs["killed"], f"train.checkpoint_every={KILLED_SAVE_EVERY}"),
                       exit_at=kill_at)], out / "kill")
    killed_last = torch.load(dirs["killed"] / LAST, weights_only=True)
    killed_had_test_report = (dirs["killed"] / "eval_test.json").exists()
    jobs = {
        "baseline": Job(tiny_config(shards, dirs["baseline"])),
        "preempt": Job(tiny_config(shards, dirs["preempted"]), touch_stop_file_at=3),
        "preempt_resume": Job(tiny_config(shards, dirs["preempted"])),
        "kill_resume": Job(tiny_config(shards, dirs["killed"], f"train.checkpoint_every={KILLED_SAVE_EVERY}")),
        "accum": Job(tiny_config(shards, dirs["accum"], "data.batch_size=8", "train.accum_steps=2",
                                 "train.epochs=1")),
        "learn": Job(demo_config(demo_corpus_shards, dirs["learn"], epochs=2)),
        "nan": Job(tiny_config(shards, dirs["nan"], "train.lr=1e30", "train.backbone_lr=1e30",
                               "train.warmup_epochs=0", "train.grad_clip=0")),
    }
    records = run_ranks(list(jobs.values()), out / "ranks")
    return {"out": out / "ranks", "dirs": dirs, "kill_exit_code": killed.value.exit_code,
            "killed_last": {k: killed_last[k] for k in ("epoch", "step_in_epoch", "global_step")},
            "killed_had_test_report": killed_had_test_report,
            **dict(zip(jobs, records))}


def test_ranks_run_equal_steps_on_uneven_shards_and_stay_identical(runs, manifest, steps_per_epoch):
    sizes = [s["num_samples"] for s in manifest["splits"]["train"]["shards"]]
    assert sizes[:4] == UNEVEN and len(sizes) == 5
    for r in runs["baseline"]:
        assert "error" not in r, r.get("traceback")
        assert r["status"] == "done"
        assert [e["steps_run"] for e in r["epochs"]] == [steps_per_epoch] * 2
    rank0, rank1 = runs["baseline"]
    # DDP keeps the replicas bit-identical after every epoch.
    assert [e["params"] for e in rank0["epochs"]] == [e["params"] for e in rank1["epochs"]]
    assert rank0["epochs"][0]["params"] != rank0["epochs"][1]["params"]


def test_gradient_accumulation_steps_once_per_accumulated_batch(runs, manifest):
    batches = math.ceil(manifest["splits"]["train"]["num_samples"] / (WORLD * 8))
    rank0, rank1 = runs["accum"]
    assert rank0["status"] == rank1["status"] == "done"
    assert rank0["epochs"][0]["steps_run"] == rank1["epochs"][0]["steps_run"] == batches // 2
    assert rank0["epochs"][0]["params"] == rank1["epochs"][0]["params"]


def test_evaluation_counts_every_sample_exactly_once(runs, shards, manifest):
    for r in runs["baseline"]:  # every rank gets the all-reduced totals
        assert [e["split"] for e in r["evals"]] == ["val", "val", "test"]
        for e in r["evals"]:
            counts = read_manifest(shards).label_counts(e["split"])
            assert e["num_samples"] == manifest["splits"][e["split"]]["num_samples"]
            assert e["labelled"] == {t: sum(c) for t, c in counts.items()}
    report = json.loads((runs["dirs"]["baseline"] / "eval_test.json").read_text())
    assert report["num_samples"] == manifest["splits"]["test"]["num_samples"]
    assert sum(map(sum, report["tasks"]["style"]["confusion"])) == report["tasks"]["style"]["num_labelled"]


def test_only_rank_0_writes(runs):
    assert list((runs["out"] / "cwd1").iterdir()) == [] and list((runs["out"] / "cwd0").iterdir()) == []
    run_dir = runs["dirs"]["baseline"]
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["config.yaml", "class_counts.json", LAST, BEST, "metrics.jsonl", "eval_test.json", "tb", "finished.json"])
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]  # one line per epoch, not one per rank
    assert len(list((run_dir / "tb" / run_dir.name).glob("events.out.tfevents.*"))) == 1  # one writer, one run
    scalars = EventAccumulator(str(run_dir / "tb" / run_dir.name)).Reload().Tags()["scalars"]
    for task in TASKS:  # validation loss beside training loss, training accuracy beside validation accuracy
        assert {f"val/{task}/loss", f"train/{task}/loss", f"val/{task}/accuracy", f"train/{task}/accuracy"} <= set(scalars)
    ckpt = torch.load(run_dir / LAST, weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (2, 0) and len(ckpt["rng"]) == WORLD


def test_kill_mid_epoch_then_resume_gives_the_uninterrupted_weights(runs, steps_per_epoch):
    assert runs["kill_exit_code"] == 3
    # The last train.checkpoint_every save before the kill (mid epoch 2), not the end of epoch 1.
    kill_at = steps_per_epoch + steps_per_epoch // 2
    saved = (kill_at - 1) // KILLED_SAVE_EVERY * KILLED_SAVE_EVERY
    assert saved > steps_per_epoch
    assert runs["killed_last"] == {"epoch": 1, "step_in_epoch": saved - steps_per_epoch, "global_step": saved}
    assert not runs["killed_had_test_report"]
    resumed = runs["kill_resume"]
    assert [r["status"] for r in resumed] == ["done", "done"]
    assert [e["steps_run"] for e in resumed[0]["epochs"]] == [2 * steps_per_epoch - saved]  # the rest of epoch 2
    assert_same_weights(weights(runs["dirs"]["killed"]), weights(runs["dirs"]["baseline"]))
    assert len((runs["dirs"]["killed"] / "metrics.jsonl").read_text().splitlines()) == 2


def test_preempt_via_stop_file_saves_the_position_and_resumes_identically(runs, steps_per_epoch):
    preempted, resumed = runs["preempt"], runs["preempt_resume"]
    assert [r.get("status") for r in preempted] == ["preempted", "preempted"], preempted[0].get("traceback")
    assert preempted[0]["last"] == {"epoch": 0, "step_in_epoch": 3, "global_step": 3}
    assert preempted[0]["stop_file"]
    assert [r["status"] for r in resumed] == ["done", "done"]
    assert [e["steps_run"] for e in resumed[1]["epochs"]] == [steps_per_epoch - 3, steps_per_epoch]
    assert not resumed[0]["stop_file"]  # removed on resume, or the run would stop at once
    assert_same_weights(weights(runs["dirs"]["preempted"]), weights(runs["dirs"]["baseline"]))


def test_non_finite_loss_stops_every_rank_with_a_clear_message(runs):
    for r in runs["nan"]:
        assert r["error"].startswith("NonFiniteLossError: non-finite training loss at global step"), r
        assert "train.lr" in r["error"] and "amp=off" in r["error"]
    assert runs["nan"][0]["error"] == runs["nan"][1]["error"]  # the ranks agreed on the step and the values


def test_demo_config_beats_chance_on_style_in_two_epochs(runs, demo_corpus_shards):
    """Weak but meaningful: style (the quickest cue) is well above the majority class after 2 epochs."""
    assert [r["status"] for r in runs["learn"]] == ["done", "done"], runs["learn"][0].get("traceback")
    final = json.loads((runs["dirs"]["learn"] / "eval_test.json").read_text())
    assert final["tasks"]["style"]["accuracy"] > majority_rates(demo_corpus_shards, "test")["style"] + 0.15


def test_evaluate_command_reports_a_split_of_a_run(runs, manifest, capsys):
    run_dir = runs["dirs"]["baseline"]
    assert cli.main(["evaluate", "--run", str(run_dir), "--split", "val", "--set", "data.batch_size=64"]) == 0
    report = json.loads((run_dir / "eval_val.json").read_text())
    assert report["checkpoint"] == str(run_dir / BEST) and report["split"] == "val"
    assert report["num_samples"] == manifest["splits"]["val"]["num_samples"]
    best = torch.load(run_dir / BEST, weights_only=True)["metrics"]
    for task in TASKS:  # the checkpoint's own validation numbers, recomputed
        for key in ("accuracy", "top5", "macro_f1"):
            assert report["tasks"][task][key] == pytest.approx(best[f"{task}/{key}"])
    captured = capsys.readouterr()
    assert f"val style: {report['tasks']['style']['num_labelled']} labelled samples" in captured.out
    assert re.search(r"^evaluate val: (\d+)/\1 batches .* images/s", captured.err, re.M)  # progress, ends at total
    assert cli.main(["evaluate", "--run", str(run_dir), "--split", "nosuch"]) == 2
    assert "split 'nosuch' is not in" in capsys.readouterr().err


def test_predict_command_ranks_classes_and_reports_unreadable_files(runs, demo_corpus_shards, tmp_path, capsys):
    images = sorted((demo_corpus_shards.parent / "synth" / "images").rglob("*.jpg"))[:2]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a picture")
    checkpoint = runs["dirs"]["baseline"] / BEST
    assert cli.main(["predict", "--checkpoint", str(checkpoint), str(images[0]), str(broken), str(images[1]),
                     "--top-k", "2"]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == str(images[0]) and lines[4] == str(images[1]) and len(lines) == 8
    classes = torch.load(checkpoint, weights_only=True)["class_names"]
    for line, task in zip(lines[1:4], TASKS):
        name, shown = line.split(maxsplit=1)
        assert name == task
        picks = [p.rsplit(" ", 1) for p in shown.split(", ")]
        assert len(picks) == 2 and all(c in classes[task] for c, _ in picks)
        probs = [float(p) for _, p in picks]
        assert 1 >= probs[0] >= probs[1] >= 0
    assert f"{broken}: error: cannot read this image" in captured.err


@pytest.mark.slow
def test_demo_config_beats_chance_on_every_task(demo_corpus_shards, tmp_path):
    """The whole demo training: every task well above its majority-class rate on the test split."""
    records = run_ranks([Job(demo_config(demo_corpus_shards, tmp_path / "run", epochs=6))], tmp_path)
    assert [r["status"] for r in records[0]] == ["done", "done"], records[0][0].get("traceback")
    final = json.loads((tmp_path / "run" / "eval_test.json").read_text())
    for task, majority in majority_rates(demo_corpus_shards, "test").items():
        assert final["tasks"][task]["accuracy"] > majority + 0.15, (task, final["tasks"][task]["accuracy"], majority)


# --------------------------------------------------------------------------- single-process pieces


def test_loss_of_a_batch_without_known_labels_is_zero_not_nan():
    loss_fn = MultiTaskLoss(["style", "genre"], {"style": class_weights([3, 1, 0], "inverse"), "genre": None},
                            label_smoothing=0.1)
    logits = {"style": torch.randn(4, 3, requires_grad=True), "genre": torch.randn(4, 2, requires_grad=True)}
    labels = torch.tensor([[0, -1, -1], [1, -1, -1], [-1, -1, -1], [1, 5, -1]])  # no genre label at all
    total, per_task = loss_fn(logits, labels)
    assert per_task[1] == 0 and torch.isfinite(total)
    total.backward()
    assert torch.isfinite(logits["style"].grad).all() and (logits["genre"].grad == 0).all()
    # The known-label term is the weighted mean that cross_entropy itself computes.
    w = class_weights([3, 1, 0], "inverse")
    expected = torch.nn.functional.cross_entropy(logits["style"][[0, 1, 3]], torch.tensor([0, 1, 1]), weight=w,
                                                 label_smoothing=0.1)
    assert per_task[0] == pytest.approx(expected.item(), rel=1e-5)


def test_class_weights_favour_rare_classes_and_keep_the_mean_sample_weight():
    counts = [90, 10, 0]
    for mode, ratio in (("inverse", 9.0), ("inverse_sqrt", 3.0)):
        w = class_weights(counts, mode)
        assert w[1] / w[0] == pytest.approx(ratio) and w[2] == 0
        assert (w[0] * 90 + w[1] * 10) / 100 == pytest.approx(1.0)
    assert class_weights(counts, "none") is None


def test_lr_schedule_warms_up_linearly_then_decays_to_the_floor():
    f = [lr_factor(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(25)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert f[12] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f[20:] == pytest.approx([0.1] * 5)


def test_amp_auto_is_off_on_cpu_and_explicit_choices_are_honoured():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None and resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16 and resolve_amp("fp16", cpu) is torch.float16


def test_preemption_watch_fires_on_signal_or_stop_file(tmp_path):
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        watch = PreemptionWatch(tmp_path / STOP_FILE).install()
        assert not watch.should_stop()
        os.kill(os.getpid(), signal.SIGUSR2)  # would end the process with the default handler
        assert watch.should_stop()
        other = PreemptionWatch(tmp_path / STOP_FILE)
        assert not other.should_stop()
        (tmp_path / STOP_FILE).touch()
        assert other.should_stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_requeue_outside_slurm_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(UserError, match="SLURM_JOB_ID is not set"):
        requeue_slurm_job()
