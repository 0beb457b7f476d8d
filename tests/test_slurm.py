"""On a real SLURM (.ci/slurm-up.sh): sbatch launch.sh and artdist submit run to the end, and a
preempted job saves, is requeued, resumes and ends with the same weights as an uninterrupted run."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
JOB_TIMEOUT_S = 900  # generous: the CI machine's 2 cores may be busy


def _cluster_down_reason() -> str | None:
    if shutil.which("sinfo") is None:
        return "sinfo not found: start a local SLURM with .ci/slurm-up.sh"
    res = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True)
    if res.returncode != 0:
        return f"SLURM is not answering (sinfo: {res.stderr.strip()}): start it with .ci/slurm-up.sh"
    if not re.search(r"^(idle|mixed|allocated)", res.stdout, re.M):
        return f"no usable SLURM node (sinfo states: {res.stdout.split()}): restart with .ci/slurm-up.sh"
    return None


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_cluster_down_reason() is not None,
                                                    reason=str(_cluster_down_reason()))]


def job_env() -> dict[str, str]:
    """This interpreter's venv first on PATH: launch.sh's torchrun and python are the tests' own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ARTDIST_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def tiny(shards: Path, planted: Path, run_dir: Path) -> list[str]:
    """jobs/demo.yaml made tiny and bit-reproducible on CPU: 2 epochs of 8 steps at 32 px."""
    sets = {"out_dir": run_dir, "data.shards": shards, "data.image_size": 32, "data.batch_size": 16,
            "data.num_workers": 0, "data.shuffle_buffer": 50, "model.lstm_hidden": 32, "train.epochs": 2,
            "train.log_every": 1, "train.deterministic": "true", "train.device": "cpu",
            "outliers.planted": planted}
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def job_state(job_id: str) -> str:
    res = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True)
    lines = res.stdout.split()
    return lines[-1] if lines else "UNKNOWN"


def wait_for_job(job_id: str, log: Path) -> str:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (state := job_state(job_id)) not in TERMINAL:
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id])
            pytest.fail(f"job {job_id} still {state} after {JOB_TIMEOUT_S}s; log {log}")
        time.sleep(2)
    return state


