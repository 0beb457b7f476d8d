"""The GPU code paths exercised on CPU: AMP bf16/fp16 training and resume, torch.compile, the checklist command."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _ddp import Job, run_ranks
from test_data import write_shards
from test_train import assert_same_weights, tiny_config, weights
from artdist import cli
from artdist.checklist import CHECKS, NO_CUDA, check_amp
from artdist.data.manifest import read_manifest
from artdist.model import build_model
from artdist.rundir import BEST, LAST

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


# CPU autocast without native bf16/fp16 is 12-18x slower than fp32 (seconds per step even at 32 px):
# 20 px pictures, batches of 4, 4 steps per epoch. Not 16: there layer4's first conv sees a 1x1 map, and
# oneDNN's native bf16 weight gradient for that shape returns garbage on CPUs with AVX512-BF16
# (docs/benchmarks.md, "Small measurements"); from 2x2 on it is exact.
SMALL = ("data.image_size=20", "data.batch_size=4", "data.crop_padding=2")


def amp_config(shards: Path, run_dir: Path, amp: str, *overrides: str):
    return tiny_config(shards, run_dir, f"train.amp={amp}", "train.epochs=1", "train.warmup_epochs=0", *SMALL,
                       *overrides)


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("small") / "shards", {"train": [16, 16], "val": [12], "test": [8]})


@pytest.fixture(scope="module")
def amp_runs(small_shards, tmp_path_factory) -> dict:
    """Per amp: an uninterrupted 2-rank run, and one preempted after step 2 then resumed."""
    demo_shards = small_shards
    out = tmp_path_factory.mktemp("amp")
    jobs, dirs = [], {}
    for amp in ("bf16", "fp16"):
        dirs[amp] = {"full": out / f"{amp}-full", "cut": out / f"{amp}-cut"}
        jobs += [Job(amp_config(demo_shards, dirs[amp]["full"], amp)),
                 Job(amp_config(demo_shards, dirs[amp]["cut"], amp), touch_stop_file_at=2),
                 Job(amp_config(demo_shards, dirs[amp]["cut"], amp))]
    records = run_ranks(jobs, out / "ranks", timeout_s=1800)  # six runs under slow CPU autocast
    return {"dirs": dirs, "records": {"bf16": records[:3], "fp16": records[3:]}}


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_is_finite_identical_across_ranks_and_resumes_exactly(amp_runs, amp):
    full, cut, resumed = amp_runs["records"][amp]
    for job in (full, cut, resumed):
        assert all("error" not in rank for rank in job), [rank.get("error") for rank in job]
    # DDP keeps the ranks' parameters identical under autocast and the scaler.
    for job in (full, resumed):
        assert len({rank["epochs"][-1]["params"] for rank in job}) == 1
    assert cut[0]["last"]["step_in_epoch"] == 2
    dirs = amp_runs["dirs"][amp]
    ckpt = torch.load(dirs["cut"] / LAST, weights_only=True)
    losses = [json.loads(line)["train_loss"] for line in (dirs["full"] / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    if amp == "fp16":
        # The scaler's state travels in the checkpoint and is restored: a resumed run that lost it would
        # start again at the default scale and skip or scale steps differently.
        assert ckpt["scaler"]["scale"] > 0 and "_growth_tracker" in ckpt["scaler"]
    else:
        assert not ckpt["scaler"]  # bf16 needs no GradScaler
    assert_same_weights(weights(dirs["full"]), weights(dirs["cut"]))


def test_evaluate_and_outliers_from_an_fp16_checkpoint(amp_runs, capsys):
    run = amp_runs["dirs"]["fp16"]["full"]
    assert cli.main(["evaluate", "--run", str(run), "--split", "val"]) == 0
    report = json.loads((run / "eval_val.json").read_text())
    assert all(0 <= t["accuracy"] <= 1 for t in report["tasks"].values())
    assert cli.main(["outliers", "--run", str(run), "--split", "val"]) == 0
    summary = json.loads((run / "outliers" / "val" / "summary.json").read_text())
    assert summary and (run / "outliers" / "val" / "index.html").is_file()


@pytest.mark.parametrize("amp,low", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_lstm_and_heads_run_in_fp32_inside_autocast(small_shards, tmp_path, amp, low):
    """The checklist's AMP check on CPU autocast: convolutions in the low precision, the recurrent island fp32."""
    cfg = tiny_config(small_shards, tmp_path / "run", "train.class_weighting=none", *SMALL)
    num_classes = read_manifest(small_shards).num_classes
    row = check_amp(cfg, num_classes, None, torch.device("cpu"), steps=1, warmup=0, amp=amp)
    assert row["status"] == "ok", row
    assert row["dtypes"] == {"Conv2d": [low], "LSTM": ["float32"], "Linear": ["float32"]}
    assert row["amp"] == low and row["images_per_s"] > 0


