"""Outlier scores per painting and task, the combined ranking, reports, and their quality vs planted noise."""
from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from artdist import dist
from artdist.cli import UserError
from artdist.config import TASKS, JobConfig
from artdist.data import DeviceTransform, make_eval_loader, read_manifest
from artdist.engine import resolve_amp, run_inference, use_channels_last
from artdist.evaluate import add_run_arguments, check_classes, load_trained_model, open_run
from artdist.outlier_report import quality_table, read_sample_index, write_rows, write_visuals

TYPICAL_PER_CLASS = 4  # central samples shown beside a class's outliers
REASON_Z = 2.0  # robust z above which a feature-space or energy score is named as a reason
# Scores oriented so that higher = more unusual; "seeds" is the seed projects' 1 - max softmax.
RANKED_SCORES = ("seeds", "nll", "margin", "energy", "mahalanobis", "feature_nll", "combined")
COMBINED_DESCRIPTION = ("-log p(assigned) of the classifier + -log p(assigned) of a Gaussian classifier on the "
                        "embedding (class means, tied covariance)")


# --------------------------------------------------------------------------- per-sample scores


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
    max_prob: np.ndarray  # float32 from here on
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
    max_prob, predicted = probs.max(dim=1)
    p_assigned = probs.gather(1, assigned[:, None]).squeeze(1)
    others = probs.scatter(1, assigned[:, None], float("-inf"))
    return {
        "predicted": predicted,
        "max_prob": max_prob,
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
        """Sum over ranks, then within-class covariance = (scatter - sum_c n_c mu_c mu_c^T) / (N - C)."""
        for t in (self.sums, self.counts, self.scatter):
            dist.all_reduce_sum(t)
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


# --------------------------------------------------------------------------- passes over a split


def _batches(model: torch.nn.Module, cfg: JobConfig, manifest: dict, split: str, device: torch.device,
             amp_dtype: torch.dtype | None) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]]:
    """This rank's share of a split through the model: (ids, labels, logits per task, embedding)."""
    loader = make_eval_loader(cfg.data, manifest, split, dist.get_rank(), dist.get_world_size())
    transform = DeviceTransform(cfg.data, device, train=False, channels_last=use_channels_last(cfg, device))
    yield from run_inference(model, loader, transform, device, amp_dtype)


def fit_class_gaussians(model: torch.nn.Module, cfg: JobConfig, manifest: dict, device: torch.device,
                        amp_dtype: torch.dtype | None) -> dict[str, ClassGaussian]:
    """Class means + tied covariance per task from the training split, on every rank (all-reduced)."""
    tasks = cfg.model.tasks
    acc: dict[str, GaussianAccumulator] = {}
    for _, labels, _, emb in _batches(model, cfg, manifest, cfg.data.train_split, device, amp_dtype):
        for task in tasks:
            if task not in acc:
                acc[task] = GaussianAccumulator(len(manifest["classes"][task]), emb.shape[1], device)
            acc[task].add(emb, labels[:, TASKS.index(task)])
    # A rank that got no batch must still join the all-reduces, with the embedding width of the others.
    width = torch.tensor([float(bool(acc)), float(acc[tasks[0]].scatter.shape[0] if acc else 0)], device=device)
    dist.all_reduce_sum(width)
    if width[0] == 0:
        raise UserError(f"split '{cfg.data.train_split}' yielded no samples to fit the class Gaussians on")
    if not acc:
        dim = int(width[1] / width[0])
        acc = {t: GaussianAccumulator(len(manifest["classes"][t]), dim, device) for t in tasks}
    return {task: acc[task].fit() for task in tasks}


