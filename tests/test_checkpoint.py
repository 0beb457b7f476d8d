"""Checkpoints: atomic replacement under crashes and kills, weights_only loading, full training-state round trip."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from artdist.rundir import LAST
from artdist.train import checkpoint
from artdist.train.checkpoint import Checkpointer, load_checkpoint, latest_checkpoint, rng_state, save_atomic, set_rng_state
from artdist.train.engine import set_lr
from artdist.errors import UserError
from artdist.config import JobConfig


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model_last.pt"
    save_atomic({"model": {"w": torch.ones(3)}, "epoch": 1}, path)

    def torch_save_that_dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", torch_save_that_dies_halfway)
    with pytest.raises(UserError, match=r"cannot save .*model_last.pt \(disk full\).*MiB free.*previous model_last.pt is unchanged"):
        save_atomic({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    monkeypatch.undo()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_last.pt"]  # no .tmp left behind


def test_sigkill_during_save_leaves_a_complete_loadable_checkpoint(tmp_path):
    """A writer process saving 32 MB checkpoints in a loop is SIGKILLed while a .tmp is being written."""
    path = tmp_path / "model_last.pt"
    writer = textwrap.dedent(f"""
        import torch
        from artdist.train.checkpoint import save_atomic
        i = 0
        while True:
            i += 1
            save_atomic({{"model": {{"w": torch.full((8_000_000,), float(i))}}, "version": i}}, {str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer])
    tmp = path.with_name(path.name + ".tmp")
    try:
        deadline = time.monotonic() + 60
        # Kill once a complete checkpoint exists and the next one is half written.
        while not (path.exists() and tmp.exists() and tmp.stat().st_size > 1_000_000):
            assert time.monotonic() < deadline, "the writer never got to a second save"
            assert proc.poll() is None, "the writer died on its own"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["version"] >= 1
    assert torch.equal(ckpt["model"]["w"], torch.full((8_000_000,), float(ckpt["version"])))


def test_load_checkpoint_errors_name_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "nothing.pt"
    with pytest.raises(UserError, match=rf"{missing} does not exist"):
        load_checkpoint(missing)
    corrupt = tmp_path / "model_last.pt"
    save_atomic({"model": {"w": torch.ones(1000)}}, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:300])  # truncated, as by a crash without atomic save
    with pytest.raises(UserError, match=rf"{corrupt} cannot be read .* corrupt .* delete it"):
        load_checkpoint(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(UserError, match="not an artdist checkpoint"):
        load_checkpoint(foreign)


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    save_atomic({"model": {}}, tmp_path / LAST)
    assert latest_checkpoint(tmp_path) == tmp_path / LAST


def test_rng_state_round_trip_continues_every_stream():
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


LAYOUT = {"steps_per_epoch": 10, "world_size": 1, "workers": 1, "batch_size": 16, "accum_steps": 1}


def _training_objects(seed: int, lr: float = 0.1):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5),
                                torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    optimizer.param_groups[0]["base_lr"] = lr
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    return model, optimizer, scaler


def _schedule(step: int) -> float:
    return 1 / (step + 1)


def _step(model, optimizer, scaler, x, global_step: int) -> float:
    """One optimizer step at `global_step` with the LR the schedule gives there; -> that LR."""
    lr = set_lr(optimizer, _schedule(global_step))
    loss = model(x).square().mean()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    return lr


def _checkpointer(run_dir, objects, cfg=None, classes=None, layout=LAYOUT) -> Checkpointer:
    return Checkpointer(run_dir, *objects, cfg or JobConfig(), classes or {}, layout)


