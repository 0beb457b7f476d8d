"""A whole training job, as `artdist train` and `artdist submit` run it: train, test, then audit the val split."""
from __future__ import annotations

import torch

from artdist.config import JobConfig
from artdist.data.manifest import Manifest
from artdist.model import CNNLSTM
from artdist.outliers.pipeline import run_outliers
from artdist.outliers.ranking import read_planted
from artdist.train import trainer
from artdist.train.resume import Policy


def audit(model: CNNLSTM, cfg: JobConfig, manifest: Manifest, device: torch.device, amp_dtype: torch.dtype | None,
          writer) -> None:
    """Every rank, after the test evaluation: the outlier reports on the validation split (outliers.enabled)."""
    if cfg.outliers.enabled:
        run_outliers(model, cfg, manifest, cfg.data.val_split, device, amp_dtype, writer)


def main(cfg: JobConfig, policy: Policy = "check") -> str:
    """Train (or resume) `cfg`: 'done' after the test evaluation and outlier reports, or 'preempted'.
    `policy`: what a rerun of an existing run may change (artdist.train.resume)."""
    if cfg.outliers.enabled and cfg.outliers.planted:
        read_planted(cfg.outliers.planted)  # a bad path fails now, not after the training
    return trainer.main(cfg, after_test=audit, policy=policy)