def score_split(model: torch.nn.Module, cfg: JobConfig, manifest: dict, split: str, device: torch.device,
                amp_dtype: torch.dtype | None, gaussians: dict[str, ClassGaussian]) -> dict[str, TaskScores] | None:
    """Scores of every labelled sample of `split`, computed on each rank and gathered to rank 0 (sorted by id).

    Checks that the gathered ids are unique and cover the split exactly; returns None on other ranks.
    """
    parts: dict[str, list[dict[str, np.ndarray]]] = {t: [] for t in cfg.model.tasks}
    seen: list[np.ndarray] = []
    for ids, labels, logits, emb in _batches(model, cfg, manifest, split, device, amp_dtype):
        ids, labels = ids.cpu(), labels.cpu()
        seen.append(ids.numpy().astype(np.int64))
        for task in cfg.model.tasks:
            y = labels[:, TASKS.index(task)]
            keep = y >= 0
            if not keep.any():
                continue
            assigned = y[keep]
            batch = softmax_scores(logits[task].detach()[keep.to(logits[task].device)].cpu(), assigned)
            batch.update(gaussians[task].feature_scores(emb[keep.to(emb.device)], assigned))
            batch["ids"], batch["assigned"] = ids[keep], assigned
            parts[task].append({k: v.numpy() for k, v in batch.items()})
    local = {task: _to_scores(p) for task, p in parts.items()}
    gathered = dist.gather_objects((np.concatenate(seen) if seen else np.zeros(0, np.int64), local))
    if gathered is None:
        return None
    all_ids = np.concatenate([g[0] for g in gathered])
    expected = manifest["splits"][split]["num_samples"]
    if len(np.unique(all_ids)) != len(all_ids) or len(all_ids) != expected:
        raise UserError(
            f"outliers: ranks together scored {len(all_ids)} '{split}' samples ({len(np.unique(all_ids))} "
            f"distinct) but the manifest lists {expected}; the eval loader must yield each sample exactly "
            "once across ranks (are the shards and manifest.json from the same `artdist shard` run?)")
    merged = {}
    for task in cfg.model.tasks:
        scores = TaskScores.concat([g[1][task] for g in gathered])
        merged[task] = scores.take(np.argsort(scores.ids, kind="stable"))
    return merged


def _to_scores(batches: list[dict[str, np.ndarray]]) -> TaskScores:
    ints = ("ids", "assigned", "predicted", "feature_predicted")
    cols = {}
    for f in fields(TaskScores):
        dtype = np.int64 if f.name in ints else np.float32
        cols[f.name] = (np.concatenate([b[f.name] for b in batches]) if batches else np.zeros(0)).astype(dtype)
    return TaskScores(**cols)


