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
from artdist.train.checkpoint import (load_checkpoint, latest_checkpoint, resume_training, rng_state, save_atomic,
                                      save_training_checkpoint, set_rng_state)
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


def _training_objects(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5),
                                torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    return model, optimizer, scheduler, scaler


def _step(model, optimizer, scheduler, scaler, x):
    loss = model(x).square().mean()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    scheduler.step()


def test_training_state_round_trip_resumes_identically(tmp_path):
    """Saved mid-run and resumed into fresh objects, two more steps give the same weights as not stopping."""
    cfg = JobConfig(name="roundtrip")
    classes = {"style": ["a", "b"], "artist": ["c"], "genre": ["d", "e"]}
    x = torch.randn(16, 4)
    objects = _training_objects(seed=0)
    for _ in range(3):
        _step(*objects, x)
    position = {"epoch": 2, "step_in_epoch": 5, "global_step": 17, "best_metric": 0.25,
                "metrics": {"style/macro_f1": 0.25}}
    save_training_checkpoint(tmp_path, *objects, cfg, classes, LAYOUT, position, best=True)
    for _ in range(2):  # dropout draws from the RNG that the checkpoint holds
        _step(*objects, x)

    ckpt = load_checkpoint(tmp_path / LAST)  # weights_only=True inside
    assert torch.equal(torch.load(tmp_path / "model_best.pt", weights_only=True)["model"]["0.weight"],
                       ckpt["model"]["0.weight"])
    assert ckpt["config"]["name"] == "roundtrip" and ckpt["class_names"] == classes
    fresh = _training_objects(seed=1)
    torch.manual_seed(99)
    restored = resume_training(ckpt, tmp_path / LAST, *fresh, seed=0, layout=LAYOUT)
    assert restored == position
    assert fresh[2].last_epoch == objects[2].last_epoch - 2
    assert fresh[3].get_scale() == ckpt["scaler"]["scale"]
    for _ in range(2):
        _step(*fresh, x)
    for (name, a), b in zip(objects[0].state_dict().items(), fresh[0].state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_takes_the_learning_rate_of_the_new_config(tmp_path):
    objects = _training_objects(seed=0)
    for _ in range(3):
        _step(*objects, torch.randn(16, 4))
    position = {"epoch": 0, "step_in_epoch": 3, "global_step": 3, "best_metric": 0.0, "metrics": {}}
    save_training_checkpoint(tmp_path, *objects, JobConfig(), {}, LAYOUT, position, best=False)
    model, _, _, scaler = _training_objects(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)  # was 0.1
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    resume_training(load_checkpoint(tmp_path / LAST), tmp_path / LAST, model, optimizer, scheduler, scaler, seed=0,
                    layout=LAYOUT)
    assert scheduler.last_epoch == 3
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 / 4)
    assert optimizer.state_dict()["state"][0]["step"] == 3  # the Adam moments are the saved ones
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 / 5)


def test_resume_into_a_different_model_is_a_clear_error(tmp_path):
    objects = _training_objects(seed=0)
    save_training_checkpoint(tmp_path, *objects, JobConfig(), {}, LAYOUT, {"epoch": 0, "step_in_epoch": 0, "global_step": 0,
                                                                   "best_metric": 0.0, "metrics": {}}, best=False)
    other = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(other.parameters())
    with pytest.raises(UserError, match="different config"):
        resume_training(load_checkpoint(tmp_path / LAST), tmp_path / LAST, other, optimizer,
                        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                        torch.amp.GradScaler("cpu", enabled=False), seed=0, layout=LAYOUT)


@pytest.mark.parametrize("step_in_epoch, expected_step", [(5, 10), (0, 0), (9, 18)])
def test_resume_with_another_layout_keeps_the_fraction_of_the_epoch_and_the_schedule(tmp_path, capsys,
                                                                                      step_in_epoch, expected_step):
    objects = _training_objects(seed=0)
    position = {"epoch": 2, "step_in_epoch": step_in_epoch, "global_step": 20 + step_in_epoch, "best_metric": 0.0,
                "metrics": {}}
    save_training_checkpoint(tmp_path, *objects, JobConfig(), {}, LAYOUT, position, best=False)
    model, optimizer, scheduler, scaler = _training_objects(seed=0)
    doubled = {**LAYOUT, "steps_per_epoch": 20, "batch_size": 8}  # same samples per epoch, half the batch
    restored = resume_training(load_checkpoint(tmp_path / LAST), tmp_path / LAST, model, optimizer, scheduler,
                               scaler, seed=0, layout=doubled)
    assert restored["epoch"] == 2 and restored["step_in_epoch"] == expected_step
    assert restored["global_step"] == scheduler.last_epoch == 2 * 20 + expected_step
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / (restored["global_step"] + 1))
    assert "batch_size 16 -> 8" in capsys.readouterr().out
