"""Damaged input, kills and clashes (issue 13): verified shards, counted bad samples, run-dir lock, SIGTERM,
one-line errors, a sharder that deletes only its own files, escaped reports, and maths against scikit-learn."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import IterableDataset

from _ddp import sha256_of
from artdist import cli
from artdist.config import TASKS, DataConfig, ModelConfig, ShardConfig
from artdist.data import loader as loader_mod
from artdist.data import verify
from artdist.data.loader import BAD_ID, TrainLoader, make_eval_loader
from artdist.data.manifest import Manifest, read_manifest
from artdist.data.shard import shard_dataset
from artdist.dist import free_port, peer_gone
from artdist.errors import ConfigError, UserError
from artdist.metrics import confusion_matrix, format_confusion, format_table, report_from_confusion, topk_correct
from artdist.model import build_model
from artdist.outliers import pipeline, ranking
from artdist.outliers.report import write_rows
from artdist.outliers.scores import ClassGaussian, GaussianAccumulator, TaskScores, oas_shrinkage
from artdist.rundir import LOCK, RunDir, RunDirLock
from artdist.train import checkpoint, trainer
from artdist.train.preempt import PreemptionWatch
from test_train import tiny_config

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def shards(demo_shards, tmp_path) -> Path:
    """A private copy of the demo shards, free to damage."""
    return Path(shutil.copytree(demo_shards, tmp_path / "shards"))


@pytest.fixture
def small(demo_shards, tmp_path) -> Path:
    """The first two shards of each demo split (about 60 samples each): training on it takes a few steps."""
    out = tmp_path / "small"
    out.mkdir()
    shutil.copy(demo_shards / "manifest.json", out)

    def trim(manifest):
        for info in manifest["splits"].values():
            info["shards"] = info["shards"][:2]
            info["num_samples"] = sum(shard["num_samples"] for shard in info["shards"])
            for shard in info["shards"]:
                shutil.copy(demo_shards / shard["name"], out)
    edit_manifest(out, trim)
    return out


def edit_manifest(shards: Path, change) -> dict:
    manifest = json.loads((shards / "manifest.json").read_text())
    change(manifest)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def rewrite_member(shards: Path, shard: str, ext: str, change, index: int = 0) -> str:
    """Replace the `index`-th .ext member of a shard by change(bytes) and fix the manifest's checksum, as a
    shard written that way would have it; -> that sample's key."""
    path = shards / shard
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    targets = [i for i, (m, _) in enumerate(members) if m.name.endswith("." + ext)]
    member, data = members[targets[index]]
    members[targets[index]] = (member, change(data))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    digest = sha256_of(path)
    edit_manifest(shards, lambda m: [s.update(sha256=digest) for info in m["splits"].values()
                                      for s in info["shards"] if s["name"] == shard])
    return member.name.split(".")[0]


def data_cfg(shards: Path, **kw) -> DataConfig:
    return DataConfig(**{"shards": str(shards), "image_size": 32, "batch_size": 8, "num_workers": 0,
                         "shuffle_buffer": 16, **kw})


def one_line_error(call, match: str) -> str:
    with pytest.raises((UserError, ConfigError), match=match) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def read_all(shards: Path, split: str = "val", **kw) -> list:
    return list(make_eval_loader(data_cfg(shards, **kw), read_manifest(shards), split, 0, 1))


# --------------------------------------------------------------------------- 1. verified shards


def test_flipped_bytes_inside_an_image_stop_every_reader_naming_the_shard(shards):
    name = read_manifest(shards).splits["val"].shards[2].name
    data = bytearray((shards / name).read_bytes())
    data[3000:3064] = bytes(64)  # inside the first JPEG member: tar and JPEG stay readable
    (shards / name).write_bytes(bytes(data))
    one_line_error(lambda: read_all(shards), rf"{name} has sha256 .* manifest.json says")
    manifest = read_manifest(shards)
    one_line_error(lambda: TrainLoader(data_cfg(shards, train_split="val"), manifest, 0, 1, seed=0), name)


def test_zeroed_checksums_refuse_training(shards):
    edit_manifest(shards, lambda m: [s.update(sha256="0" * 64) for s in m["splits"]["train"]["shards"]])
    one_line_error(lambda: TrainLoader(data_cfg(shards), read_manifest(shards), 0, 1, seed=0),
                   r"train-000000.tar has sha256 .* \(and \d+ more shard")


