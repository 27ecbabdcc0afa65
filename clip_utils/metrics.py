"""Classification metrics from logits: top-k, mean per-class accuracy, reports, confusions.

    m = compute_metrics(logits, labels, class_names)
    m["top1"], m["top5"], m["mean_per_class"]

All numbers come from scikit-learn so they match what the field reports; mean per-class
accuracy is balanced accuracy (the mean of per-class recalls), the standard metric for
Flowers102.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def compute_metrics(logits, labels, class_names: Sequence[str]) -> dict:
    """Top-1, top-5, mean per-class accuracy and the per-class report.

    Args:
        logits: `(N, C)` scores (any monotone transform of probabilities).
        labels: `(N,)` true labels.
        class_names: names in label order (`C` of them).

    Returns:
        `{"n", "top1", "top5", "mean_per_class", "report"}`; accuracies in [0, 1],
        `report` is scikit-learn's classification report as a dict keyed by class name.
    """
    from sklearn.metrics import balanced_accuracy_score, classification_report, top_k_accuracy_score

    scores, y = _np(logits), _np(labels).astype(int)
    n_classes = len(class_names)
    if scores.ndim != 2 or scores.shape[1] != n_classes:
        raise ValueError(f"logits of shape {scores.shape} do not match {n_classes} class names")
    if y.size == 0:
        raise ValueError("no samples to score")
    pred = scores.argmax(1)
    every = np.arange(n_classes)
    if n_classes > 5:
        top5 = top_k_accuracy_score(y, scores, k=5, labels=every)
    else:  # every label is among the top five
        top5 = 1.0
    report = classification_report(
        y, pred, labels=every, target_names=list(class_names), output_dict=True, zero_division=0
    )
    return {
        "n": int(y.size),
        "top1": float((pred == y).mean()),
        "top5": float(top5),
        "mean_per_class": float(balanced_accuracy_score(y, pred)),
        "report": report,
    }


def report_text(labels, preds, class_names: Sequence[str]) -> str:
    """scikit-learn's classification report as text (precision, recall, F1 per class)."""
    from sklearn.metrics import classification_report

    return classification_report(
        _np(labels).astype(int), _np(preds).astype(int), labels=np.arange(len(class_names)),
        target_names=list(class_names), zero_division=0, digits=3,
    )


def confusion(labels, preds, n_classes: int, normalize: bool = True) -> np.ndarray:
    """Confusion matrix, rows = true class; row-normalised to recall when `normalize`."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(
        _np(labels).astype(int), _np(preds).astype(int), labels=np.arange(n_classes),
        normalize="true" if normalize else None,
    )


def most_confused(labels, preds, class_names: Sequence[str], k: int = 10) -> list[dict]:
    """The `k` most frequent (true, predicted) mistakes, by name, with counts.

    Args:
        labels: true labels.
        preds: predicted labels.
        class_names: names in label order.
        k: how many pairs.
    """
    counts = confusion(labels, preds, len(class_names), normalize=False)
    np.fill_diagonal(counts, 0)
    order = np.argsort(counts, axis=None)[::-1][:k]
    pairs = []
    for flat in order:
        t, p = np.unravel_index(flat, counts.shape)
        if counts[t, p] == 0:
            break
        support = int((_np(labels) == t).sum())
        pairs.append({"true": class_names[t], "pred": class_names[p], "count": int(counts[t, p]),
                      "share_of_true": counts[t, p] / max(support, 1)})
    return pairs