# --------------------------------------------------------------------------- ranking


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def robust_z(x: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 MAD), ignoring NaN; the std when MAD is 0 (then 1 when that is 0 too)."""
    med = np.nanmedian(x)
    scale = 1.4826 * np.nanmedian(np.abs(x - med))
    if not scale > 0:
        scale = float(np.nanstd(x)) or 1.0
    return ((x - med) / scale).astype(np.float32)


def combined_score(scores: TaskScores) -> np.ndarray:
    """-log p(assigned) of the classifier head plus -log p(assigned) of the Gaussian classifier on the embedding.

    Both are surprisals in nats, so they add without rescaling: -log of the product of two experts'
    probabilities for the label on file. The Gaussian posteriors are the sharper of the two, so they
    lead at the top of the ranking and the head's term reorders the rest. Measured on two demo models
    (val and train splits x 3 tasks, 12 cases), mean planted-noise AUROC: this sum 0.938, Gaussian term
    alone 0.925, head alone 0.867, mean percentile rank of the two 0.921, Fisher's combination of their
    empirical tail probabilities 0.930, raw Mahalanobis distance to the assigned class 0.603, seeds' rule
    (1 - max softmax) 0.505. The raw distance fails because the embedding is shared by the three tasks:
    its within-class spread along directions a task does not use drowns that task's signal, which the
    class-relative posterior cancels. Where the assigned class had no training samples the head's term
    counts twice.
    """
    feature = np.where(np.isfinite(scores.feature_nll), scores.feature_nll, scores.nll)
    return (scores.nll + feature).astype(np.float32)


def oriented_scores(scores: TaskScores, combined: np.ndarray) -> dict[str, np.ndarray]:
    """Every score with higher = more unusual, keyed as in RANKED_SCORES."""
    return {
        "seeds": 1.0 - scores.max_prob,
        "nll": scores.nll,
        "margin": scores.margin,
        "energy": scores.energy,
        "mahalanobis": np.nan_to_num(scores.mahalanobis, nan=-np.inf),
        "feature_nll": np.nan_to_num(scores.feature_nll, nan=-np.inf),
        "combined": combined,
    }


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
        out.append(f"predicted {names[scores.predicted[i]]} with {scores.max_prob[i]:.2f}")
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
    if scores.max_prob[i] < threshold:
        out.append(f"below {threshold:g} confidence ({scores.max_prob[i]:.2f})")
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
                            "path,task,true_label,assigned_label as written by `artdist synth`")
        return {(row["task"], row["path"]) for row in reader}


def detection_quality(oriented: dict[str, np.ndarray], positive: np.ndarray, extra_k: int) -> dict[str, Any]:
    """AUROC and precision@k (k = planted count, and k = extra_k) of every score against the planted set."""
    n_planted = int(positive.sum())
    out: dict[str, Any] = {"planted": n_planted, "scored": len(positive), "k": n_planted, "extra_k": extra_k,
                           "scores": {}}
    for name in RANKED_SCORES:
        s = oriented[name]
        out["scores"][name] = {
            "auroc": _finite_or_none(auroc(s, positive)),
            "precision_at_k": _finite_or_none(precision_at_k(s, positive, n_planted)),
            "precision_at_extra_k": _finite_or_none(precision_at_k(s, positive, extra_k)),
        }
    return out


def _finite_or_none(x: float) -> float | None:
    """x to 5 significant digits (tiny probabilities stay readable), None for NaN/inf (valid JSON)."""
    return float(f"{x:.5g}") if math.isfinite(x) else None


# --------------------------------------------------------------------------- orchestration


def run_outliers(model: torch.nn.Module, cfg: JobConfig, manifest: dict, split: str, device: torch.device,
                 amp_dtype: torch.dtype | None, writer: Any = None) -> dict | None:
    """Score `split`, rank, and write the reports under run_dir/outliers/split (call on every rank).

    Two passes: the training split for the class Gaussians, then `split`. Returns the summary on rank 0
    and None on the others as soon as scores are gathered.
    """
    planted = read_planted(cfg.outliers.planted) if cfg.outliers.planted else None  # a bad path fails first
    gaussians = fit_class_gaussians(model, cfg, manifest, device, amp_dtype)
    per_task = score_split(model, cfg, manifest, split, device, amp_dtype, gaussians)
    if per_task is None:
        return None
    return write_reports(per_task, cfg, manifest, split, planted, writer,
                         {t: g.shrinkage for t, g in gaussians.items()})


def write_reports(per_task: dict[str, TaskScores], cfg: JobConfig, manifest: dict, split: str,
                  planted: set[tuple[str, str]] | None = None, writer: Any = None,
                  shrinkage: dict[str, float] | None = None) -> dict:
    """Rank each task, write CSV/JSON/index.html/summary.json (+ TensorBoard grids); with `planted`
    (read_planted), measure every score against the planted label noise."""
    out_dir = cfg.run_dir / "outliers" / split
    out_dir.mkdir(parents=True, exist_ok=True)
    index = read_sample_index(Path(cfg.data.shards), manifest, split)
    summary: dict[str, Any] = {
        "split": split, "num_samples": manifest["splits"][split]["num_samples"],
        "threshold": cfg.outliers.threshold, "flag_fraction": cfg.outliers.flag_fraction,
        "combined": COMBINED_DESCRIPTION, "tasks": {},
    }
    pages: dict[str, dict[str, Any]] = {}
    for task, scores in per_task.items():
        names = manifest["classes"][task]
        combined = combined_score(scores)
        task_summary, rows, typical = _rank_task(task, scores, combined, names, cfg, index, out_dir)
        if shrinkage is not None:
            task_summary["shrinkage"] = round(shrinkage[task], 4)
        if planted is not None:
            positive = np.array([(task, index[i].path) in planted for i in scores.ids.tolist()], dtype=bool)
            task_summary["quality"] = detection_quality(oriented_scores(scores, combined), positive,
                                                        cfg.outliers.top_k)
        summary["tasks"][task] = task_summary
        shown = [r for r in rows if r["flagged_combined"]][: cfg.outliers.top_k]
        pages[task] = {"outliers": shown, "typical": typical,
                       "summary": (f"{len(scores.ids)} samples scored; {task_summary['flagged_combined']} flagged "
                                   f"by the combined score (top {len(shown)} shown), "
                                   f"{task_summary['flagged_seeds']} by the seeds' max-softmax rule.")}
    intro = (f"<p>Split <b>{split}</b>. Ranked by the {COMBINED_DESCRIPTION}, fitted on "
             f"'{cfg.data.train_split}'. Green: typical paintings of the class; red: outliers.</p>")
    write_visuals(pages, index, Path(cfg.data.shards), manifest["image_ext"], out_dir,
                  f"artdist outliers — {cfg.name}", intro, f"outliers/{split}", writer)
    if planted is not None:
        table = quality_table(split, {t: s["quality"] for t, s in summary["tasks"].items()})
        print(table, flush=True)
        summary["table"] = table
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"outlier reports: {out_dir}/index.html (+ <task>.csv/.json, summary.json)", flush=True)
    return summary


def _rank_task(task: str, scores: TaskScores, combined: np.ndarray, names: list[str], cfg: JobConfig,
               index: dict, out_dir: Path
               ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Rank one task, write its CSV/JSON of flagged samples; return summary, rows, typical per class."""
    n = len(scores.ids)
    order = np.lexsort((scores.ids, -combined))  # ties: lower id first, so runs are reproducible
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)
    flag_seeds = scores.max_prob < cfg.outliers.threshold
    flag_combined = rank <= math.ceil(cfg.outliers.flag_fraction * n)
    maha_z, energy_z = robust_z(scores.mahalanobis), robust_z(scores.energy)
    rows = []
    for i in order[(flag_seeds | flag_combined)[order]].tolist():
        rows.append({
            "rank": int(rank[i]), "id": int(scores.ids[i]), "path": index[int(scores.ids[i])].path,
            "assigned": names[scores.assigned[i]], "predicted": names[scores.predicted[i]],
            **{name: _finite_or_none(float(value[i])) for name, value in (
                ("combined", combined), ("max_prob", scores.max_prob), ("p_assigned", scores.p_assigned),
                ("margin", scores.margin), ("energy", scores.energy), ("mahalanobis", scores.mahalanobis),
                ("mahalanobis_z", maha_z))},
            "feature_predicted": names[scores.feature_predicted[i]],
            "feature_p_assigned": _finite_or_none(math.exp(-float(scores.feature_nll[i]))),
            "flagged_seeds": bool(flag_seeds[i]), "flagged_combined": bool(flag_combined[i]),
            "reasons": reasons_for(scores, i, names, cfg.outliers.threshold, maha_z, energy_z)
            or [f"combined score in the top {cfg.outliers.flag_fraction:.0%}"],
        })
    meta = {"task": task, "scored": n, "threshold": cfg.outliers.threshold,
            "flag_fraction": cfg.outliers.flag_fraction}
    write_rows(rows, out_dir / f"{task}.csv", out_dir / f"{task}.json", meta)
    summary = {"scored": n, "flagged_seeds": int(flag_seeds.sum()), "flagged_combined": int(flag_combined.sum()),
               "csv": str(out_dir / f"{task}.csv")}
    return summary, rows, _typical(scores, names, flag_combined, index)


