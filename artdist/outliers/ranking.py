"""Ranking statistics of outlier scores: combined score, robust z, reasons, AUROC and precision@k vs planted noise."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from artdist.errors import UserError
from artdist.outliers.scores import TaskScores

# Scores oriented so that higher = more unusual (max_softmax ranks by 1 - the top softmax probability).
RANKED_SCORES = ("max_softmax", "nll", "margin", "energy", "mahalanobis", "feature_nll", "combined")
REASON_Z = 2.0  # robust z above which a feature-space or energy score is named as a reason


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def robust_z(x: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 MAD), ignoring NaN; the std when MAD is 0 (then 1 when that is 0 too)."""
    if not np.isfinite(x).any():  # no labelled sample of this task in the split (or none with a distance)
        return np.full(np.shape(x), np.nan, dtype=np.float32)
    med = np.nanmedian(x)
    scale = 1.4826 * np.nanmedian(np.abs(x - med))
    if not scale > 0:
        scale = float(np.nanstd(x)) or 1.0
    return ((x - med) / scale).astype(np.float32)


def combined_score(scores: TaskScores) -> np.ndarray:
    """log(1 + s_head) + log(1 + s_gauss): s = -log p(assigned) of the classifier head and of the Gaussian
    classifier on the embedding, i.e. the log of the product of the two experts' (1 + surprisal).

    A product, not a sum of nats, because the two surprisals live on different scales (the Gaussians'
    posteriors are far sharper, their surprisals run to hundreds of nats): a sum lets the Gaussians
    rank alone, while a rescaled surprisal only shifts its log (docs/benchmarks.md "Outlier scores").
    Where the assigned class had no training samples the head's term counts twice.
    """
    feature = np.where(np.isfinite(scores.feature_nll), scores.feature_nll, scores.nll)
    return (np.log1p(scores.nll) + np.log1p(feature)).astype(np.float32)


def oriented_scores(scores: TaskScores, combined: np.ndarray) -> dict[str, np.ndarray]:
    """Every score with higher = more unusual, keyed as in RANKED_SCORES."""
    return {
        "max_softmax": 1.0 - scores.max_softmax,
        "nll": scores.nll,
        "margin": scores.margin,
        "energy": scores.energy,
        "mahalanobis": np.nan_to_num(scores.mahalanobis, nan=-np.inf),
        "feature_nll": np.nan_to_num(scores.feature_nll, nan=-np.inf),
        "combined": combined,
    }


def descending_ranks(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """1-based rank of each sample, highest value first; ties: lower id first, so runs are reproducible."""
    order = np.lexsort((ids, -np.asarray(values, dtype=np.float64)))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    return rank


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count 1/2); NaN without both classes."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_k(scores: np.ndarray, positive: np.ndarray, k: int) -> float:
    """Share of positives among the k highest scores, ties at the cut shared out at their average rate."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    k = min(k, len(scores))
    if k <= 0:
        return float("nan")
    cut = np.sort(scores)[::-1][k - 1]
    above, tied = scores > cut, scores == cut
    hits = positive[above].sum() + (k - above.sum()) * positive[tied].mean()
    return float(hits / k)


def reasons_for(scores: TaskScores, i: int, names: list[str], threshold: float, maha_z: np.ndarray,
                energy_z: np.ndarray) -> list[str]:
    """Human-readable reasons sample i looks out of place (empty when nothing stands out)."""
    out = []
    p = float(scores.p_assigned[i])
    if scores.predicted[i] != scores.assigned[i]:
        out.append(f"predicted {names[scores.predicted[i]]} with {scores.max_softmax[i]:.2f}")
    if p < 0.5:
        out.append(f"p({names[scores.assigned[i]]})={p:.2g}")
    if not math.isfinite(scores.feature_nll[i]):
        out.append(f"no {names[scores.assigned[i]]} paintings in training to compare the embedding with")
    elif scores.feature_predicted[i] != scores.assigned[i]:
        out.append(f"embedding nearer the {names[scores.feature_predicted[i]]} paintings "
                   f"(feature-space p({names[scores.assigned[i]]})={math.exp(-scores.feature_nll[i]):.2g})")
    if maha_z[i] >= REASON_Z:
        out.append(f"embedding {maha_z[i]:.1f}σ farther from its class mean than typical")
    if energy_z[i] >= REASON_Z:
        out.append(f"weak response to every class (energy {energy_z[i]:.1f}σ above typical)")
    if scores.max_softmax[i] < threshold:
        out.append(f"below {threshold:g} confidence ({scores.max_softmax[i]:.2f})")
    return out


# --------------------------------------------------------------------------- quality vs planted noise


def read_planted(path: str | Path) -> set[tuple[str, str]]:
    """(task, path) pairs from a planted_noise.csv written by `artdist synth --noise`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"planted-noise file {path} does not exist; it is written by `artdist synth` "
                        "next to images/ (outliers.planted / --planted)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "task"} - set(reader.fieldnames or ())
        if missing:
            raise UserError(f"{path} lacks column(s) {sorted(missing)}; expected the header "
                            "path,task,true_label,assigned_label,true_class,assigned_class as written by `artdist synth`")
        return {(row["task"], row["path"]) for row in reader}


def detection_quality(oriented: dict[str, np.ndarray], positive: np.ndarray, extra_k: int) -> dict[str, Any]:
    """AUROC and precision@k (k = planted count, and k = extra_k) of every score against the planted set."""
    n_planted = int(positive.sum())
    out: dict[str, Any] = {"planted": n_planted, "scored": len(positive), "k": n_planted, "extra_k": extra_k,
                           "scores": {}}
    for name in RANKED_SCORES:
        s = oriented[name]
        out["scores"][name] = {
            "auroc": finite_or_none(auroc(s, positive)),
            "precision_at_k": finite_or_none(precision_at_k(s, positive, n_planted)),
            "precision_at_extra_k": finite_or_none(precision_at_k(s, positive, extra_k)),
        }
    return out


def finite_or_none(x: float) -> float | None:
    """x to 5 significant digits (tiny probabilities stay readable), None for NaN/inf (valid JSON)."""
    return float(f"{x:.5g}") if math.isfinite(x) else None
