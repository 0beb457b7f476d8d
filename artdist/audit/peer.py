"""Benchmark: cleanlab on an audit's out-of-sample probabilities beside artdist's combined ranking."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from artdist.audit.folds import AuditDir
from artdist.audit.merge import read_table
from artdist.config import JobConfig
from artdist.errors import UserError
from artdist.outliers.ranking import auroc, finite_or_none, precision_at_k, read_planted


def compare_cleanlab(cfg: JobConfig) -> dict:
    """Per task, against the planted labels: AUROC and precision@k (k = planted count) of artdist's combined
    out-of-sample score, of cleanlab's label quality score (its rank) and of `find_label_issues` (its set,
    ranked by self-confidence); printed and written to RUN_DIR/vs_cleanlab.json."""
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise UserError("cleanlab is not installed: `pip install cleanlab` (a benchmark only, not a dependency)") from None
    if not cfg.outliers.planted:
        raise UserError("the comparison needs planted labels: set outliers.planted (planted_noise.csv of artdist synth)")
    audit_dir = AuditDir(cfg.run_dir)
    if not audit_dir.probs.is_file():
        raise UserError(f"{audit_dir.probs} does not exist: run `artdist audit` to the end (its merge writes it)")
    planted, table = read_planted(cfg.outliers.planted), read_table(Path(cfg.run_dir))
    with np.load(audit_dir.probs) as data:
        arrays = {name: data[name] for name in data.files}
    result: dict = {"run": str(cfg.run_dir), "tasks": {}}
    lines = ["planted-noise detection on the same out-of-sample probabilities (k = planted count)",
             f"{'task':8s} {'planted':>10s}  {'method':36s} {'AUROC':>6s} {'P@k':>6s}"]
    for task in sorted({name.split("/")[0] for name in arrays}):
        ids, labels = arrays[f"{task}/ids"], arrays[f"{task}/labels"]
        probs, combined = arrays[f"{task}/probs"].astype(np.float64), arrays[f"{task}/combined"]
        positive = np.array([(task, table[int(i)]["path"]) in planted for i in ids], dtype=bool)
        k = int(positive.sum())
        quality = get_label_quality_scores(labels, probs)
        ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
        issue_rank = np.zeros(len(ids))  # flagged ones first, in cleanlab's order; the rest tie below
        issue_rank[ranked] = np.arange(len(ranked), 0, -1)
        rows = {
            "artdist combined": combined,
            # the head's term alone: the same input cleanlab gets, without the embedding's Gaussians
            "artdist -log p(assigned), head only": -np.log(np.maximum(probs[np.arange(len(ids)), labels], 1e-30)),
            "cleanlab get_label_quality_scores": -quality,
            "cleanlab find_label_issues": issue_rank,
        }
        task_result = {"planted": k, "scored": len(ids), "flagged_by_find_label_issues": len(ranked),
                       "find_label_issues_precision": finite_or_none(float(positive[ranked].mean()) if len(ranked) else float("nan")),
                       "find_label_issues_recall": finite_or_none(float(positive[ranked].sum() / max(k, 1))),
                       "methods": {}}
        for n, (name, score) in enumerate(rows.items()):
            a, p = auroc(score, positive), precision_at_k(score, positive, k)
            task_result["methods"][name] = {"auroc": finite_or_none(a), "precision_at_k": finite_or_none(p)}
            head = f"{task:8s} {f'{k}/{len(ids)}':>10s}" if n == 0 else " " * 19
            lines.append(f"{head}  {name:36s} {a:6.3f} {p:6.3f}")
        precision, recall = (task_result[f"find_label_issues_{m}"] for m in ("precision", "recall"))
        lines.append(" " * 21 + f"(find_label_issues flags {len(ranked)}: precision "
                     f"{precision if precision is None else round(precision, 3)}, recall {round(recall, 3)})")
        result["tasks"][task] = task_result
    result["table"] = "\n".join(lines)
    print(result["table"], flush=True)
    (Path(cfg.run_dir) / "vs_cleanlab.json").write_text(json.dumps(result, indent=1))
    return result
