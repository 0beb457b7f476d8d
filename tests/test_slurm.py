"""On a real two-node SLURM (.ci/slurm-up.sh --nodes 2: nodes in network namespaces with their own
addresses and host names): sbatch launch.sh and artdist submit train across both nodes; a preempted
job saves, is requeued and ends with the same weights as an uninterrupted run; a killed rank ends the
job at once with a message naming its node and rank, or, with torchrun restarts, the run resumes from
the last checkpoint; an unreachable rendezvous is one line naming host and port."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import submitit
import torch

from artdist.train.tensorboard import event_dir

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
JOB_TIMEOUT_S = 900  # generous: the CI machine's 2 cores may be busy
NODES = ["artdist-node1", "artdist-node2"]  # what .ci/slurm-up.sh --nodes 2 creates


def _cluster_down_reason() -> str | None:
    if shutil.which("sinfo") is None:
        return "sinfo not found: start a local SLURM with .ci/slurm-up.sh --nodes 2"
    res = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True)
    if res.returncode != 0:
        return f"SLURM is not answering (sinfo: {res.stderr.strip()}): start it with .ci/slurm-up.sh --nodes 2"
    usable = dict(line.split() for line in res.stdout.splitlines())
    if not all(re.match(r"(idle|mixed|allocated)", usable.get(node, "")) for node in NODES):
        return f"the tests need nodes {NODES} (sinfo: {usable}): restart with .ci/slurm-down.sh && .ci/slurm-up.sh --nodes 2"
    return None


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_cluster_down_reason() is not None,
                                                    reason=str(_cluster_down_reason()))]


def job_env(**extra: str) -> dict[str, str]:
    """This interpreter's venv first on PATH: launch.sh's torchrun and python are the tests' own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ARTDIST_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return {**env, **extra}


def tiny(shards: Path, planted: Path, run_dir: Path, outliers: bool = False) -> list[str]:
    """jobs/demo.yaml made tiny and bit-reproducible on CPU: 2 epochs of 8 steps at 32 px, saving every 3 steps."""
    sets = {"out_dir": run_dir, "data.shards": shards, "data.image_size": 32, "data.batch_size": 16,
            "data.num_workers": 0, "data.shuffle_buffer": 50, "model.lstm_hidden": 32, "train.epochs": 2,
            "train.log_every": 1, "train.checkpoint_every": 3, "train.deterministic": "true", "train.device": "cpu",
            "outliers.enabled": str(outliers).lower(), "outliers.planted": planted}
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


def assert_two_node_run(text: str, run_dir: Path) -> set[tuple[str, str]]:
    """Both nodes' ranks trained the same parameters; one process (global rank 0, on node 1) wrote the run dir."""
    assert f"ranks by host: {NODES[0]}: 0; {NODES[1]}: 1" in text  # each rank reports its own host name
    assert "final parameters identical on all 2 ranks" in text
    # Only rank 0 writes TensorBoard events; a file's name says the host and PID that wrote it.
    writers = {tuple(e.name.split(".")[4:6]) for e in Path(event_dir(run_dir)).glob("events.out.tfevents.*")}
    assert writers and all(host == NODES[0] for host, _ in writers), writers
    return writers


def training_pids(job_id: str) -> dict[int, tuple[int, str]]:
    """Global rank -> (PID, node) of SLURM job `job_id`'s training processes (the nodes share this PID
    space): torchrun's workers under launch.sh (RANK in their environment), submitit's tasks (SLURM_PROCID)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
            cmd = (proc / "cmdline").read_text().split("\0")
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") != job_id:
            continue
        if "LOCAL_RANK" in env and "artdist" in cmd and "train" in cmd:
            found[int(env["RANK"])] = (int(proc.name), env.get("SLURMD_NODENAME", ""))
        elif "submitit.core._submit" in cmd:
            found[int(env["SLURM_PROCID"])] = (int(proc.name), env.get("SLURMD_NODENAME", ""))
    return found


def rank_pid(job_id: str, rank: int) -> tuple[int, str]:
    """(PID, node) of global rank `rank`'s training process in SLURM job `job_id`."""
    found = training_pids(job_id)
    if rank not in found:
        pytest.fail(f"no training process of rank {rank} in job {job_id} (found ranks {sorted(found)})")
    return found[rank]


