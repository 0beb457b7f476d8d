"""launch.sh outside SLURM (help, the torchrun command it picks, the demo steps, bad input); artdist submit
(help, a --local run, the task's requeue decision)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from submitit.local.local import LocalJob

from artdist import submit
from artdist.cli import main
from artdist.config import JobConfig

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch.sh"


def launch(*args: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    """Run launch.sh with this interpreter's venv first on PATH and no SLURM job around it."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ARTDIST_"))}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base['PATH']}"
    return subprocess.run(["bash", str(LAUNCH), *args], cwd=cwd, env={**base, **env}, capture_output=True,
                          text=True, timeout=300)


def commands(out: str) -> list[str]:
    """The commands a dry run printed (`+ cmd args`)."""
    return [line[2:] for line in out.splitlines() if line.startswith("+ ")]


def test_help_lists_the_three_ways_and_the_knobs():
    res = launch("--help")
    assert res.returncode == 0, res.stderr
    for text in ("sbatch", "./launch.sh jobs/X.yaml", "ARTDIST_NPROC", "ARTDIST_DRY_RUN", "--signal=B:USR2@120"):
        assert text in res.stdout


def test_outside_slurm_runs_torchrun_standalone_one_process_per_gpu_or_two_on_cpu():
    res = launch("jobs/demo.yaml", "--set", "train.epochs=1", "--set", "name=x y", ARTDIST_DRY_RUN="1")
    assert res.returncode == 0, res.stderr
    nproc = torch.cuda.device_count() or 2
    assert commands(res.stdout) == [
        f"torchrun --standalone --nproc_per_node={nproc} -m artdist train --config jobs/demo.yaml "
        r"--set train.epochs=1 --set name=x\ y"]
    assert "run directory: runs/x y" in res.stdout
    assert "tensorboard --logdir runs/x y/tb" in res.stdout


def test_artdist_nproc_overrides_the_process_count():
    res = launch("jobs/demo.yaml", ARTDIST_DRY_RUN="1", ARTDIST_NPROC="3")
    assert res.returncode == 0, res.stderr
    assert commands(res.stdout)[0].startswith("torchrun --standalone --nproc_per_node=3 ")


def test_demo_prepares_data_once_then_trains(tmp_path):
    (tmp_path / "jobs").mkdir()
    shutil.copy(REPO / "jobs" / "demo.yaml", tmp_path / "jobs" / "demo.yaml")
    first = launch(cwd=tmp_path, ARTDIST_DRY_RUN="1")
    assert first.returncode == 0, first.stderr
    steps = commands(first.stdout)
    assert steps[0] == "python -m artdist synth --config jobs/demo.yaml"
    assert steps[1] == "python -m artdist shard --config jobs/demo.yaml"
    assert re.fullmatch(r"torchrun --standalone --nproc_per_node=\d+ -m artdist train --config jobs/demo.yaml", steps[2])
    assert steps[3] == "python -m artdist duplicates --run runs/demo"
    assert len(steps) == 4  # training itself ends with the test evaluation and the outlier reports
    assert "outliers: runs/demo/outliers/val/index.html" in first.stdout
    assert first.stdout.rstrip().endswith("watch it with: tensorboard --logdir runs/demo/tb")

    # What synth and shard leave behind when they finished: the demo skips them next time.
    (tmp_path / "data" / "synth").mkdir(parents=True)
    (tmp_path / "data" / "synth" / "planted_noise.csv").write_text("path,task,true_label,assigned_label\n")
    (tmp_path / "shards" / "demo").mkdir(parents=True)
    (tmp_path / "shards" / "demo" / "manifest.json").write_text("{}")
    again = launch(cwd=tmp_path, ARTDIST_DRY_RUN="1")
    assert again.returncode == 0, again.stderr
    steps = commands(again.stdout)
    assert [s.split()[0] for s in steps] == ["torchrun", "python"]
    assert "skipping artdist synth" in again.stdout and "skipping artdist shard" in again.stdout


@pytest.mark.parametrize("args, message", [
    (["jobs/demo.yaml", "--bogus"], "unexpected argument '--bogus'"),
    (["jobs/nope.yaml"], "job config jobs/nope.yaml not found"),
    (["jobs/demo.yaml", "--set", "train.epochs=x"], "train.epochs must be an integer"),
])
def test_bad_input_is_one_clear_line_and_status_2(args, message):
    res = launch(*args, ARTDIST_DRY_RUN="1")
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert commands(res.stdout) == []


