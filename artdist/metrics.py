"""Classification metrics: confusion matrix, accuracy, top-k, macro-F1, per-class P/R/F1, tables."""
from __future__ import annotations

import numpy as np
import torch


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] int64 counts, rows = true class, columns = predicted; targets of -1 (unknown) are skipped."""
    known = targets >= 0
    flat = targets[known] * num_classes + preds[known]
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """How many known targets are among the k highest logits (k capped at the class count); 0-dim tensor."""
    known = targets >= 0
    top = logits[known].topk(min(k, logits.shape[1]), dim=1).indices
    return (top == targets[known, None]).any(dim=1).sum()


def report_from_confusion(cm: torch.Tensor, class_names: list[str], topk_hits: int | None = None,
                          k: int = 5) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support from a confusion matrix.

    A class's precision (recall) is 0 when it is never predicted (never true). macro_f1 averages F1
    over the classes that occur in the targets or the predictions; classes absent from both are left
    out, because neither the data nor the model says anything about them (a 27-class style report on
    a 3-class subset is then not dragged down by 24 meaningless zeros). With `topk_hits` (from
    topk_correct), the report also has `top{k}` = hits / labelled samples.
    """
    cm = cm.to(torch.float64).cpu()
    support = cm.sum(dim=1)
    predicted = cm.sum(dim=0)
    correct = cm.diag()
    total = float(support.sum())
    precision = torch.where(predicted > 0, correct / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, correct / support.clamp(min=1), 0.0)
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), 0.0)
    present = (support + predicted) > 0
    report = {
        "num_labelled": int(total),
        "accuracy": float(correct.sum()) / total if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": [
            {"class": name, "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
             "support": int(support[i])}
            for i, name in enumerate(class_names)
        ],
        "confusion": cm.to(torch.int64).tolist(),
    }
    if topk_hits is not None:
        report[f"top{k}"] = topk_hits / total if total else 0.0
    return report


def format_table(report: dict, title: str = "") -> str:
    """Console table: headline metrics, then one row per class that occurs (support or predictions)."""
    head = [f"{key} {report[key]:.4f}" for key in report if key == "accuracy" or key.startswith("top")]
    head.append(f"macro-F1 {report['macro_f1']:.4f}")
    lines = [f"{title + ': ' if title else ''}{report['num_labelled']} labelled samples, " + ", ".join(head)]
    width = max([len("class")] + [len(row["class"]) for row in report["per_class"]])
    lines.append(f"  {'class':<{width}}  precision  recall     f1  support")
    predicted = np.asarray(report["confusion"]).sum(axis=0)
    for i, row in enumerate(report["per_class"]):
        if row["support"] or predicted[i]:
            lines.append(f"  {row['class']:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  "
                         f"{row['f1']:5.3f}  {row['support']:7d}")
    return "\n".join(lines)


def format_confusion(report: dict) -> str:
    """Console confusion matrix (rows: true class, columns: predicted) over the classes that occur,
    each numbered by its class index (its line in class_names/<task>.txt, counting from 0)."""
    cm = np.asarray(report["confusion"])
    shown = [i for i in range(len(cm)) if cm[i].sum() or cm[:, i].sum()]
    names = [report["per_class"][i]["class"] for i in shown]
    width = max([len(n) for n in names] + [1])
    # default=1: a split without labels for this task shows an empty matrix, not a crash
    cell = max([len(str(int(cm[i, j]))) for i in shown for j in shown] + [len(str(i)) for i in shown],
               default=1) + 1
    lines = ["  confusion (rows: true class, columns: predicted class, by class number)",
             "  " + " " * (4 + width) + "".join(f"{j:>{cell}}" for j in shown)]
    for i, name in zip(shown, names):
        lines.append(f"  {i:>3} {name:<{width}}" + "".join(f"{int(cm[i, j]):>{cell}}" for j in shown))
    return "\n".join(lines)


def confusion_image(cm: torch.Tensor, side: int = 384) -> np.ndarray:
    """Row-normalised confusion matrix as an HWC uint8 image about `side` px wide (white 0, dark blue 1)."""
    cm = cm.to(torch.float64).cpu().numpy()
    rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    cell = max(4, side // max(len(cm), 1))
    white, blue = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    rgb = white + rows[..., None] * (blue - white)
    return np.kron(rgb, np.ones((cell, cell, 1))).round().astype(np.uint8)
