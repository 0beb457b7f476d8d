"""Multi-process test helpers: run train.main on N CPU ranks (gloo) and record what each rank saw."""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import shutil
import tarfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp

from artdist.job import main as job_main
from artdist.config import JobConfig
from artdist.dist import free_port
from artdist.rundir import LAST, STOP_FILE
from artdist.train import trainer as train
from artdist.train.preempt import PreemptionWatch


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports free now."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@dataclass
class Job:
    """One train.main call; rank 0 creates the run's stop file at the touch_stop_file_at-th
    should_stop() call (1-based; 0 = never), i.e. after that optimizer step; every rank exits with
    code 3 (as if killed, nothing saved) at the exit_at-th call instead."""

    cfg: JobConfig
    touch_stop_file_at: int = 0
    exit_at: int = 0
    policy: str = "check"  # what a rerun may change: artdist.train.resume.Policy


def run_ranks(jobs: list[Job], out: Path, world_size: int = 2, timeout_s: float = 600) -> list[list[dict]]:
    """Run the jobs one after another in one set of `world_size` spawned CPU ranks (gloo).

    -> records[job][rank] (see _worker). Starting processes costs more than a tiny training run,
    hence several jobs per set. Each rank works in its own empty directory out/cwd<rank>, so a
    file written other than through cfg.run_dir (absolute) shows up there. A rank exiting with a
    code raises torch.multiprocessing.ProcessExitedException (Job.exit_at); ranks still
    running after timeout_s (a hang) are killed and fail the test.
    """
    out.mkdir(parents=True, exist_ok=True)
    # A port per job: a rank that starts the next job while rank 0 still holds the last one's store would
    # otherwise join that store, read the old group's addresses and fail or hang (seen on a loaded 2-core VM).
    context = mp.start_processes(_worker, args=(world_size, free_ports(len(jobs)), jobs, str(out)), nprocs=world_size,
                                 start_method="spawn", join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise AssertionError(f"ranks still running after {timeout_s} s: a hang")
    return [[json.loads((out / f"job{j}-rank{r}.json").read_text()) for r in range(world_size)]
            for j in range(len(jobs))]


def param_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _worker(rank: int, world_size: int, ports: list[int], jobs: list[Job], out: str) -> None:
    """One rank: env as torchrun sets it, instrumentation around train's calls, then each job's main().

    A job's record: status or error, per epoch the steps run and a digest of the parameters, per
    evaluation the sample counts, and the run dir's model_last.pt position + stop file afterwards.
    """
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    cwd = Path(out) / f"cwd{rank}"
    cwd.mkdir(exist_ok=True)
    os.chdir(cwd)
    record: dict = {}
    original_epoch, original_eval = train.train_one_epoch, train.evaluate_split
    original_stop = PreemptionWatch.should_stop

    def train_one_epoch(state, *args, **kwargs):
        stats = original_epoch(state, *args, **kwargs)
        record["epochs"].append({"steps_run": stats["step"] - kwargs["start_step"], "step": stats["step"],
                                 "global_step": stats["global_step"], "params": param_digest(state.model)})
        return stats

    def evaluate_split(model, cfg, manifest, split, device, amp_dtype):
        report = original_eval(model, cfg, manifest, split, device, amp_dtype)
        record["evals"].append({"split": split, "num_samples": report["num_samples"],
                                "labelled": {t: r["num_labelled"] for t, r in report["tasks"].items()}})
        return report

    train.train_one_epoch, train.evaluate_split = train_one_epoch, evaluate_split
    for j, job in enumerate(jobs):
        record = {"rank": rank, "epochs": [], "evals": []}
        calls = itertools.count(1)

        def should_stop(self: PreemptionWatch) -> bool:
            call = next(calls)
            if call == job.exit_at:
                print(f"exit_at={job.exit_at} reached: exiting without saving, as if killed", flush=True)
                os._exit(3)
            if call == job.touch_stop_file_at and rank == 0:
                self.stop_file.touch()
            return original_stop(self)

        PreemptionWatch.should_stop = should_stop
        os.environ["MASTER_PORT"] = str(ports[j])
        try:
            record["status"] = job_main(job.cfg, job.policy)
        except Exception as exc:  # recorded for the test to assert on; every rank should fail the same way
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc()
        last = job.cfg.run_dir / LAST
        if last.exists():
            ckpt = torch.load(last, weights_only=True)
            record["last"] = {k: ckpt[k] for k in ("epoch", "step_in_epoch", "global_step")}
        record["stop_file"] = (job.cfg.run_dir / STOP_FILE).exists()
        (Path(out) / f"job{j}-rank{rank}.json").write_text(json.dumps(record))


def sha256_of(path: Path) -> str:
    """The manifest's checksum of a shard file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def reshard_uneven(src: Path, dst: Path, split: str, sizes: list[int]) -> dict:
    """Copy shard folder `src` to `dst`, repacking `split` into shards of the given sizes (the rest
    of the samples go into one last shard); other splits are copied as they are. -> new manifest."""
    manifest = json.loads((src / "manifest.json").read_text())
    dst.mkdir(parents=True)
    samples: dict[str, list[tuple[tarfile.TarInfo, bytes]]] = {}  # key -> its members, in shard order
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(src / shard["name"]) as tar:
            for m in tar.getmembers():
                samples.setdefault(m.name.split(".", 1)[0], []).append((m, tar.extractfile(m).read()))
    ordered = list(samples.values())
    bounds = list(itertools.accumulate([0, *sizes])) + [len(ordered)]
    shards = []
    for j, (a, b) in enumerate(zip(bounds, bounds[1:])):
        name = f"{split}-{j:06d}.tar"
        with tarfile.open(dst / name, "w") as tar:
            for member, data in itertools.chain.from_iterable(ordered[a:b]):
                tar.addfile(member, fileobj=io.BytesIO(data))
        shards.append({"name": name, "num_samples": b - a, "sha256": sha256_of(dst / name)})
    for other, info in manifest["splits"].items():
        if other != split:
            for shard in info["shards"]:
                shutil.copy(src / shard["name"], dst / shard["name"])
    manifest["splits"][split]["shards"] = shards
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return manifest