def test_missing_venv_is_reported():
    res = launch("jobs/demo.yaml", ARTDIST_DRY_RUN="1", ARTDIST_VENV="/nonexistent/venv")
    assert res.returncode == 2
    assert "ARTDIST_VENV=/nonexistent/venv has no bin/activate" in res.stderr


def test_submit_help_lists_the_resource_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["submit", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--nodes", "--gpus-per-node", "--partition", "--time", "--account", "--qos", "--cpus-per-task",
                 "--mem-gb", "--constraint", "--local", "--set"):
        assert flag in out


def test_submit_flags_are_checked_like_config_keys(capsys):
    assert main(["submit", "--config", str(REPO / "jobs" / "demo.yaml"), "--local", "--nodes", "0"]) == 2
    assert "slurm.nodes must be > 0, got 0" in capsys.readouterr().err


def test_submit_local_runs_two_tasks_to_a_finished_run(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "artdist", "submit", "--config", str(REPO / "jobs" / "demo.yaml"), "--local",
         "--gpus-per-node", "2",
         "--set", f"out_dir={run_dir}", "--set", f"data.shards={demo_shards}", "--set", "data.image_size=32",
         "--set", "data.batch_size=16", "--set", "data.num_workers=0", "--set", "data.shuffle_buffer=50",
         "--set", "model.lstm_hidden=32", "--set", "train.epochs=1", "--set", "train.device=cpu",
         "--set", "outliers.enabled=false", "--set", "outliers.planted="],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    job_id = re.search(r"submitted job (\d+) on this machine", res.stdout).group(1)
    log = run_dir / "slurm" / job_id / f"{job_id}_0_log.out"
    assert f"tail -f {log}" in res.stdout
    assert f"tensorboard --logdir {run_dir / 'tb'}" in res.stdout

    # The job outlives the submitting process; its tasks leave one result file each when done.
    results = [run_dir / "slurm" / job_id / f"{job_id}_{task}_result.pkl" for task in (0, 1)]
    deadline = time.monotonic() + 600
    while not all(p.exists() for p in results):
        assert time.monotonic() < deadline, f"local job {job_id} did not finish; see {log}"
        time.sleep(2)
    assert LocalJob(run_dir / "slurm" / "%j", job_id, tasks=[0, 1]).results() == ["done", "done"]
    assert "2 process(es) on cpu" in log.read_text()
    for name in ("model_last.pt", "model_best.pt", "metrics.jsonl", "config.yaml", "eval_test.json"):
        assert (run_dir / name).is_file(), name


@pytest.fixture
def slurm_task_env():
    """The environment of task 0 of a 1-task SLURM job, restored afterwards (the task exports into it)."""
    threads = torch.get_num_threads()
    with mock.patch.dict(os.environ, {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "42", "SLURM_NTASKS": "1",
                                      "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
                                      "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "node1"}):
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                    "ARTDIST_REQUEUE", "SLURM_RESTART_COUNT"):
            os.environ.pop(key, None)
        yield os.environ
    torch.set_num_threads(threads)


@pytest.mark.parametrize("restarts, outcome, requeue, result", [
    (0, "preempted", "1", SystemExit),  # the trainer requeued: no result, the requeued run gives it
    (19, "preempted", "1", SystemExit),
    (20, "preempted", None, "preempted"),  # slurm.max_num_timeout=20 reached: the job ends, saved
    (0, "done", "1", "done"),
])
def test_train_task_lets_the_trainer_requeue_until_the_limit(slurm_task_env, monkeypatch, restarts, outcome,
                                                             requeue, result):
    seen = {}

    def fake_main(cfg):
        seen.update({k: os.environ.get(k) for k in ("ARTDIST_REQUEUE", "RANK", "WORLD_SIZE", "MASTER_ADDR")})
        return outcome

    monkeypatch.setattr(submit, "train_main", fake_main)
    slurm_task_env["SLURM_RESTART_COUNT"] = str(restarts)
    task = submit.TrainTask(JobConfig())
    if result is SystemExit:
        with pytest.raises(SystemExit):
            task()
    else:
        assert task() == result
    assert seen == {"ARTDIST_REQUEUE": requeue, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "node1"}
    assert task.checkpoint().function is task


def test_task_layout_one_task_per_gpu_or_per_cpu_process():
    cfg = JobConfig()
    cfg.slurm.gpus_per_node = 4
    assert submit.task_layout(cfg, local=False) == (4, 4)
    cfg.train.device = "cpu"
    assert submit.task_layout(cfg, local=False) == (4, 0)
    cfg.slurm.gpus_per_node = 0
    assert submit.task_layout(cfg, local=False) == (1, 0)
