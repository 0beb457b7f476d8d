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
from artdist.config import JobConfig, load_config
from artdist.dist import route_interface

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
        f"env TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc_per_node={nproc} --max-restarts=0 "
        r"-m artdist train --config jobs/demo.yaml --set train.epochs=1 --set name=x\ y"]
    assert "run directory: runs/x y" in res.stdout
    assert "tensorboard --logdir runs/x y/tb" in res.stdout


def test_artdist_nproc_overrides_the_process_count():
    res = launch("jobs/demo.yaml", ARTDIST_DRY_RUN="1", ARTDIST_NPROC="3", ARTDIST_MAX_RESTARTS="2")
    assert res.returncode == 0, res.stderr
    assert "torchrun --standalone --nproc_per_node=3 --max-restarts=2 " in commands(res.stdout)[0]


def test_sbatch_mode_asks_for_the_config_slurm_resources():
    """./launch.sh --sbatch: what artdist submit would ask for; slurm.cpus_per_task is per process."""
    res = launch("--sbatch", "jobs/wikiart_style_r50.yaml", "--set", "slurm.nodes=2", "--set", "slurm.partition=gpu",
                 "--set", "slurm.mem_gb=200", ARTDIST_DRY_RUN="1")
    assert res.returncode == 0, res.stderr
    assert commands(res.stdout) == [
        f"sbatch --nodes=2 --gpus-per-node=4 --cpus-per-task=40 --time=720 --signal=B:USR2@120 --partition=gpu "
        rf"--mem=200G --export=ALL\,ARTDIST_NPROC=4 {LAUNCH} jobs/wikiart_style_r50.yaml --set slurm.nodes=2 "
        "--set slurm.partition=gpu --set slurm.mem_gb=200"]
    # On CPU nodes gpus_per_node counts processes and no GPU is asked for.
    res = launch("--sbatch", "jobs/demo.yaml", "--set", "train.device=cpu", "--set", "slurm.gpus_per_node=2",
                 "--set", "slurm.cpus_per_task=3", ARTDIST_DRY_RUN="1")
    assert commands(res.stdout)[0].startswith(
        r"sbatch --nodes=1 --gpus-per-node=0 --cpus-per-task=6 --time=240 --signal=B:USR2@120 --export=ALL\,ARTDIST_NPROC=2 ")


def test_demo_prepares_data_once_then_trains(tmp_path):
    (tmp_path / "jobs").mkdir()
    shutil.copy(REPO / "jobs" / "demo.yaml", tmp_path / "jobs" / "demo.yaml")
    first = launch(cwd=tmp_path, ARTDIST_DRY_RUN="1")
    assert first.returncode == 0, first.stderr
    steps = commands(first.stdout)
    assert steps[0] == "python -m artdist synth --config jobs/demo.yaml"
    assert steps[1] == "python -m artdist shard --config jobs/demo.yaml"
    assert re.fullmatch(r"env TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc_per_node=\d+ "
                        r"--max-restarts=0 -m artdist train --config jobs/demo.yaml", steps[2])
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
    assert len(steps) == 2 and " torchrun " in steps[0] and steps[1].startswith("python -m artdist duplicates")
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


# A worker that dies on the first attempt; the restarted pair must meet again and all-reduce.
RESTART_SCRIPT = """
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.ones(1)
for i in range(4):
    dist.all_reduce(t)
    if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and dist.get_rank() == 1 and i == 1:
        os._exit(9)
print(f"rank {dist.get_rank()} attempt {os.environ['TORCHELASTIC_RESTART_COUNT']} sum {t.item():.0f}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_restart_as_launch_sh_runs_it_meets_again(tmp_path):
    """torchrun --max-restarts with launch.sh's environment: without it the restarted workers read the
    dead ones' addresses from the agent's store ("Gloo connectFullMesh failed ... Connection refused",
    2 of 3 tries here)."""
    res = launch("jobs/demo.yaml", ARTDIST_DRY_RUN="1", ARTDIST_NPROC="2", ARTDIST_MAX_RESTARTS="1")
    cmd = commands(res.stdout)[0].split(" -m artdist train ")[0].split()
    assert cmd[0] == "env" and "--max-restarts=1" in cmd
    (tmp_path / "worker.py").write_text(RESTART_SCRIPT)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ARTDIST_", "TORCH"))}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base['PATH']}"
    for attempt in range(3):
        run = subprocess.run([*cmd, str(tmp_path / "worker.py")], env=base, capture_output=True, text=True, timeout=300)
        out = run.stdout + run.stderr
        assert run.returncode == 0, f"attempt {attempt}: {out[-3000:]}"
        assert "rank 0 attempt 1 sum 16" in out and "rank 1 attempt 1 sum 16" in out


def test_route_interface_names_the_interface_towards_a_host():
    assert route_interface("127.0.0.1") == "lo"
    assert route_interface("no-such-host.invalid") is None


@pytest.mark.parametrize("given, route, expected", [
    (None, "eth7", "eth7"),     # chosen: the interface towards MASTER_ADDR
    ("ib0", "eth7", "ib0"),     # the user's choice stays
    (None, "lo", None),         # one node: gloo's default is fine
    (None, None, None),         # MASTER_ADDR does not resolve here: leave it to gloo
])
def test_train_task_picks_the_gloo_interface_towards_the_master(slurm_task_env, monkeypatch, given, route, expected):
    if given:
        slurm_task_env["GLOO_SOCKET_IFNAME"] = given
    else:
        slurm_task_env.pop("GLOO_SOCKET_IFNAME", None)
    asked = []
    monkeypatch.setattr(submit, "route_interface", lambda host: asked.append(host) or route)
    monkeypatch.setattr(submit, "train_main", lambda cfg: "done")
    assert submit.TrainTask(JobConfig())() == "done"
    assert os.environ.get("GLOO_SOCKET_IFNAME") == expected
    assert asked == ([] if given else ["node1"])


def test_eight_gpu_config_follows_the_lr_scaling_rule():
    """jobs/wikiart_style_r50_2x8gpu.yaml: the LRs of wikiart_style_r50 scaled with the global batch."""
    def global_batch(cfg):
        return cfg.data.batch_size * cfg.slurm.nodes * cfg.slurm.gpus_per_node * cfg.train.accum_steps

    base = load_config(REPO / "jobs" / "wikiart_style_r50.yaml")
    big = load_config(REPO / "jobs" / "wikiart_style_r50_2x8gpu.yaml")
    assert (big.slurm.nodes, big.slurm.gpus_per_node, global_batch(base), global_batch(big)) == (2, 8, 256, 1024)
    for key in ("lr", "backbone_lr"):
        assert getattr(big.train, key) == pytest.approx(getattr(base.train, key) * global_batch(big) / global_batch(base))