def _typical(scores: TaskScores, names: list[str], flagged: np.ndarray, index: dict) -> dict[str, list[dict]]:
    """Per class, the samples nearest its training mean among those the model also puts in that class."""
    ok = (scores.predicted == scores.assigned) & ~flagged & np.isfinite(scores.mahalanobis)
    out: dict[str, list[dict]] = {}
    for c in np.unique(scores.assigned[ok]).tolist():
        members = np.flatnonzero(ok & (scores.assigned == c))
        nearest = members[np.argsort(scores.mahalanobis[members], kind="stable")[:TYPICAL_PER_CLASS]]
        out[names[c]] = [{"id": int(scores.ids[i]), "path": index[int(scores.ids[i])].path} for i in nearest]
    return out


# --------------------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, default_split="val")
    p.add_argument("--planted", default="", metavar="CSV",
                   help="planted_noise.csv from artdist synth: report AUROC/precision@k against it")


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    extra = (f"out_dir={run_dir}",  # reports go to --run even if the run dir moved
             *((f"outliers.planted={args.planted}",) if args.planted else ()))
    path, ckpt, cfg = open_run(args, extra)
    device = dist.init_distributed(cfg.train.device)
    try:
        manifest = read_manifest(cfg.data.shards)
        check_classes(manifest, ckpt, cfg, path)
        model = load_trained_model(ckpt, cfg, device)
        writer = SummaryWriter(str(run_dir / "tb")) if dist.is_main_process() else None
        if run_outliers(model, cfg, manifest, args.split, device, resolve_amp(cfg.train.amp, device), writer):
            writer.close()
    finally:
        dist.cleanup()
    return 0