def wait_for_text(path: Path, pattern: str, job_id: str) -> None:
    """Until `pattern` shows up in `path` (the job's log), while the job lives."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (path.is_file() and re.search(pattern, path.read_text())):
        state = job_state(job_id)
        if state in TERMINAL or time.monotonic() > deadline:
            pytest.fail(f"job {job_id} ({state}) never logged {pattern!r}; log {path}")
        time.sleep(0.5)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model_last.pt", map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def assert_finished_run(run_dir: Path) -> None:
    for name in ("model_last.pt", "model_best.pt", "metrics.jsonl", "config.yaml", "eval_test.json"):
        assert (run_dir / name).is_file(), f"{run_dir / name} missing"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2  # one line per epoch


# --------------------------------------------------------------------------- sbatch launch.sh


def sbatch_launch(tmp: Path, shards: Path, planted: Path) -> tuple[str, Path, Path]:
    """Submit launch.sh from a fresh directory `tmp` (where SLURM writes its log); (job id, run dir, log)."""
    run_dir = tmp / "run"
    cpus = min(2, os.cpu_count() or 1)
    res = subprocess.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", f"--cpus-per-task={cpus}", "--time=30",
         str(REPO / "launch.sh"), str(REPO / "jobs" / "demo.yaml"), *tiny(shards, planted, run_dir)],
        cwd=tmp, env={**job_env(), "ARTDIST_NPROC": "2"}, capture_output=True, text=True, check=True)
    job_id = res.stdout.strip().split(";")[0]
    return job_id, run_dir, tmp / f"slurm-artdist-{job_id}.out"


@pytest.fixture(scope="module")
def sbatch_reference(tmp_path_factory, demo_shards, synth_corpus) -> tuple[str, Path, Path, str]:
    """An uninterrupted sbatch launch.sh run: (job id, run dir, log, final state)."""
    job_id, run_dir, log = sbatch_launch(tmp_path_factory.mktemp("sbatch"), demo_shards,
                                         synth_corpus / "planted_noise.csv")
    return job_id, run_dir, log, wait_for_job(job_id, log)


def test_sbatch_launch_runs_to_completion(sbatch_reference):
    job_id, run_dir, log, state = sbatch_reference
    assert state == "COMPLETED", f"job {job_id} ended {state}; log {log}"
    assert_finished_run(run_dir)
    text = log.read_text()
    assert f"launch.sh: job {job_id} (restart 0): 1 node(s) x 2 process(es)" in text
    assert "artdist train demo: 2 process(es) on cpu" in text
    assert "auroc" in text.lower()  # the outlier report against the planted noise
    assert f"run directory: {run_dir}" in text
    # The log stays where SLURM wrote it (the submit dir); the run dir links to it.
    link = run_dir / "slurm" / log.name
    assert link.is_symlink() and link.resolve() == log.resolve()
    assert not (run_dir / "PREEMPT").exists()


def test_sbatch_launch_preempted_requeues_resumes_and_matches_uninterrupted(sbatch_reference, tmp_path,
                                                                             demo_shards, synth_corpus):
    job_id, run_dir, log = sbatch_launch(tmp_path, demo_shards, synth_corpus / "planted_noise.csv")
    wait_for_text(log, r"epoch 1/2 step 3/", job_id)
    # What SLURM sends 120 s before the time limit (--signal=B:USR2@120): to the batch shell only.
    subprocess.run(["scancel", "--signal=USR2", "--batch", job_id], check=True)
    state = wait_for_job(job_id, log)
    text = log.read_text()
    assert state == "COMPLETED", f"job {job_id} ended {state}; log {log}"
    assert "USR2: asking training to save and stop" in text
    assert f"requeueing job {job_id}" in text
    assert f"launch.sh: job {job_id} (restart 1)" in text
    assert re.search(r"resuming from .*model_last.pt: epoch \d+, step \d+", text)
    assert_finished_run(run_dir)
    assert_same_weights(final_weights(run_dir), final_weights(sbatch_reference[1]))


# --------------------------------------------------------------------------- artdist submit (submitit)


def submit(run_dir: Path, shards: Path, planted: Path) -> submitit.Job:
    """`artdist submit` 2 CPU tasks (gloo) on 1 node; the job, found again from the printed id."""
    res = subprocess.run(
        [sys.executable, "-m", "artdist", "submit", "--config", str(REPO / "jobs" / "demo.yaml"),
         "--nodes", "1", "--gpus-per-node", "2", "--cpus-per-task", "1", "--time", "30",
         *tiny(shards, planted, run_dir)],
        env=job_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    job_id = re.search(r"submitted job (\d+) to SLURM", res.stdout).group(1)
    log = run_dir / "slurm" / job_id / f"{job_id}_0_log.out"
    assert f"tail -f {log}" in res.stdout and f"squeue -j {job_id}" in res.stdout
    return submitit.SlurmJob(run_dir / "slurm" / "%j", job_id, tasks=(0, 1))


@pytest.fixture(scope="module")
def submit_reference(tmp_path_factory, demo_shards, synth_corpus) -> tuple[submitit.Job, Path]:
    run_dir = tmp_path_factory.mktemp("submit") / "run"
    job = submit(run_dir, demo_shards, synth_corpus / "planted_noise.csv")
    wait_for_job(job.job_id, job.task(0).paths.stdout)
    return job, run_dir


def test_submit_two_tasks_completes(submit_reference):
    job, run_dir = submit_reference
    assert job.results() == ["done", "done"]
    assert job_state(job.job_id) == "COMPLETED"
    assert_finished_run(run_dir)
    assert "artdist train demo: 2 process(es) on cpu" in job.task(0).paths.stdout.read_text()


def test_submit_preempted_requeues_resumes_and_matches_uninterrupted(submit_reference, tmp_path,
                                                                     demo_shards, synth_corpus):
    job = submit(tmp_path / "run", demo_shards, synth_corpus / "planted_noise.csv")
    wait_for_text(job.task(0).paths.stdout, r"epoch 1/2 step 3/", job.job_id)
    # USR2 to every task, as SLURM does signal_delay_s before the time limit of a submitit job.
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    assert wait_for_job(job.job_id, job.task(0).paths.stdout) == "COMPLETED"
    assert job.results() == ["done", "done"]
    text = job.task(0).paths.stdout.read_text()
    assert f"requeued SLURM job {job.job_id}" in text
    assert re.search(r"resuming from .*model_last.pt: epoch \d+, step \d+", text)
    assert_finished_run(tmp_path / "run")
    assert_same_weights(final_weights(tmp_path / "run"), final_weights(submit_reference[1]))
