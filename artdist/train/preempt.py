"""Preemption notice (signal or stop file) that all ranks agree on, and SLURM requeue."""
from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path
from types import FrameType

import torch

from artdist.dist import all_reduce_sum
from artdist.errors import UserError

# SLURM/submitit send SIGUSR2 before the time limit; `timeout`, Kubernetes, torchrun's shutdown and
# SLURM's own end of a job send SIGTERM. Both mean: finish the step, save, stop.
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class PreemptionWatch:
    """Asks training to stop cleanly after the current step.

    Fires when one of `signals` reached this process or when `stop_file` exists (`touch RUN_DIR/PREEMPT`
    by hand or from a job script). After should_stop() is true, `signalled` says whether a signal (on
    any rank) was among the reasons. `device` is where the agreement all-reduce runs: the rank's CUDA
    device under NCCL.
    """

    def __init__(self, stop_file: Path, signals: Iterable[signal.Signals] = STOP_SIGNALS,
                 device: torch.device | str = "cpu"):
        self.stop_file = Path(stop_file)
        self.signals = tuple(signals)
        self.device = torch.device(device)
        self.notified = False
        self.signalled = False

    def install(self) -> PreemptionWatch:
        """Replace any earlier handler (e.g. submitit's) with one that only sets a flag.

        Whatever the signal interrupts keeps running; the trainer checks the flag between steps.
        """
        for sig in self.signals:
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.notified = True

    def should_stop(self) -> bool:
        """True on every rank as soon as any rank saw the signal or the stop file (a collective)."""
        local = self.noticed()
        flags = all_reduce_sum(torch.tensor([float(local), float(self.notified)], device=self.device)).tolist()
        self.signalled = flags[1] > 0
        return flags[0] > 0

    def noticed(self) -> bool:
        """This rank saw a signal or the stop file, checked or not (one that came after the last step)."""
        return self.notified or self.stop_file.exists()


def requeue_slurm_job(job_id: str | None = None) -> None:
    """`scontrol requeue` this SLURM job (default $SLURM_JOB_ID) so it restarts and resumes."""
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise UserError("cannot requeue: SLURM_JOB_ID is not set (not running inside a SLURM job)")
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError("cannot requeue: scontrol is not on PATH on this node") from None
    except subprocess.CalledProcessError as exc:
        raise UserError(f"scontrol requeue {job_id} failed: {exc.stderr.strip() or exc}; "
                        f"resubmit the same job (it resumes from model_last.pt)") from None
    print(f"requeued SLURM job {job_id}", flush=True)