def test_the_last_shard_undercounted_is_caught(shards):
    def undercount(m):
        last = m["splits"]["val"]["shards"][-1]
        last["num_samples"] -= 2
        m["splits"]["val"]["num_samples"] -= 2
    manifest = edit_manifest(shards, undercount)
    last = manifest["splits"]["val"]["shards"][-1]
    one_line_error(lambda: read_all(shards), rf"{last['name']} holds {last['num_samples'] + 2} samples, "
                                             rf"manifest.json says {last['num_samples']}")


def test_a_cut_shard_is_one_line(shards):
    name = read_manifest(shards).splits["val"].shards[0].name
    path = shards / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    one_line_error(lambda: read_all(shards), rf"{name} (has sha256|is not a readable tar)")
    # Cut after it was verified (the cache vouches for the old size: not here, since size is in its key) or
    # read without verification: the reader's own one-line error.
    samples = loader_mod._read_range([str(path)], [read_manifest(shards).splits["val"].shards[0].num_samples],
                                     0, 10**6)
    one_line_error(lambda: list(samples), rf"{name} (cannot be read after sample|holds)")


def test_verification_is_done_once_per_file_and_redone_when_it_changes(shards, monkeypatch):
    calls = []
    real = verify.check_shard
    monkeypatch.setattr(verify, "check_shard", lambda d, e, *keep: calls.append(e.name) or real(d, e, *keep))
    manifest = read_manifest(shards)
    val = manifest.splits["val"].shards
    verify.verify_split(shards, manifest, "val")
    assert sorted(calls) == sorted(s.name for s in val)
    calls.clear()
    verify.verify_split(shards, manifest, "val")
    assert calls == []  # cached: size and mtime unchanged
    os.utime(shards / val[1].name, ns=(0, 12345))
    verify.verify_split(shards, manifest, "val")
    assert calls == [val[1].name]


def test_verify_command_checks_every_shard_with_progress(shards, capsys):
    assert cli.main(["verify", str(shards)]) == 0
    out, err = capsys.readouterr()
    total = sum(len(info.shards) for info in read_manifest(shards).splits.values())
    assert f"{total} shards OK" in out and f"verified: {total}/{total} shards" in err
    name = read_manifest(shards).splits["test"].shards[-1].name
    with open(shards / name, "r+b") as f:
        f.seek(2000)
        f.write(b"\xff" * 16)
    assert cli.main(["verify", str(shards), "--split", "test", "--workers", "2"]) == 1
    out, err = capsys.readouterr()
    assert out.count("BAD ") == 1 and name in out and "1 of" in err


# --------------------------------------------------------------------------- 8. one-line errors on damaged input


@pytest.mark.parametrize("change, match", [
    (lambda b: b"{not json", "invalid .json member"),
    (lambda b: json.dumps({k: v for k, v in json.loads(b).items() if k != "path"}).encode(), "lacks path"),
    (lambda b: json.dumps({**json.loads(b), "style": 99}).encode(), r"style label 99 is outside -1\.\.\d+"),
])
def test_a_damaged_json_member_is_one_line_naming_the_sample(shards, change, match):
    name = read_manifest(shards).splits["val"].shards[0].name
    key = rewrite_member(shards, name, "json", change)
    one_line_error(lambda: read_all(shards), rf"{name}: sample {key}.*{match}")


def test_a_shortened_class_list_is_one_line(shards):
    edit_manifest(shards, lambda m: m["classes"].update(style=m["classes"]["style"][:1]))
    one_line_error(lambda: read_all(shards), r"style label \d+ is outside -1\.\.0 of the 1 style classes")


@pytest.mark.parametrize("change, match", [
    (lambda m: m["splits"]["val"].pop("shards"), "split 'val' has no 'shards' list"),
    (lambda m: m["splits"]["val"].update(num_samples="lots"), "num_samples 'lots' is not a whole number"),
    (lambda m: m["splits"]["val"]["shards"][0].update(num_samples=1.5), "not a whole number"),
    (lambda m: m["splits"]["val"]["shards"][0].update(name="../elsewhere.tar"), "not a file name inside"),
    (lambda m: m["splits"]["val"]["shards"][0].update(name="/etc/passwd"), "not a file name inside"),
])
def test_a_broken_manifest_is_one_line(shards, change, match):
    edit_manifest(shards, change)
    one_line_error(lambda: read_manifest(shards), match)


