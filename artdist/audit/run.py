"""`artdist audit` runs: one fold (train + score, every rank), all folds here in turn, or a SLURM array + merge job."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import submitit
import torch

from artdist.audit.folds import (HELDOUT, INSAMPLE, AuditDir, fold_config, fold_finished, read_plan,
                                 write_plan)
from artdist.audit.merge import FITTED, merge, save_fold_scores
from artdist.config import JobConfig
from artdist.data.manifest import Manifest
from artdist.errors import UserError
from artdist.outliers.pipeline import fit_class_gaussians, score_split
from artdist.rundir import RunDir
from artdist.submit import TrainTask, make_executor, sbatch_errors
from artdist.train import trainer
from artdist.train.checkpoint import load_checkpoint


# --------------------------------------------------------------------------- one fold (every rank)


def train_fold(cfg: JobConfig) -> str:
    """Train (or resume) one fold run (`folds.fold_config`), then score its held-out and in-sample folds."""
    return trainer.main(cfg, after_test=partial(score_fold, started=time.perf_counter()))


def score_fold(model: torch.nn.Module, cfg: JobConfig, manifest: Manifest, device: torch.device,
               amp_dtype: torch.dtype | None, writer, started: float) -> None:
    """Every rank: class Gaussians on the fold's training folds, then scores of fold k (out of sample)
    and fold k+1 (in sample, and again without outliers.tta: FITTED); rank 0 writes scores.npz, then done.json."""
    scoring = time.perf_counter()
    # The last epoch's weights, not model_best.pt: the best epoch was chosen on fold k's own labels.
    model.load_state_dict(load_checkpoint(RunDir(cfg.run_dir).last)["model"])
    model.eval()
    gaussians = fit_class_gaussians(model, cfg, manifest, device, amp_dtype)
    probs: dict = {}
    heldout = score_split(model, cfg, manifest, HELDOUT, device, amp_dtype, gaussians, probs=probs)
    insample = score_split(model, cfg, manifest, INSAMPLE, device, amp_dtype, gaussians)
    fitted = insample
    if cfg.outliers.tta != "none":
        plain = dataclasses.replace(cfg, outliers=dataclasses.replace(cfg.outliers, tta="none"))
        fitted = score_split(model, plain, manifest, INSAMPLE, device, amp_dtype, gaussians)
    if heldout is None:
        return
    audit, audit_dir = manifest.extra["audit"], AuditDir(Path(cfg.run_dir).parents[1])
    save_fold_scores(audit_dir.fold_scores(audit["fold"]), {HELDOUT: heldout, INSAMPLE: insample, FITTED: fitted},
                     probs)
    now = time.perf_counter()
    audit_dir.fold_done(audit["fold"]).write_text(json.dumps({
        "fingerprint": audit["fingerprint"], "fold": audit["fold"],
        "heldout": manifest.num_samples(HELDOUT), "train_s": round(scoring - started, 1),
        "score_s": round(now - scoring, 1)}))
    print(f"fold {audit['fold']}: scored {manifest.num_samples(HELDOUT)} held-out samples "
          f"-> {audit_dir.fold_scores(audit['fold'])}", flush=True)


def run_fold(cfg: JobConfig, k: int) -> str:
    """`artdist audit --fold k` (under torchrun: this process is one rank): fold k of the written plan."""
    plan = read_plan(cfg.run_dir)
    if not 0 <= k < plan["folds"]:
        raise UserError(f"--fold {k}: the audit in {cfg.run_dir} has folds 0..{plan['folds'] - 1}")
    return train_fold(fold_config(cfg, k))


# --------------------------------------------------------------------------- all folds on this machine


def _tee(cmd: list[str], log: Path) -> int:
    """Run cmd with its output on the console and in `log` (appended: a resumed fold keeps its history)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        for line in proc.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            f.write(line)
        return proc.wait()


def run_local(cfg: JobConfig, config_args: list[str], nproc: int) -> dict:
    """Each unfinished fold under `torchrun --standalone --nproc_per_node=nproc`, one after another,
    then the merge. A failed fold is named with its log; the others still run."""
    plan = write_plan(cfg)
    audit_dir, failed = AuditDir(cfg.run_dir), []
    print(f"audit {cfg.name}: {plan['num_samples']} samples of {plan['splits']} in {plan['folds']} folds "
          f"{plan['fold_sizes']}, run dir {cfg.run_dir}", flush=True)
    for k in range(plan["folds"]):
        if fold_finished(cfg.run_dir, k, plan):
            print(f"fold {k}: finished before, kept ({audit_dir.fold_done(k)})", flush=True)
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "artdist", "audit", *config_args, "--fold", str(k)]
        print(f"fold {k}: {nproc} process(es), log {audit_dir.fold_log(k)}", flush=True)
        code = _tee(cmd, audit_dir.fold_log(k))
        if code != 0 or not fold_finished(cfg.run_dir, k, plan):
            failed.append(f"fold {k} ({'exit ' + str(code) if code else 'stopped before the end'}, "
                          f"log {audit_dir.fold_log(k)})")
    if failed:
        raise UserError(f"{'; '.join(failed)}: run the same command to resume the audit")
    return merge(cfg)


# --------------------------------------------------------------------------- SLURM: array + merge job


class MergeTask:
    """The merge job's callable (one task)."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg

    def __call__(self) -> dict:
        return merge(self.cfg)


def submit_audit(cfg: JobConfig) -> tuple[list[submitit.Job], submitit.Job, dict]:
    """The unfinished folds as one SLURM job array (each element a DDP job with the config's slurm:
    nodes/GPUs), then the merge as a one-task job that starts after all of them succeed (afterok)."""
    plan = write_plan(cfg)
    todo = [k for k in range(plan["folds"]) if not fold_finished(cfg.run_dir, k, plan)]
    folds: list[submitit.Job] = []
    if todo:
        executor = make_executor(cfg, local=False)
        executor.update_parameters(name=f"artdist-{cfg.name}-folds")
        with sbatch_errors(cfg), executor.batch():
            for k in todo:
                folds.append(executor.submit(TrainTask(fold_config(cfg, k), main=train_fold)))
    merger = make_executor(cfg, local=False)
    merger.update_parameters(name=f"artdist-{cfg.name}-merge", nodes=1, tasks_per_node=1, gpus_per_node=None,
                             slurm_additional_parameters=(
                                 {"dependency": f"afterok:{folds[0].job_id.split('_')[0]}"} if folds else {}))
    with sbatch_errors(cfg):
        merge_job = merger.submit(MergeTask(cfg))
    return folds, merge_job, plan
