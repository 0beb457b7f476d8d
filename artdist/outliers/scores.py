"""Per-sample outlier scores of one task: softmax-based scores and class Gaussians on the embedding."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from artdist.errors import UserError


@dataclass
class TaskScores:
    """Per-sample scalars of one task's labelled samples, aligned by position (no embeddings kept).

    nll = -log p(assigned); margin = max_{k != assigned} p_k - p(assigned), in [-1, 1], > 0 exactly when
    another class beats the assigned one; energy = -logsumexp(logits), higher = weaker response to all
    classes; mahalanobis = distance of the embedding to the assigned class's training mean under the
    tied covariance; feature_nll / feature_predicted: the same Gaussians used as a classifier (see
    ClassGaussian.feature_scores). Feature scores are NaN when the assigned class had no training samples.
    """

    ids: np.ndarray  # int64 catalog ids
    assigned: np.ndarray  # int64
    predicted: np.ndarray  # int64
    max_softmax: np.ndarray  # float32 from here on
    nll: np.ndarray
    margin: np.ndarray
    energy: np.ndarray
    mahalanobis: np.ndarray
    feature_nll: np.ndarray
    feature_predicted: np.ndarray  # int64

    @classmethod
    def concat(cls, parts: list[TaskScores]) -> TaskScores:
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def take(self, order: np.ndarray) -> TaskScores:
        return TaskScores(**{f.name: getattr(self, f.name)[order] for f in fields(self)})

    @property
    def p_assigned(self) -> np.ndarray:
        return np.exp(-self.nll)


def softmax_scores(logits: torch.Tensor, assigned: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logit-based scores of one batch (fp32 whatever the autocast dtype): see TaskScores."""
    logits = logits.float()
    log_probs = torch.log_softmax(logits, dim=1)
    probs = log_probs.exp()
    max_softmax, predicted = probs.max(dim=1)
    p_assigned = probs.gather(1, assigned[:, None]).squeeze(1)
    others = probs.scatter(1, assigned[:, None], float("-inf"))
    return {
        "predicted": predicted,
        "max_softmax": max_softmax,
        "nll": -log_probs.gather(1, assigned[:, None]).squeeze(1),
        "margin": others.max(dim=1).values - p_assigned,
        "energy": -torch.logsumexp(logits, dim=1),
    }


# --------------------------------------------------------------------------- feature space


@dataclass
class ClassGaussian:
    """Class means + one shared (tied) shrunk covariance of one task's training embeddings."""

    means: torch.Tensor  # [C, D] float64; NaN rows for classes without training samples
    covariance: torch.Tensor  # [D, D] float64, after shrinkage
    precision: torch.Tensor  # [D, D] float64
    shrinkage: float
    counts: torch.Tensor  # [C] training samples per class
    whitener: torch.Tensor = field(init=False, repr=False)  # L with precision = L L^T
    white_means: torch.Tensor = field(init=False, repr=False)  # means @ L

    def __post_init__(self) -> None:
        self.whitener = torch.linalg.cholesky(self.precision)
        self.white_means = self.means @ self.whitener

    def feature_scores(self, embedding: torch.Tensor, assigned: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mahalanobis distance to the assigned class mean, and -log p(assigned | embedding) with the
        predicted class of the Gaussian classifier these means and covariance define (linear discriminant
        analysis, uniform class priors, over the classes seen in training). float64 on the CPU."""
        white = embedding.detach().to("cpu", torch.float64) @ self.whitener
        sq = ((white[:, None, :] - self.white_means[None]) ** 2).sum(dim=2)  # [B, C] squared distances
        seen = self.counts > 0
        logits = torch.where(seen, -sq / 2, float("-inf"))
        rows, assigned = torch.arange(len(assigned)), assigned.cpu()
        nll = torch.logsumexp(logits, dim=1) - logits[rows, assigned]
        return {
            "mahalanobis": sq[rows, assigned].clamp_min(0).sqrt(),
            "feature_nll": torch.where(seen[assigned], nll, float("nan")),
            "feature_predicted": logits.argmax(dim=1),
        }


def oas_shrinkage(cov: torch.Tensor, n: int) -> float:
    """Oracle Approximating Shrinkage (Chen et al. 2010) towards a scaled identity, from cov alone.

    Closed form in the covariance and the sample count, so it needs no second pass over the data.
    """
    d = cov.shape[0]
    mu = torch.trace(cov) / d
    alpha = (cov**2).mean()
    den = (n + 1.0) * (alpha - mu**2 / d)
    return 1.0 if den <= 0 else min(float((alpha + mu**2) / den), 1.0)


class GaussianAccumulator:
    """Per-class sums and counts and the D x D scatter in float64: memory O(C*D + D^2), not O(samples)."""

    def __init__(self, num_classes: int, dim: int, device: torch.device):
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, embedding: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.to(self.sums.device)
        keep = labels >= 0
        z = embedding.to(self.sums.device, torch.float64)[keep]
        y = labels[keep]
        self.sums.index_add_(0, y, z)
        self.counts += torch.bincount(y, minlength=self.counts.numel()).to(torch.float64)
        self.scatter += z.T @ z

    def fit(self) -> ClassGaussian:
        """Within-class covariance (of sums already reduced over ranks) = (scatter - sum_c n_c mu_c mu_c^T) / (N - C)."""
        sums, counts, scatter = self.sums.cpu(), self.counts.cpu(), self.scatter.cpu()
        seen = counts > 0
        means = torch.full_like(sums, float("nan"))
        means[seen] = sums[seen] / counts[seen, None]
        dof = int(counts.sum().item()) - int(seen.sum().item())
        if dof < 1:
            raise UserError(f"cannot fit class Gaussians: {int(counts.sum())} labelled training samples "
                            f"in {int(seen.sum())} classes leave no degrees of freedom; the train split is too small")
        cov = (scatter - sums[seen].T @ means[seen]) / dof
        cov = (cov + cov.T) / 2
        rho = oas_shrinkage(cov, dof)
        d = cov.shape[0]
        shrunk = (1 - rho) * cov + rho * (torch.trace(cov) / d) * torch.eye(d, dtype=torch.float64)
        try:
            return ClassGaussian(means, shrunk, torch.linalg.inv(shrunk), rho, counts)
        except torch.linalg.LinAlgError:
            raise UserError("the training embeddings do not vary (their covariance is singular even after "
                            "shrinkage), so feature-space scores are undefined: is this checkpoint trained?") from None