def test_weights_that_are_a_text_file_are_one_line(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_text("these are not weights\n")
    cfg = ModelConfig(backbone="resnet18", weights=str(path), lstm_hidden=8, lstm_layers=1)
    one_line_error(lambda: build_model(cfg, {t: 3 for t in TASKS}), rf"model.weights={path} is not a loadable")


def test_a_full_disk_while_checkpointing_names_path_and_space_and_leaves_no_tmp(tmp_path, monkeypatch):
    def full(obj, f):
        f.write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1000 vs 900")
    monkeypatch.setattr(checkpoint.torch, "save", full)
    target = tmp_path / "model_last.pt"
    message = one_line_error(lambda: checkpoint.save_atomic({"w": torch.zeros(1 << 20)}, target),
                             rf"cannot save {target} .* needs about 4 MiB, [\d,]+ MiB free there; no model_last.pt")
    assert "enforce fail" in message and list(tmp_path.iterdir()) == []


def test_a_corrupt_checkpoint_message_promises_nothing_that_is_not_kept(tmp_path):
    (tmp_path / "model_last.pt").write_bytes(b"PK\x03\x04 cut")
    message = one_line_error(lambda: checkpoint.load_checkpoint(tmp_path / "model_last.pt"), "cannot be read")
    assert "previous state" not in message and "starts again from epoch 1" in message


# --------------------------------------------------------------------------- 2. bad samples, 4. reports, training


def test_undecodable_samples_keep_every_rank_at_the_same_batch_count(shards):
    manifest = read_manifest(shards)
    key = rewrite_member(shards, manifest.splits["train"].shards[0].name, "jpg", lambda b: b[:50])
    manifest = read_manifest(shards)
    loaders = [TrainLoader(data_cfg(shards), manifest, rank, 2, seed=0) for rank in range(2)]
    batches = [list(loader) for loader in loaders]
    assert len(batches[0]) == len(batches[1]) == len(loaders[0])
    ids = torch.cat([b[2] for rank in batches for b in rank])
    assert 1 <= int((ids == BAD_ID).sum()) <= 2  # seen once, or twice when the epoch's wrap-around repeats it
    assert key


def test_training_skips_counts_and_reports_bad_samples_then_stops_past_the_budget(small, tmp_path, capfd):
    shards = small
    manifest = read_manifest(shards)
    rewrite_member(shards, manifest.splits["train"].shards[1].name, "jpg", lambda b: b"garbage")
    rewrite_member(shards, manifest.splits["val"].shards[0].name, "jpg", lambda b: b"garbage")
    run = tmp_path / "run"
    # The test split has no artist labels: its report must still be written (issue: max() of an empty sequence).
    for split in ("test",):
        for shard in manifest.splits[split].shards:
            for index in range(shard.num_samples):
                rewrite_member(shards, shard.name, "json",
                               lambda b: json.dumps({**json.loads(b), "artist": -1}).encode(), index)
    cfg = tiny_config(shards, run, "train.epochs=1", "data.max_bad_fraction=0.05")
    assert trainer.main(cfg) == "done"
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert sum(line["bad_samples"]["train"]) >= 1 and line["bad_samples"]["val"] == [1]
    report = json.loads((run / "eval_test.json").read_text())
    assert report["tasks"]["artist"]["num_labelled"] == 0 and report["bad_samples"] == [0]
    err = capfd.readouterr()
    assert "is not a readable image" in err.err and "undecodable training samples skipped" in err.out
    shutil.rmtree(run)
    one_line_error(lambda: trainer.main(tiny_config(shards, run, "data.max_bad_fraction=0")),
                   r"undecodable samples in this epoch .* data.max_bad_fraction")


def test_a_report_on_a_split_without_labels_for_a_task_prints():
    report = report_from_confusion(torch.zeros(4, 4, dtype=torch.int64), list("abcd"), 0)
    assert report["num_labelled"] == 0
    assert "0 labelled samples" in format_table(report) and "confusion" in format_confusion(report)


def test_a_task_whose_class_file_was_missing_is_diagnosed_as_such(synth_corpus, tmp_path):
    labels = Path(shutil.copytree(synth_corpus / "labels", tmp_path / "labels"))
    next(labels.glob("genre_class*")).unlink()
    out = tmp_path / "shards"
    shard_dataset(ShardConfig(images=str(synth_corpus / "images"), labels=str(labels), out=str(out),
                              max_short_side=32, samples_per_shard=100, workers=1), progress=False)
    cfg = tiny_config(out, tmp_path / "run", "train.class_weighting=none")
    message = one_line_error(lambda: trainer.main(cfg), "no genre classes: its class file was missing")
    assert "train.lr" not in message


def test_batch_size_one_with_batchnorm_is_a_config_error(small, tmp_path):
    shards = small
    one_line_error(lambda: trainer.main(tiny_config(shards, tmp_path / "run", "data.batch_size=1")),
                   "data.batch_size=1 cannot train resnet18: its BatchNorm layers need at least 2")


# --------------------------------------------------------------------------- 5. run-dir lock


def test_a_second_holder_is_refused_naming_host_and_pid(tmp_path):
    first = RunDirLock(tmp_path, "training").acquire()
    try:
        message = one_line_error(lambda: RunDirLock(tmp_path, "outlier audit").acquire(), "is in use")
        assert f"training by pid {os.getpid()} on host {socket.gethostname()}" in message
    finally:
        first.release()
    assert not (tmp_path / LOCK).exists()
    RunDirLock(tmp_path, "training").acquire().release()


def test_training_into_a_run_dir_in_use_fails_at_once(small, tmp_path):
    shards = small
    run = tmp_path / "run"
    lock = RunDirLock(run, "training").acquire()
    try:
        one_line_error(lambda: trainer.main(tiny_config(shards, run)), f"pid {os.getpid()}")
        assert not (run / "config.yaml").exists()
    finally:
        lock.release()


def test_stale_locks_are_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "purpose": "training"}))
    RunDirLock(tmp_path, "training").acquire().release()
    assert "taking over the stale lock" in capsys.readouterr().out
    (tmp_path / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "purpose": "training"}))
    one_line_error(lambda: RunDirLock(tmp_path, "training").acquire(), "on host elsewhere")  # fresh heartbeat
    old = time.time() - 3600
    os.utime(tmp_path / LOCK, (old, old))
    RunDirLock(tmp_path, "training").acquire().release()