def test_training_state_round_trip_resumes_identically(tmp_path):
    """Saved mid-run and resumed into fresh objects, two more steps give the same weights as not stopping."""
    cfg = JobConfig(name="roundtrip")
    classes = {"style": ["a", "b"], "artist": ["c"], "genre": ["d", "e"]}
    x = torch.randn(16, 4)
    objects = _training_objects(seed=0)
    for step in range(3):
        _step(*objects, x, step)
    position = {"epoch": 0, "step_in_epoch": 3, "global_step": 3, "best_metric": 0.25,
                "metrics": {"style/macro_f1": 0.25}}
    _checkpointer(tmp_path, objects, cfg, classes).save(position, best=True)
    for step in (3, 4):  # dropout draws from the RNG that the checkpoint holds
        _step(*objects, x, step)

    ckpt = load_checkpoint(tmp_path / LAST)  # weights_only=True inside
    best = torch.load(tmp_path / "model_best.pt", weights_only=True)
    assert torch.equal(best["model"]["0.weight"], ckpt["model"]["0.weight"])
    # model_best.pt holds the weights and what evaluate/outliers/predict read, not the training state
    assert {"optimizer", "scheduler", "scaler", "rng"}.isdisjoint(best) and {"optimizer", "rng"} <= set(ckpt)
    assert (best["config"], best["class_names"], best["metrics"]) == (ckpt["config"], classes, position["metrics"])
    assert (tmp_path / "model_best.pt").stat().st_size < (tmp_path / LAST).stat().st_size
    assert ckpt["config"]["name"] == "roundtrip" and ckpt["class_names"] == classes
    fresh = _training_objects(seed=1)
    torch.manual_seed(99)
    restored = _checkpointer(tmp_path, fresh, cfg, classes).resume(tmp_path / LAST, seed=0)
    assert restored == position  # the LR schedule continues from restored["global_step"]
    assert fresh[2].get_scale() == ckpt["scaler"]["scale"]
    for step in range(restored["global_step"], restored["global_step"] + 2):
        _step(*fresh, x, step)
    for (name, a), b in zip(objects[0].state_dict().items(), fresh[0].state_dict().values()):
        assert torch.equal(a, b), name


def test_load_checkpoint_checks_the_format_tag(tmp_path):
    objects = _training_objects(seed=0)
    _checkpointer(tmp_path, objects).save({"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_metric": 0.0,
                                           "metrics": {}}, best=False)
    assert load_checkpoint(tmp_path / LAST)["format"] == checkpoint.FORMAT
    other = tmp_path / "future.pt"
    save_atomic({**torch.load(tmp_path / LAST, weights_only=True), "format": "artdist-checkpoint/99"}, other)
    with pytest.raises(UserError, match=r"future.pt has format 'artdist-checkpoint/99', this artdist reads "
                                        r"'artdist-checkpoint/1'"):
        load_checkpoint(other)


def test_resume_takes_the_learning_rate_of_the_new_config(tmp_path):
    objects = _training_objects(seed=0)
    for step in range(3):
        _step(*objects, torch.randn(16, 4), step)
    position = {"epoch": 0, "step_in_epoch": 3, "global_step": 3, "best_metric": 0.0, "metrics": {}}
    _checkpointer(tmp_path, objects).save(position, best=False)
    resumed = _training_objects(seed=0, lr=0.01)  # was 0.1
    restored = _checkpointer(tmp_path, resumed).resume(tmp_path / LAST, seed=0)
    assert restored["global_step"] == 3
    model, optimizer, scaler = resumed
    assert optimizer.state_dict()["state"][0]["step"] == 3  # the Adam moments are the saved ones
    assert _step(*resumed, torch.randn(16, 4), restored["global_step"]) == pytest.approx(0.01 / 4)
    assert _step(*resumed, torch.randn(16, 4), restored["global_step"] + 1) == pytest.approx(0.01 / 5)


def test_resume_into_a_different_model_is_a_clear_error(tmp_path):
    objects = _training_objects(seed=0)
    _checkpointer(tmp_path, objects).save({"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_metric": 0.0,
                                           "metrics": {}}, best=False)
    other = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(other.parameters())
    with pytest.raises(UserError, match="different config"):
        _checkpointer(tmp_path, (other, optimizer, torch.amp.GradScaler("cpu", enabled=False))).resume(
            tmp_path / LAST, seed=0)


@pytest.mark.parametrize("step_in_epoch, expected_step", [(5, 10), (0, 0), (9, 18)])
def test_resume_with_another_layout_keeps_the_fraction_of_the_epoch_and_the_schedule(tmp_path, capsys,
                                                                                      step_in_epoch, expected_step):
    objects = _training_objects(seed=0)
    position = {"epoch": 2, "step_in_epoch": step_in_epoch, "global_step": 20 + step_in_epoch, "best_metric": 0.0,
                "metrics": {}}
    _checkpointer(tmp_path, objects).save(position, best=False)
    resumed = _training_objects(seed=0)
    doubled = {**LAYOUT, "steps_per_epoch": 20, "batch_size": 8}  # same samples per epoch, half the batch
    restored = _checkpointer(tmp_path, resumed, layout=doubled).resume(tmp_path / LAST, seed=0)
    assert restored["epoch"] == 2 and restored["step_in_epoch"] == expected_step
    assert restored["global_step"] == 2 * 20 + expected_step
    assert _step(*resumed, torch.randn(16, 4), restored["global_step"]) == pytest.approx(
        0.1 / (restored["global_step"] + 1))
    assert "batch_size 16 -> 8" in capsys.readouterr().out
