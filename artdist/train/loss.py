"""The training loss: class weights from label frequencies and the multi-task cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from artdist.config import TASKS


def class_weights(counts: list[int], mode: str) -> torch.Tensor | None:
    """Per-class loss weights from class frequencies: `inverse` (1/n) or `inverse_sqrt` (1/sqrt n).

    Scaled so that the average training sample keeps weight 1, which leaves the loss scale (and so
    the learning rate) comparable across modes. A class absent from training is never a target;
    its weight 0 also keeps label-smoothing mass off it.
    """
    if mode == "none":
        return None
    n = torch.tensor(counts, dtype=torch.float64)
    w = torch.where(n > 0, n.clamp(min=1) ** (-1.0 if mode == "inverse" else -0.5), 0.0)
    return (w * n.sum() / (w * n).sum()).float()


class MultiTaskLoss:
    """Sum over tasks of (weighted, label-smoothed) cross-entropy; labels of -1 are ignored.

    Each task's term is its weighted mean over the batch's known labels, and exactly 0 (not NaN)
    when the batch has none, without a host sync to find out.
    """

    def __init__(self, tasks: list[str], weights: dict[str, torch.Tensor | None], label_smoothing: float):
        self.tasks = tasks
        self.columns = [TASKS.index(t) for t in tasks]
        self.weights = weights
        self.label_smoothing = label_smoothing

    def __call__(self, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (total loss, per-task losses [len(tasks)] detached)."""
        terms = []
        for task, col in zip(self.tasks, self.columns):
            y = labels[:, col]
            w = self.weights[task]
            per_sample = F.cross_entropy(logits[task].float(), y, weight=w, ignore_index=-1,
                                         label_smoothing=self.label_smoothing, reduction="none")
            known = (y >= 0).float()
            denom = (w[y.clamp(min=0)] * known).sum() if w is not None else known.sum()
            terms.append(per_sample.sum() / denom.clamp(min=1e-12))
        stacked = torch.stack(terms)
        return stacked.sum(), stacked.detach()

    def to(self, device: torch.device) -> MultiTaskLoss:
        self.weights = {t: None if w is None else w.to(device) for t, w in self.weights.items()}
        return self