# --------------------------------------------------------------------------- 9. SIGTERM


def test_sigterm_is_a_stop_notice(tmp_path):
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        watch = PreemptionWatch(RunDir(tmp_path).stop_file).install()
        assert not watch.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # would end pytest with the default handler
        assert watch.should_stop() and watch.signalled
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_stop_notice_after_the_last_step_lets_the_run_finish_and_says_so(small, tmp_path, capfd):
    run = tmp_path / "run"
    # The notice lands after the test evaluation (as SLURM's USR2 may): nothing is left to stop.
    touch_stop_file = lambda *args: RunDir(run).stop_file.touch()  # noqa: E731
    assert trainer.main(tiny_config(small, run, "train.epochs=1"), after_test=touch_stop_file) == "done"
    assert RunDir(run).finished.is_file()
    assert "came after the last training step: the run finished instead of stopping" in capfd.readouterr().out


PEER_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from artdist.dist import all_reduce_sum, peer_gone
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=int(sys.argv[1]), world_size=2)
all_reduce_sum(torch.ones(4))
if sys.argv[1] == "1":
    os._exit(9)  # as if killed after the first collective
try:
    all_reduce_sum(torch.ones(4))
except RuntimeError as exc:
    print("gist:", peer_gone(exc))
"""


def test_a_collective_whose_peer_died_is_recognised_by_its_gist(tmp_path):
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-c", PEER_SCRIPT, str(rank), port], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=tmp_path) for rank in range(2)]
    out = [proc.communicate(timeout=120)[0] for proc in ranks]
    assert ranks[1].returncode == 9
    gists = [line for line in out[0].splitlines() if line.startswith("gist:")]
    # gloo says it one of two ways, depending on where the dead peer's socket was
    gist = (r"gist: (Connection closed by peer \[127\.0\.0\.1\]:\d+"
            r"|Read error \[127\.0\.0\.1\]:\d+: Connection reset by peer)")
    assert len(gists) == 1 and re.fullmatch(gist, gists[0]), out[0]
    assert peer_gone(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert peer_gone(OSError("Connection reset by peer")) is None  # not a collective's error


class _SigtermHandler(IterableDataset):
    def __iter__(self):
        yield signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_loader_workers_ignore_sigterm():
    assert list(loader_mod._Loader(_SigtermHandler(), num_workers=1)) == [True]


@pytest.mark.slow  # a whole `artdist train` process; the two tests above cover the parts in-process
def test_sigterm_during_training_saves_and_exits_143(small, tmp_path):
    shards = small
    run = tmp_path / "run"
    overrides = [f"out_dir={run}", f"data.shards={shards}", "data.image_size=32", "data.batch_size=8",
                 "data.num_workers=1", "model.backbone=resnet18", "model.sequence=pooled", "model.lstm_hidden=16",
                 "model.lstm_layers=1", "train.epochs=50", "train.device=cpu", "train.log_every=1",
                 "outliers.enabled=false"]
    cmd = [sys.executable, "-m", "artdist", "train", "--config", str(REPO / "jobs" / "demo.yaml")]
    for override in overrides:
        cmd += ["--set", override]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch 1/50 step 2/"):
            os.killpg(proc.pid, signal.SIGTERM)  # the whole group, loader workers included, as `timeout` does
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=120) == trainer.TERMINATED_EXIT, "".join(lines)
    ckpt = torch.load(run / "model_last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["step_in_epoch"] >= 2
    assert any(line.startswith("terminated: the position is saved") for line in lines)
    assert not (run / LOCK).exists()


# --------------------------------------------------------------------------- 6. the sharder deletes only its own files


def _shard(corpus: Path, out: Path, per_shard: int = 40):
    return shard_dataset(ShardConfig(images=str(corpus / "images"), labels=str(corpus / "labels"), out=str(out),
                                     max_short_side=32, samples_per_shard=per_shard, min_shards=1, workers=1),
                         progress=False)


def test_the_sharder_refuses_a_folder_it_did_not_write(synth_corpus, tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tmp").write_text("chapter 1")
    (out / "train-000000.tar").write_text("mine")
    one_line_error(lambda: _shard(synth_corpus, out), "is not empty .* not a shard folder .* pick a new or empty")
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tmp", "train-000000.tar"]


def test_the_sharder_removes_only_its_own_stale_files_and_says_so(synth_corpus, tmp_path, capsys):
    out = tmp_path / "shards"
    first = _shard(synth_corpus, out, per_shard=40)
    keep = ["thesis.tmp", "train-000099.tar", "notes.txt", ".done/mine.json"]
    for name in keep:
        (out / name).write_text("user's")
    (out / "val-000000.tar.tmp").write_text("an interrupted write")
    second = _shard(synth_corpus, out, per_shard=1000)  # fewer shards: the earlier extra ones are stale
    before = {s["name"] for info in first["splits"].values() for s in info["shards"]}
    after = {s["name"] for info in second["splits"].values() for s in info["shards"]}
    assert before - after
    present = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert set(keep) <= present and not (before - after) & present and "val-000000.tar.tmp" not in present
    err = capsys.readouterr().err
    assert "removing" not in err  # progress=False: silent; the same run with progress says it (below)
    (out / "val-000000.tar.tmp").write_text("an interrupted write")
    shard_dataset(ShardConfig(images=str(synth_corpus / "images"), labels=str(synth_corpus / "labels"),
                              out=str(out), max_short_side=32, samples_per_shard=1000, min_shards=1, workers=1))
    assert "removing 1 file(s) an earlier `artdist shard` run left" in capsys.readouterr().err


# --------------------------------------------------------------------------- 10. escaping, CSV cells


def test_formula_cells_are_guarded_in_csv_and_numbers_stay_numbers(tmp_path):
    row = {"rank": 1, "id": 7, "path": "=HYPERLINK(\"http://x\")", "assigned": "@SUM(A1)", "predicted": "+1",
           "combined": 2.5, "max_softmax": 0.4, "p_assigned": 0.1, "margin": -0.3, "energy": -1.0, "mahalanobis": 3.0,
           "mahalanobis_z": -0.5, "feature_predicted": "-cmd", "feature_p_assigned": 0.2, "flagged_max_softmax": True,
           "flagged_combined": False, "copy_labels": ["=Evil"], "several_classes": True,
           "reasons": ["=1+1"]}
    write_rows([row], tmp_path / "t.csv", tmp_path / "t.json", {})
    with open(tmp_path / "t.csv", newline="") as f:
        written = next(csv.DictReader(f))
    for key in ("path", "assigned", "predicted", "feature_predicted", "copy_labels", "reasons"):
        assert written[key].startswith("'"), key
    assert written["margin"] == "-0.3" and written["energy"] == "-1.0"
    assert json.loads((tmp_path / "t.json").read_text())["rows"][0]["path"] == row["path"]  # JSON keeps the data


def test_a_split_name_is_escaped_in_index_html(demo_shards, tmp_path):
    evil = "<script>alert(1)</script>"
    manifest = read_manifest(demo_shards)
    manifest = dataclasses.replace(manifest, splits={**manifest.splits, evil: manifest.splits["val"]})
    ids = np.array(sorted(json.loads(b)["id"] for b in _json_members(demo_shards, manifest, "val")))
    n = len(ids)
    rng = np.random.default_rng(0)
    scores = TaskScores(ids=ids, assigned=np.zeros(n, np.int64), predicted=np.ones(n, np.int64),
                        max_softmax=rng.random(n, np.float32), nll=rng.random(n, np.float32),
                        margin=rng.random(n, np.float32), energy=rng.random(n, np.float32),
                        mahalanobis=rng.random(n, np.float32), feature_nll=rng.random(n, np.float32),
                        feature_predicted=np.zeros(n, np.int64))
    cfg = tiny_config(demo_shards, tmp_path / "run", "model.tasks=[style,artist]", "model.primary_task=style")
    # artist: no labelled sample in the split; its part of the report is empty, not a crash
    summary = pipeline.write_reports({"style": scores, "artist": pipeline._to_scores([])}, cfg, manifest, evil)
    page = (RunDir(cfg.run_dir).outliers(evil) / "index.html").read_text()
    # inlined as JSON with "</" escaped (review.render_page); the page's script sets it as textContent
    assert evil not in page and evil.replace("</", "<\\/") in page
    assert summary["tasks"]["artist"]["scored"] == 0


def _json_members(shards: Path, manifest: Manifest, split: str) -> list[bytes]:
    out = []
    for shard in manifest.splits[split].shards:
        with tarfile.open(shards / shard.name) as tar:
            out += [tar.extractfile(m).read() for m in tar if m.name.endswith(".json")]
    return out


# --------------------------------------------------------------------------- 11. maths against scikit-learn


sk_metrics = pytest.importorskip("sklearn.metrics")
sk_covariance = pytest.importorskip("sklearn.covariance")
sk_lda = pytest.importorskip("sklearn.discriminant_analysis")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_precision_at_k_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    positive = rng.random(300) < 0.2
    scores = rng.normal(size=300) + positive
    assert ranking.auroc(scores, positive) == pytest.approx(sk_metrics.roc_auc_score(positive, scores))
    tied = np.round(scores, 1)  # many ties: both count a tied pair as 1/2
    assert ranking.auroc(tied, positive) == pytest.approx(sk_metrics.roc_auc_score(positive, tied))
    for k in (1, 10, 57):
        top = np.zeros(300, dtype=bool)
        top[np.argsort(-scores)[:k]] = True
        assert ranking.precision_at_k(scores, positive, k) == pytest.approx(sk_metrics.precision_score(positive, top))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_accuracy_macro_f1_per_class_and_top5_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    classes = 9
    logits = torch.from_numpy(rng.normal(size=(500, classes)))
    y = torch.from_numpy(rng.integers(-1, classes - 2, 500))  # -1: unknown; the last 2 classes never true
    pred = logits.argmax(dim=1)
    cm = confusion_matrix(pred, y, classes)
    known = (y >= 0).numpy()
    yk, pk = y.numpy()[known], pred.numpy()[known]
    np.testing.assert_array_equal(cm.numpy(), sk_metrics.confusion_matrix(yk, pk, labels=range(classes)))
    report = report_from_confusion(cm, [str(i) for i in range(classes)], int(topk_correct(logits, y, 5)))
    assert report["accuracy"] == pytest.approx(sk_metrics.accuracy_score(yk, pk))
    assert report["macro_f1"] == pytest.approx(sk_metrics.f1_score(yk, pk, average="macro", zero_division=0))
    p, r, f, support = sk_metrics.precision_recall_fscore_support(yk, pk, labels=range(classes), zero_division=0)
    assert [c["precision"] for c in report["per_class"]] == pytest.approx(p)
    assert [c["recall"] for c in report["per_class"]] == pytest.approx(r)
    assert [c["f1"] for c in report["per_class"]] == pytest.approx(f)
    assert [c["support"] for c in report["per_class"]] == list(support)
    assert report["top5"] == pytest.approx(sk_metrics.top_k_accuracy_score(yk, logits.numpy()[known], k=5,
                                                                           labels=range(classes)))


@pytest.mark.parametrize("n, d", [(40, 5), (30, 20), (500, 8)])
def test_oas_shrinkage_matches_sklearn(n, d):
    x = np.random.default_rng(n + d).normal(size=(n, d)) * np.linspace(0.5, 3, d)
    emp = np.cov(x, rowvar=False, bias=True)
    assert oas_shrinkage(torch.from_numpy(emp), n) == pytest.approx(sk_covariance.OAS().fit(x).shrinkage_)


def test_class_gaussians_distances_and_classifier_match_sklearn():
    rng = np.random.default_rng(0)
    classes, d, n = 4, 6, 400
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, d)) * np.linspace(0.5, 2, d) + rng.normal(scale=3, size=(classes, d))[y]
    acc = GaussianAccumulator(classes, d, torch.device("cpu"))
    acc.add(torch.from_numpy(x), torch.from_numpy(y))
    fitted = acc.fit()
    # The pooled within-class covariance before shrinkage, scaled as sklearn's LDA scales it (by 1/N).
    rho, cov = fitted.shrinkage, fitted.covariance.numpy()
    mu = np.trace(cov) / d
    pooled = (cov - rho * mu * np.eye(d)) / (1 - rho)
    lda = sk_lda.LinearDiscriminantAnalysis(solver="lsqr", store_covariance=True).fit(x, y)
    np.testing.assert_allclose(pooled * (n - classes) / n, lda.covariance_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fitted.means.numpy(), lda.means_, rtol=1e-10)
    # Its discriminant with uniform priors is the Gaussian classifier of feature_scores.
    uniform = sk_lda.LinearDiscriminantAnalysis(solver="lsqr", priors=np.full(classes, 1 / classes)).fit(x, y)
    gaussian = ClassGaussian(torch.from_numpy(uniform.means_), torch.from_numpy(uniform.covariance_),
                             torch.linalg.inv(torch.from_numpy(uniform.covariance_)), 0.0, torch.ones(classes))
    probe = rng.normal(scale=3, size=(200, d))
    scores = gaussian.feature_scores(torch.from_numpy(probe), torch.zeros(200, dtype=torch.int64))
    np.testing.assert_array_equal(scores["feature_predicted"].numpy(), uniform.predict(probe))
    nll = scores["feature_nll"].numpy()
    np.testing.assert_allclose(np.exp(-nll), uniform.predict_proba(probe)[:, 0], rtol=1e-6, atol=1e-12)
    # Mahalanobis distances under a given covariance: sklearn's EmpiricalCovariance.mahalanobis (squared).
    emp = sk_covariance.EmpiricalCovariance().fit(x[y == 0])
    gaussian = ClassGaussian(torch.from_numpy(emp.location_)[None], torch.from_numpy(emp.covariance_),
                             torch.from_numpy(emp.precision_), 0.0, torch.ones(1))
    ours = gaussian.feature_scores(torch.from_numpy(probe), torch.zeros(200, dtype=torch.int64))["mahalanobis"]
    np.testing.assert_allclose(ours.numpy() ** 2, emp.mahalanobis(probe), rtol=1e-9)
