"""`artdist submit`: run `artdist train` on SLURM (or locally) through submitit, requeued after preemption.

One submitit task per GPU (`tasks_per_node = gpus_per_node`); each task exports the torch.distributed
env from SLURM's and calls `artdist.train.main`. Logs go to RUN_DIR/slurm/<job id>/.

Requeue, exactly one path: submitit installs a SIGUSR2 handler that would call `checkpoint()` and
`scontrol requeue` from inside the signal handler, on rank 0 only, mid-step. The trainer's
PreemptionWatch replaces that handler as soon as training starts, so for a notice during training
the trainer is the path: every rank finishes the step, rank 0 saves the exact position and, since
`__call__` sets ARTDIST_REQUEUE=1, runs `scontrol requeue`. `checkpoint()` only answers a notice that
arrives before the trainer has started (nothing to save then) and lets submitit requeue.
"""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import submitit
import torch

from artdist.config import JobConfig
from artdist.dist import route_interface
from artdist.errors import UserError
from artdist.job import main as train_main
from artdist.rundir import RunDir


class TrainTask:
    """The submitted callable: one per task; submitit pickles it (and the config) for the job.

    `main` trains the config on every rank (default: the training job, artdist.job.main).
    """

    def __init__(self, cfg: JobConfig, main: Callable[[JobConfig], str] | None = None):
        self.cfg = cfg
        self.main = main

    def __call__(self) -> str:
        # LOCAL_RANK picks this task's GPU in dist.init_distributed, so every task keeps all the
        # node's GPUs visible instead of submitit's one-device CUDA_VISIBLE_DEVICES.
        dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        # gloo's default interface is the address of this node's host name: loopback on many installs
        # (127.0.1.1), unreachable from other nodes. The one that reaches MASTER_ADDR always works.
        ifname = os.environ.get("GLOO_SOCKET_IFNAME") or route_interface(dist_env.master_addr)
        if ifname and ifname != "lo":
            os.environ["GLOO_SOCKET_IFNAME"] = ifname
        on_slurm = submitit.JobEnvironment().cluster == "slurm"
        # torchrun would set OMP_NUM_THREADS=1; instead use the cores each task has, without
        # oversubscribing them (SLURM gives each task cpus_per_task; locally the tasks share them).
        torch.set_num_threads(self.cfg.slurm.cpus_per_task if on_slurm
                              else max(1, (os.cpu_count() or 1) // dist_env.local_world_size))
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
        requeue = on_slurm and restarts < self.cfg.slurm.max_num_timeout
        if requeue:
            os.environ["ARTDIST_REQUEUE"] = "1"
        # Stopped by a notice (USR2 from SLURM is a signal: 'terminated'; the stop file: 'preempted').
        outcome = (self.main or train_main)(self.cfg)
        outcome = "preempted" if outcome == "terminated" else outcome
        if outcome == "preempted" and requeue:
            # Rank 0 has requeued the job: end without a result, as submitit does after its own
            # requeue, so job.result() waits for the requeued run instead of returning now.
            sys.exit(-1)
        return outcome

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """submitit's USR2 path (rank 0, before training started): resubmit as is; training resumes
        from model_last.pt by itself."""
        return submitit.helpers.DelayedSubmission(self)


def task_layout(cfg: JobConfig, local: bool) -> tuple[int, int]:
    """(tasks per node, GPUs per node): one task per GPU; on CPU gpus_per_node counts processes."""
    on_cpu = cfg.train.device == "cpu" or (local and not torch.cuda.is_available())
    tasks = max(cfg.slurm.gpus_per_node, 1)
    return tasks, 0 if on_cpu else cfg.slurm.gpus_per_node


def make_executor(cfg: JobConfig, local: bool) -> submitit.AutoExecutor:
    """A submitit executor with the config's slurm: resources, logging under RUN_DIR/slurm/<job id>."""
    if not local and shutil.which("sbatch") is None:
        raise UserError("sbatch is not on PATH: run artdist submit on a SLURM login node, or add --local "
                        "to run the same job on this machine")
    s = cfg.slurm
    tasks, gpus = task_layout(cfg, local)
    executor = submitit.AutoExecutor(folder=RunDir(cfg.run_dir).slurm / "%j", cluster="local" if local else "slurm",
                                     slurm_max_num_timeout=s.max_num_timeout)
    executor.update_parameters(
        name=f"artdist-{cfg.name}",
        nodes=s.nodes,
        tasks_per_node=tasks,
        gpus_per_node=gpus or None,
        cpus_per_task=s.cpus_per_task,
        mem_gb=s.mem_gb or None,
        timeout_min=s.time_min,
        slurm_partition=s.partition or None,
        slurm_account=s.account or None,
        slurm_qos=s.qos or None,
        slurm_constraint=s.constraint or None,
        slurm_signal_delay_s=s.signal_delay_s,
    )
    return executor


def submit_job(cfg: JobConfig, local: bool = False) -> submitit.Job:
    """Submit `cfg`'s training (SLURM, or this machine with `local`); returns the submitit job."""
    if local and cfg.slurm.nodes != 1:
        raise UserError(f"--local runs on this machine only: use --nodes 1 (got {cfg.slurm.nodes})")
    executor = make_executor(cfg, local)
    with sbatch_errors(cfg):
        return executor.submit(TrainTask(cfg))


@contextmanager
def sbatch_errors(cfg: JobConfig) -> Iterator[None]:
    """sbatch refusing a submission -> one UserError line (with the CPU-node hint where it applies)."""
    try:
        yield
    except submitit.core.utils.FailedJobError as exc:
        hint = ""
        if "gres" in str(exc).lower() and cfg.train.device != "cpu":
            hint = "; on nodes without GPUs add --set train.device=cpu (--gpus-per-node then counts processes)"
        raise UserError(f"sbatch refused the job: {str(exc).strip().splitlines()[-1]}{hint}") from None