@contextmanager
def paused(job_id: str, ranks: int = 2) -> Iterator[list[int]]:
    """The job's training processes stopped (SIGSTOP) for the block, then continued: a notice sent in the
    block reaches training mid-epoch however slow the machine, instead of racing the last steps."""
    pids = [rank_pid(job_id, rank)[0] for rank in range(ranks)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield pids
    finally:
        for pid in pids:
            with suppress(ProcessLookupError):  # a rank the block killed
                os.kill(pid, signal.SIGCONT)


def wait_until(done: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(0.2)


def signal_pending(pid: int, sig: signal.Signals) -> bool:
    """Whether `sig` waits, undelivered, for process `pid` (a stopped process keeps it until SIGCONT)."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    pending = int(status["ShdPnd"], 16) | int(status["SigPnd"], 16)
    return bool(pending >> (sig - 1) & 1)


# --------------------------------------------------------------------------- sbatch launch.sh


def sbatch_launch(tmp: Path, shards: Path, planted: Path, outliers: bool = False, **env: str) -> tuple[str, Path, Path]:
    """Submit launch.sh on 2 nodes x 1 CPU process from a fresh directory `tmp` (where SLURM writes its
    log); (job id, run dir, log)."""
    run_dir = tmp / "run"
    cpus = min(2, os.cpu_count() or 1)
    res = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", f"--cpus-per-task={cpus}", "--time=30",
         str(REPO / "launch.sh"), str(REPO / "jobs" / "demo.yaml"), *tiny(shards, planted, run_dir, outliers)],
        cwd=tmp, env=job_env(ARTDIST_NPROC="1", **env), capture_output=True, text=True, check=True)
    job_id = res.stdout.strip().split(";")[0]
    return job_id, run_dir, tmp / f"slurm-artdist-{job_id}.out"


@pytest.fixture(scope="module")
def sbatch_reference(tmp_path_factory, demo_shards, synth_corpus) -> tuple[str, Path, Path, str]:
    """An uninterrupted 2-node run submitted by `./launch.sh --sbatch` with the same resources, from
    the config's slurm: section: (job id, run dir, log, final state)."""
    tmp = tmp_path_factory.mktemp("sbatch")
    run_dir = tmp / "run"
    slurm = {"slurm.nodes": 2, "slurm.gpus_per_node": 1, "slurm.cpus_per_task": min(2, os.cpu_count() or 1),
             "slurm.time_min": 30}
    res = subprocess.run(
        ["bash", str(REPO / "launch.sh"), "--sbatch", str(REPO / "jobs" / "demo.yaml"),
         *tiny(demo_shards, synth_corpus / "planted_noise.csv", run_dir, outliers=True),
         *[arg for key, value in slurm.items() for arg in ("--set", f"{key}={value}")]],
        cwd=tmp, env=job_env(), capture_output=True, text=True, check=True)
    job_id = re.search(r"Submitted batch job (\d+)", res.stdout).group(1)
    log = tmp / f"slurm-artdist-{job_id}.out"
    return job_id, run_dir, log, wait_for_job(job_id, log)


def test_sbatch_launch_trains_on_both_nodes(sbatch_reference):
    job_id, run_dir, log, state = sbatch_reference
    assert state == "COMPLETED", f"job {job_id} ended {state}; log {log}"
    assert_finished_run(run_dir)
    text = log.read_text()
    assert f"launch.sh: job {job_id} (restart 0): 2 node(s) x 1 process(es)" in text
    assert "differs from the config" not in text  # --sbatch asked for the config's resources
    # One torchrun per node, both pointed at the first node's address, gloo on the node's own interface.
    port = 20000 + int(job_id) % 20000
    for i, node in enumerate(NODES):
        assert (f"launch.sh: {node} (node {i}): rendezvous {NODES[0]}:{port} (10.213.0.11), gloo interface eth0"
                in text), text
    assert "artdist train demo: 2 process(es) on cpu" in text
    assert len(assert_two_node_run(text, run_dir)) == 1  # one process wrote them
    assert "auroc" in text.lower()  # the outlier report against the planted noise
    assert f"run directory: {run_dir}" in text
    # The log stays where SLURM wrote it (the submit dir); the run dir links to it.
    link = run_dir / "slurm" / log.name
    assert link.is_symlink() and link.resolve() == log.resolve()
    assert not (run_dir / "PREEMPT").exists()


def test_sbatch_launch_preempted_requeues_resumes_and_matches_uninterrupted(sbatch_reference, tmp_path,
                                                                             demo_shards, synth_corpus):
    job_id, run_dir, log = sbatch_launch(tmp_path, demo_shards, synth_corpus / "planted_noise.csv")
    wait_for_text(log, r"epoch 1/2 step 4/", job_id)
    # What SLURM sends 120 s before the time limit (--signal=B:USR2@120): to the batch shell only; the
    # ranks on both nodes learn of it through the stop file and agree on the step to stop after.
    with paused(job_id):
        subprocess.run(["scancel", "--signal=USR2", "--batch", job_id], check=True)
        wait_until((run_dir / "PREEMPT").exists, "launch.sh touching the stop file after USR2")
    state = wait_for_job(job_id, log)
    text = log.read_text()
    assert state == "COMPLETED", f"job {job_id} ended {state}; log {log}"
    assert "USR2: asking training to save and stop" in text
    assert f"requeueing job {job_id}" in text
    assert f"launch.sh: job {job_id} (restart 1): 2 node(s)" in text
    assert re.search(r"resuming from .*model_last.pt: epoch \d+, step \d+", text)
    assert_finished_run(run_dir)
    assert_same_weights(final_weights(run_dir), final_weights(sbatch_reference[1]))


def test_killed_rank_on_node_2_ends_the_job_with_its_node_and_rank(tmp_path, demo_shards, synth_corpus):
    job_id, run_dir, log = sbatch_launch(tmp_path, demo_shards, synth_corpus / "planted_noise.csv")
    wait_for_text(log, r"epoch 1/2 step 2/", job_id)
    assert rank_pid(job_id, 1)[1] == NODES[1]
    with paused(job_id) as pids:  # killed mid-epoch, however slow the machine
        os.kill(pids[1], signal.SIGKILL)
    # Bounded: the survivors learn of it from the closed connections, not from a collective timeout
    # (30 min); a hang would end TIMEOUT or trip wait_for_job's deadline.
    assert wait_for_job(job_id, log) == "FAILED"
    text = log.read_text()
    assert f"launch.sh: error: {NODES[1]}: rank 1 (local_rank: 0) failed (Signal 9 (SIGKILL)" in text, text
    # The survivor on node 1 says so in one line, without a traceback (if srun --kill-on-bad-exit lets it).
    assert "[rank0]: Traceback" not in text, text
    said = [line for line in text.splitlines() if "another rank is gone" in line]
    assert all(re.match(r"artdist train: error: rank 0: another rank is gone \((Connection closed by peer |Read error )"
                        r"\[10\.213\.0\.12\]", line) for line in said), said
    assert "not requeued" in text
    # Submitted with sbatch options instead of the config's slurm: section (1 node, 1 GPU, 8 CPUs): said.
    assert ("launch.sh: note: this job differs from the config's slurm: section: 2 node(s) (config: 1), "
            "2 CPUs per node (config: 8 = slurm.cpus_per_task x processes);") in text


def test_torchrun_restart_resumes_from_the_last_checkpoint_and_matches_uninterrupted(sbatch_reference, tmp_path,
                                                                                      demo_shards, synth_corpus):
    job_id, run_dir, log = sbatch_launch(tmp_path, demo_shards, synth_corpus / "planted_noise.csv",
                                         ARTDIST_MAX_RESTARTS="1")
    wait_for_text(log, r"epoch 1/2 step 5/", job_id)  # train.checkpoint_every=3: model_last.pt is at step 3
    with paused(job_id) as pids:  # killed before the epoch's end, however slow the machine
        os.kill(pids[1], signal.SIGKILL)
    state = wait_for_job(job_id, log)
    text = log.read_text()
    assert state == "COMPLETED", f"job {job_id} ended {state}; log {log}"
    # The restarted workers meet in a fresh store (no "Gloo connectFullMesh failed") and resume.
    assert "connectFullMesh" not in text
    # From the last checkpoint before the kill: step 3, or step 6 when the kill lands after its save
    # (the rank's pid is looked up after "step 5" shows; a faster loader gets there first).
    assert re.search(r"resuming from .*model_last.pt: epoch 1, step [36],", text), text
    assert_finished_run(run_dir)
    assert_same_weights(final_weights(run_dir), final_weights(sbatch_reference[1]))


def test_unreachable_rendezvous_is_one_line_naming_host_and_port(tmp_path, demo_shards, synth_corpus):
    # 10.213.0.99 is on the nodes' network but nobody has it.
    job_id, run_dir, log = sbatch_launch(tmp_path, demo_shards, synth_corpus / "planted_noise.csv",
                                         ARTDIST_RDZV_HOST="10.213.0.99", ARTDIST_RDZV_TIMEOUT="10")
    assert wait_for_job(job_id, log) == "FAILED"
    port = 20000 + int(job_id) % 20000
    lines = [line for line in log.read_text().splitlines() if line.startswith("launch.sh: error:")]
    assert lines == [f"launch.sh: error: {NODES[1]}: the rendezvous 10.213.0.99:{port} (10.213.0.99) did not answer "
                     "within 10 s (ARTDIST_RDZV_TIMEOUT): is the first node up, and is the port open between nodes?"]


# --------------------------------------------------------------------------- artdist submit (submitit)


def submit(run_dir: Path, shards: Path, planted: Path) -> tuple[str, Path]:
    """`artdist submit --nodes 2`, one CPU task per node; (job id, rank 0's log)."""
    res = subprocess.run(
        [sys.executable, "-m", "artdist", "submit", "--config", str(REPO / "jobs" / "demo.yaml"),
         "--nodes", "2", "--gpus-per-node", "1", "--cpus-per-task", "1", "--time", "30",
         *tiny(shards, planted, run_dir)],
        env=job_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    job_id = re.search(r"submitted job (\d+) to SLURM: 2 node\(s\) x 1 task\(s\) on CPU", res.stdout).group(1)
    log = run_dir / "slurm" / job_id / f"{job_id}_0_log.out"
    assert f"tail -f {log}" in res.stdout and f"squeue -j {job_id}" in res.stdout
    return job_id, log


def test_submit_two_nodes_preempted_requeues_and_matches_uninterrupted(tmp_path, demo_shards, synth_corpus):
    """`artdist submit --nodes 2`: one task per node; USR2 to every task stops both nodes at one step.
    The uninterrupted twin runs alongside (1 CPU per task: both jobs fit on the two nodes at once)."""
    planted = synth_corpus / "planted_noise.csv"
    ref_id, ref_log = submit(tmp_path / "ref", demo_shards, planted)
    job_id, log = submit(tmp_path / "run", demo_shards, planted)
    wait_for_text(log, r"epoch 1/2 step 4/", job_id)
    # USR2 to every task, as SLURM does signal_delay_s before the time limit of a submitit job.
    with paused(job_id) as pids:
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        wait_until(lambda: all(signal_pending(pid, signal.SIGUSR2) for pid in pids), "USR2 reaching both tasks")
    for jid, jlog, run_dir in ((ref_id, ref_log, tmp_path / "ref"), (job_id, log, tmp_path / "run")):
        assert wait_for_job(jid, jlog) == "COMPLETED", f"job {jid}: log {jlog}"
        assert submitit.SlurmJob(run_dir / "slurm" / "%j", jid, tasks=(0, 1)).results() == ["done", "done"]
        assert_finished_run(run_dir)
        assert_two_node_run(jlog.read_text(), run_dir)
    text = log.read_text()
    assert f"requeued SLURM job {job_id}" in text
    assert re.search(r"resuming from .*model_last.pt: epoch \d+, step \d+", text)
    assert_same_weights(final_weights(tmp_path / "run"), final_weights(tmp_path / "ref"))