def test_checklist_runs_on_cpu_and_says_what_it_skipped(tmp_path, capsys):
    out = tmp_path / "checklist.json"
    assert cli.main(["bench", "--gpu-checklist", "--images", "60", "--full-size", "160",
                     "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["checks"]) == list(CHECKS)
    if torch.cuda.is_available():
        pytest.skip("the CPU-side assertions below are for machines without CUDA")
    # What needs CUDA says so; the decode maths run on CPU tensors and keep within the stated bound.
    skipped = {name for name, row in result["checks"].items() if row["status"] == "skipped"}
    assert skipped == set(CHECKS) - {"decode_maths"}
    assert all(result["checks"][name]["why"] == NO_CUDA for name in skipped)
    maths = result["checks"]["decode_maths"]
    assert maths["status"] == "ok" and set(maths["abs_diff"]) == {"none", "crop_flip", "rrc"}
    assert all(r["mean"] < maths["bound"]["mean"] for r in maths["abs_diff"].values())
    table = out.with_suffix(".md").read_text()
    assert table.count("| skipped |") == len(skipped) and "| decode_maths | ok |" in table


@pytest.mark.slow
def test_compiled_backbone_trains_saves_plain_keys_resumes_evaluates_and_predicts(small_shards, tmp_path, capsys):
    """train.compile=true on CPU (inductor): slow, because compiling the backward takes minutes on 2 cores."""
    run = tmp_path / "compiled"
    first = tiny_config(small_shards, run, "train.compile=true", "train.epochs=1", *SMALL)
    records = run_ranks([Job(first), Job(tiny_config(small_shards, run, "train.compile=true", "train.epochs=2", *SMALL),
                                                        policy="with_changes")],
                        tmp_path / "ranks", world_size=1, timeout_s=1800)
    assert all("error" not in job[0] for job in records), [job[0].get("error") for job in records]
    # The second job resumed where the first ended and trained one more epoch.
    assert records[1][0]["epochs"][0]["global_step"] > records[0][0]["epochs"][-1]["global_step"]
    state = weights(run, BEST)
    assert not [k for k in state if "_orig_mod" in k]
    build_model(first.model, read_manifest(small_shards).num_classes).load_state_dict(state, strict=True)
    assert cli.main(["evaluate", "--run", str(run), "--split", "val"]) == 0
    assert cli.main(["predict", "--checkpoint", str(run / BEST), str(_any_jpeg(tmp_path))]) == 0
    assert "style" in capsys.readouterr().out


def _any_jpeg(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "any.jpg"
    Image.new("RGB", (48, 40), (120, 30, 200)).save(path)
    return path


@pytest.mark.slow
def test_a_compile_that_fails_is_one_clear_error(small_shards, tmp_path, monkeypatch):
    """No C++ compiler for inductor: the trainer's UserError names train.compile, not a dynamo traceback."""
    import torch._inductor.config as inductor_config

    from artdist.errors import UserError
    from artdist.train.trainer import main as train_main

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    cfg = tiny_config(small_shards, tmp_path / "run", "train.compile=true", "train.epochs=1", *SMALL)
    with pytest.raises(UserError, match=r"^train.compile: torch.compile of the backbone failed .*train.compile=false"):
        train_main(cfg)
