"""Every file name of a run directory (docs/design.md "Run directory") in one place, and its lock; rank 0 writes them."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from artdist.dist import broadcast_object, is_main_process
from artdist.errors import UserError

LAST = "model_last.pt"
BEST = "model_best.pt"
STOP_FILE = "PREEMPT"  # its existence asks a running job to save and stop
LOCK = "LOCK"  # held by the one process (rank 0) writing this run dir
HEARTBEAT_S = 60.0  # the holder touches its lock this often...
STALE_S = 600.0  # ...so a lock from another host untouched this long belongs to a dead process


def dir_entry(name: str) -> property:
    """A directory-object attribute: the path of `name` inside `self.path` (RunDir, AuditDir)."""
    return property(lambda self: self.path / name)


class RunDir:
    """The paths of one run (`cfg.run_dir`, default runs/<name>/)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    config = dir_entry("config.yaml")
    last = dir_entry(LAST)
    best = dir_entry(BEST)
    metrics = dir_entry("metrics.jsonl")
    tensorboard = dir_entry("tb")
    class_counts = dir_entry("class_counts.json")  # train-split class counts for the loss weights, cached
    changes = dir_entry("config_changes.yaml")  # config changes a resume was allowed to make (--resume-with-changes)
    finished = dir_entry("finished.json")  # written last, when training, test and reports are done
    stop_file = dir_entry(STOP_FILE)
    slurm = dir_entry("slurm")

    def partial_saves(self) -> list[Path]:
        """Checkpoint temp files (train.checkpoint.save_atomic) left by a process killed mid-save."""
        return sorted(self.path.glob("model_*.pt.tmp"))

    def eval_report(self, split: str) -> Path:
        return self.path / f"eval_{split}.json"

    def outliers(self, split: str) -> Path:
        return self.path / "outliers" / split

    def checkpoint(self, name: str) -> Path:
        """A checkpoint by file name in this run, else `name` as a path.

        The run's own file first: `--run ../b` from inside run a must not pick up a's model_best.pt.
        """
        own = self.path / name
        return own if own.is_file() else Path(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class RunDirLock:
    """RUN_DIR/LOCK, created exclusively: {"host", "pid", "purpose", "slurm_job_id", "token"}.

    A lock is stale, and taken over, when its process is gone: on this host its pid is dead; from another
    host its heartbeat (mtime, refreshed every HEARTBEAT_S by a thread) is older than STALE_S; or it was
    left by an earlier run of this same SLURM job (a requeue). Anything else is a UserError naming the holder.
    """

    def __init__(self, run_dir: str | Path | RunDir, purpose: str):
        self.path = RunDir(run_dir).path / LOCK
        self.purpose = purpose
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "purpose": purpose,
                     "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> tuple[dict, float]:
        """The lock's content ({} when unreadable or half-written) and its age in seconds."""
        try:
            age = time.time() - self.path.stat().st_mtime
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}, -1.0
        except (OSError, ValueError):
            return {}, age
        return (holder if isinstance(holder, dict) else {}), age

    def _stale(self, holder: dict, age: float) -> bool:
        if not holder:
            return age > 10  # a kill between creating and writing the lock; younger: being written now
        if holder.get("slurm_job_id") and holder.get("slurm_job_id") == self.info["slurm_job_id"]:
            return holder.get("host") != self.info["host"] or not _alive(int(holder.get("pid", 0)))
        if holder.get("host") == self.info["host"]:
            return not _alive(int(holder.get("pid", 0)))
        return age > STALE_S

    def acquire(self) -> RunDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, age = self._holder()
                if age < 0:
                    continue  # released meanwhile
                if not self._stale(holder, age):
                    who = (f"{holder.get('purpose', 'a process')} by pid {holder.get('pid')} on host {holder.get('host')}"
                           + (f" (SLURM job {holder['slurm_job_id']})" if holder.get("slurm_job_id") else "")
                           if holder else "a process that is starting")
                    raise UserError(f"run dir {self.path.parent} is in use: {who} holds {self.path} (heartbeat "
                                    f"{age:.0f} s ago); wait for it, pick another name/out_dir, or delete {self.path} "
                                    "if that process is gone")
                print(f"note: taking over the stale lock {self.path} of {holder or 'an unknown process'}", flush=True)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.info))
            self._thread = threading.Thread(target=self._beat, name="artdist-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise UserError(f"could not take {self.path}: other processes keep creating it; is this run dir shared by "
                        "several jobs?")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat; remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder, _ = self._holder()
        if holder.get("token") == self.info["token"]:
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(run_dir: str | Path | RunDir, purpose: str) -> Iterator[None]:
    """Every rank: rank 0 holds the run dir's lock for the block; any rank raises the same UserError when it
    is taken (a collective)."""
    lock, failure = None, None
    if is_main_process():
        try:
            lock = RunDirLock(run_dir, purpose).acquire()
        except UserError as exc:
            failure = str(exc)
    failure = broadcast_object(failure)
    if failure:
        raise UserError(failure)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
