"""Score a test set once, write every result file and figure: shared by every method.

    metrics = save_evaluation(
        method_dir(results_dir, "flowers102", "zeroshot", "domain"),
        logits=logits, labels=labels, paths=paths, class_names=names,
        info={"dataset": "flowers102", "split": "test", "method": "zeroshot", ...},
        figure_prefix="flowers102_zeroshot_domain", results_dir=results_dir,
    )

writes, atomically,

    <out_dir>/metrics.json                   info + n, top1, top5, mean_per_class, class_names,
                                             most_confused
    <out_dir>/classification_report.txt      scikit-learn's per-class report
    <out_dir>/predictions.csv                path,label,pred,label_name,pred_name
    <results_dir>/figures/<prefix>_confusion.png, <prefix>_samples.png

Zero-shot, the linear probe and LoRA all go through here, so their numbers, files and
pictures are produced by the same code and compare like for like.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from clip_utils import metrics, registry
from clip_utils.data import Dataset
from clip_utils.errors import MissingFile
from clip_utils.figures import predictions
from clip_utils.results.layout import figures_dir, folder_name, recorded_folder
from clip_utils.runtime.files import write_json, write_predictions, write_text

REPORT_FILE = "classification_report.txt"


def figure_paths(results_dir: str | Path, figure_prefix: str) -> dict[str, Path]:
    """Where `save_evaluation` puts its figures: `{"confusion": ..., "samples": ...}`.

    Args:
        results_dir: the results root.
        figure_prefix: e.g. `flowers102_zeroshot_domain`.
    """
    folder = Path(results_dir) / "figures"
    return {kind: folder / f"{figure_prefix}_{kind}.png" for kind in ("confusion", "samples")}


def method_figures(results_dir: str | Path, dataset: Dataset | str, method: str) -> dict[str, Path]:
    """The confusion and sample figures of a trained method's test run: `{"confusion", "samples"}`.

    Args:
        results_dir: the results root.
        dataset: the resolved dataset, or its results folder's name.
        method: a registered method.
    """
    return figure_paths(results_dir, f"{folder_name(dataset)}_{registry.get(method).name}")


def run_label(info: Mapping[str, Any]) -> str:
    """`flowers102 zero-shot domain`: how figures of a run are titled (also when redrawn): the
    dataset by its results folder's name (an image folder's name, not its path), the method
    by its registered label, as every figure and table names it.

    Args:
        info: the run's metrics.json content (or the info going into it).
    """
    parts = dict(info)
    if parts.get("dataset"):
        parts["dataset"] = recorded_folder(parts)
    if parts.get("method"):
        parts["method"] = registry.get(str(parts["method"])).label
    return " ".join(str(parts[k]) for k in ("dataset", "method", "prompt_set") if parts.get(k))


def save_evaluation(
    out_dir: str | Path,
    *,
    logits: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    paths: Sequence[str],
    class_names: Sequence[str],
    info: Mapping[str, Any],
    figure_prefix: str,
    results_dir: str | Path,
) -> dict:
    """Compute the metrics of one evaluated split and write metrics, predictions and figures.

    Args:
        out_dir: the method's results folder (see `results.method_dir`).
        logits: `(N, C)` scores.
        labels: `(N,)` true labels.
        paths: the `N` image files, in the same order.
        class_names: names in label order.
        info: run description merged into metrics.json first (dataset, split, method, model,
            seconds, templates or trainable_params/epochs/config, ...).
        figure_prefix: file name prefix of the two figures in `<results_dir>/figures/`.
        results_dir: the results root.

    Returns:
        The metrics.json content: `info` plus `n`, `top1`, `top5`, `mean_per_class`,
        `class_names` and `most_confused` (the 10 largest mistakes by name).
    """
    logits = logits.detach().float().cpu()
    labels = torch.as_tensor(labels).long().cpu()
    if len(paths) != len(labels) or len(logits) != len(labels):
        raise ValueError(f"{len(paths)} paths, {len(logits)} logits and {len(labels)} labels must match")
    out_dir = Path(out_dir)
    preds = logits.argmax(dim=1)
    scores = metrics.compute_metrics(logits, labels, class_names)
    scores.pop("report")  # 200 classes x 4 numbers: kept as text in REPORT_FILE instead
    record = {
        **info,
        **scores,
        "class_names": list(class_names),
        "most_confused": metrics.most_confused(labels, preds, class_names, k=10),
    }
    write_predictions(out_dir / "predictions.csv", list(paths), labels.tolist(), preds.tolist(), list(class_names))
    report = metrics.report_text(labels, preds, class_names)
    write_text(out_dir / REPORT_FILE, report)

    figures_dir(results_dir)
    figures = figure_paths(results_dir, figure_prefix)
    what = run_label(info)
    predictions.plot_confusion(labels, preds, class_names, title=f"{what}: top-1 {scores['top1']:.1%}",
                         path=figures["confusion"])
    # SigLIP's zero-shot says `"probabilities": "sigmoid"` (a probability per class); heads
    # trained with cross-entropy are a softmax over classes.
    probs = logits.sigmoid() if info.get("probabilities") == "sigmoid" else logits.softmax(dim=1)
    predictions.plot_sample_predictions(paths, labels, preds, class_names, probs=probs.numpy(),
                                  title=what, path=figures["samples"])
    write_json(out_dir / "metrics.json", record)
    return record


def report_excerpt(out_dir: str | Path, rows: int = 10) -> str:
    """The head and the summary lines of a saved classification report.

    A 200-class report is 200 lines; the notebook shows the first `rows` classes and the
    accuracy / macro / weighted averages, and the file keeps the rest.

    Args:
        out_dir: the folder holding classification_report.txt.
        rows: class rows to keep.
    """
    path = Path(out_dir) / REPORT_FILE
    if not path.is_file():
        raise MissingFile(f"no classification report at {path}: evaluate first")
    lines = path.read_text().rstrip("\n").split("\n")
    header, body = lines[:2], lines[2:]
    summary_at = next(i for i, line in enumerate(body) if line.strip().startswith("accuracy")) - 1
    classes, summary = body[:summary_at], body[summary_at:]
    hidden = len(classes) - rows
    middle = [f"   ... {hidden} more classes in {path}"] if hidden > 0 else []
    return "\n".join(header + classes[:rows] + middle + summary)
