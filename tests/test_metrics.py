"""Hand-computed checks of the confusion matrix, top-k, per-class P/R/F1 and macro-F1."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from artdist.metrics import (
    confusion_image,
    confusion_matrix,
    format_confusion,
    format_table,
    report_from_confusion,
    topk_correct,
)


def test_confusion_matrix_counts_true_rows_predicted_columns_and_skips_unknown_labels():
    preds = torch.tensor([0, 1, 1, 2, 0, 2])
    targets = torch.tensor([0, 1, 2, 2, -1, -1])
    cm = confusion_matrix(preds, targets, 3)
    assert cm.tolist() == [[1, 0, 0],
                           [0, 1, 0],
                           [0, 1, 1]]
    assert cm.dtype == torch.int64


def test_report_hand_computed():
    # true 0 -> 0; true 1 -> 1; true 2 -> 1 and 2
    cm = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 1]])
    r = report_from_confusion(cm, ["a", "b", "c"])
    assert r["num_labelled"] == 4
    assert r["accuracy"] == pytest.approx(3 / 4)
    per = {row["class"]: row for row in r["per_class"]}
    assert (per["a"]["precision"], per["a"]["recall"], per["a"]["f1"]) == pytest.approx((1, 1, 1))
    assert (per["b"]["precision"], per["b"]["recall"], per["b"]["f1"]) == pytest.approx((1 / 2, 1, 2 / 3))
    assert (per["c"]["precision"], per["c"]["recall"], per["c"]["f1"]) == pytest.approx((1, 1 / 2, 2 / 3))
    assert [row["support"] for row in r["per_class"]] == [1, 1, 2]
    assert r["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert r["confusion"] == cm.tolist()


def test_classes_absent_from_targets_and_predictions_do_not_count_in_macro_f1():
    cm3 = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 1]])
    cm5 = torch.zeros(5, 5, dtype=torch.int64)
    cm5[:3, :3] = cm3
    r3 = report_from_confusion(cm3, ["a", "b", "c"])
    r5 = report_from_confusion(cm5, ["a", "b", "c", "d", "e"])
    assert r5["macro_f1"] == pytest.approx(r3["macro_f1"])
    assert r5["per_class"][4] == {"class": "e", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_a_class_only_predicted_counts_as_f1_zero():
    # targets [0, 0], predictions [0, 1]: class 1 never true but predicted once; class 2 absent.
    cm = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), 3)
    r = report_from_confusion(cm, ["a", "b", "c"])
    assert r["per_class"][0]["f1"] == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert r["per_class"][1]["f1"] == 0.0
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_empty_confusion_gives_zeros_not_nan():
    r = report_from_confusion(torch.zeros(3, 3, dtype=torch.int64), ["a", "b", "c"], topk_hits=0)
    assert (r["accuracy"], r["macro_f1"], r["top5"], r["num_labelled"]) == (0.0, 0.0, 0.0, 0)


def test_topk_correct_ignores_unknown_and_caps_k_at_class_count():
    logits = torch.tensor([[0.1, 0.5, 0.4],   # ranking 1, 2, 0
                           [0.9, 0.0, 0.1],   # ranking 0, 2, 1
                           [0.2, 0.3, 0.5],   # ranking 2, 1, 0
                           [0.0, 1.0, 2.0]])
    targets = torch.tensor([0, 2, 2, -1])
    assert int(topk_correct(logits, targets, 1)) == 1  # only row 2
    assert int(topk_correct(logits, targets, 2)) == 2  # rows 1 and 2
    assert int(topk_correct(logits, targets, 5)) == 3  # k capped at 3: every known label is in the top 3
    r = report_from_confusion(confusion_matrix(logits.argmax(1), targets, 3), ["a", "b", "c"],
                              topk_hits=int(topk_correct(logits, targets, 2)), k=2)
    assert r["top2"] == pytest.approx(2 / 3)


def test_format_table_lists_occurring_classes_with_their_numbers():
    cm = torch.zeros(4, 4, dtype=torch.int64)
    cm[:3, :3] = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 1]])
    text = format_table(report_from_confusion(cm, ["Baroque", "Cubism", "Pop_Art", "Rococo"], topk_hits=4),
                        title="val style")
    assert text.splitlines()[0].startswith("val style: 4 labelled samples")
    assert "accuracy 0.7500" in text and "top5 1.0000" in text and "macro-F1 0.7778" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:]}
    assert set(rows) == {"Baroque", "Cubism", "Pop_Art"}  # Rococo never occurs
    assert rows["Cubism"] == ["0.500", "1.000", "0.667", "1"]


def test_format_confusion_rows_are_true_classes_by_number_and_skip_absent_ones():
    cm = torch.zeros(4, 4, dtype=torch.int64)
    cm[0, 0], cm[1, 1], cm[3, 1], cm[3, 3] = 12, 1, 1, 1  # Pop_Art (2) never occurs
    text = format_confusion(report_from_confusion(cm, ["Baroque", "Cubism", "Pop_Art", "Rococo"]))
    lines = text.splitlines()
    assert lines[1].split() == ["0", "1", "3"]
    rows = {line.split()[1]: [int(v) for v in line.split()[2:]] for line in lines[2:]}
    assert rows == {"Baroque": [12, 0, 0], "Cubism": [0, 1, 0], "Rococo": [0, 1, 1]}
    assert [line.split()[0] for line in lines[2:]] == ["0", "1", "3"]


def test_confusion_image_is_row_normalised():
    cm = torch.tensor([[10, 0], [5, 5]])
    img = confusion_image(cm, side=20)
    assert img.shape == (20, 20, 3) and img.dtype == np.uint8
    full, half, empty = img[5, 5], img[15, 5], img[5, 15]
    assert (empty == 255).all()  # 0 of the row
    assert (full < half).all() and (half < empty).all()  # 1.0 darker than 0.5 darker than 0
    assert (img[15, 15] == half).all()  # 5 of 10 in both cells of row 1
