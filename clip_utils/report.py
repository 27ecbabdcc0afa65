"""The comparison of zero-shot, linear probe and LoRA, redrawn from saved results alone.

    paths = make_report("results")     # results/summary.csv, results/figures/*.png
    table = summary_table("results")   # the same numbers as a pandas DataFrame

Everything here reads files (`metrics.json`, `curves.json`) and draws: no model, no GPU,
no dataset, so figures can be restyled or re-made on a laptop long after training. Runs that
are missing are skipped and named, with the command that would produce them.

Per dataset the zero-shot row is the prompt set with the best test top-1 among those saved
under `results/<dataset>/zeroshot/` (its name is in the `prompt_set` column); choose the
set on validation (`--prompts auto`) for an unbiased zero-shot number.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from .data import DATASETS
from .plots import _figure, _save
from .results import figures_dir, read_json, write_csv

METHODS = ("zeroshot", "linear_probe", "lora")
LABELS = {"zeroshot": "zero-shot", "linear_probe": "linear probe", "probe": "linear probe", "lora": "LoRA"}
COMMANDS = {"zeroshot": "zeroshot --prompts all", "linear_probe": "probe", "lora": "lora"}
COLUMNS = ("dataset", "method", "prompt_set", "n", "top1", "top5", "mean_per_class", "trainable_params",
           "trainable_pct", "train_seconds", "seconds", "peak_vram_mb", "epochs", "best_epoch", "model")


# --------------------------------------------------------------------------- reading


def best_zeroshot(results_dir: str | Path, dataset: str) -> dict | None:
    """The saved zero-shot metrics of `dataset` with the best test top-1 (None when there are none).

    Args:
        results_dir: the results root.
        dataset: dataset name.
    """
    runs = [read_json(p) | {"prompt_set": p.parent.name}
            for p in sorted((Path(results_dir) / dataset / "zeroshot").glob("*/metrics.json"))]
    return max(runs, key=lambda m: m["top1"], default=None)


def summary_row(metrics: Mapping) -> dict:
    """One row of summary.csv from a metrics.json (zero-shot: no training, no trainable parameters).

    Args:
        metrics: a method's metrics.json content.
    """
    zeroshot = metrics["method"] == "zeroshot"
    prompt_set = metrics.get("prompt_set", "")
    if zeroshot and metrics.get("selected_set"):
        prompt_set = f"{prompt_set} ({metrics['selected_set']})"
    return {
        "dataset": metrics["dataset"], "method": metrics["method"], "prompt_set": prompt_set if zeroshot else "",
        "n": metrics["n"], "top1": metrics["top1"], "top5": metrics["top5"],
        "mean_per_class": metrics["mean_per_class"],
        "trainable_params": 0 if zeroshot else metrics["trainable_params"],
        "trainable_pct": 0.0 if zeroshot else metrics.get("trainable_pct"),
        "train_seconds": 0.0 if zeroshot else metrics.get("train_seconds", metrics["seconds"]),
        "seconds": metrics["seconds"], "peak_vram_mb": metrics.get("peak_vram_mb"),
        "epochs": metrics.get("epochs", ""), "best_epoch": metrics.get("best_epoch", ""), "model": metrics["model"],
    }


def collect(results_dir: str | Path) -> tuple[list[dict], list[str]]:
    """Summary rows of every saved run, and a note for each dataset/method with none.

    Args:
        results_dir: the results root.

    Returns:
        `(rows, missing)`: rows in dataset then method order; `missing` lines say what to run.
    """
    rows, missing = [], []
    for dataset in DATASETS:
        for method in METHODS:
            if method == "zeroshot":
                metrics = best_zeroshot(results_dir, dataset)
            else:
                file = Path(results_dir) / dataset / method / "metrics.json"
                metrics = read_json(file) if file.is_file() else None
            if metrics is None:
                missing.append(f"{dataset} {LABELS[method]} (python -m clip_utils {COMMANDS[method]} "
                               f"--dataset {dataset})")
            else:
                rows.append(summary_row(metrics))
    return rows, missing


def saved_curves(results_dir: str | Path) -> dict[str, dict[str, list[dict]]]:
    """Every saved curves.json: `{dataset: {method: curves}}`.

    Args:
        results_dir: the results root.
    """
    out: dict[str, dict[str, list[dict]]] = {}
    for dataset in DATASETS:
        for method in ("linear_probe", "lora"):
            file = Path(results_dir) / dataset / method / "curves.json"
            if file.is_file():
                out.setdefault(dataset, {})[method] = read_json(file)
    return out


def summary_table(results_dir: str | Path):
    """The comparison as a pandas DataFrame (accuracies in %, one row per dataset and method).

    Args:
        results_dir: the results root.
    """
    import pandas as pd

    rows, _ = collect(results_dir)
    table = pd.DataFrame(rows, columns=list(COLUMNS)).drop(columns=["model"])
    for col in ("top1", "top5", "mean_per_class"):
        table[col] = 100 * table[col]
    table["method"] = table["method"].map(LABELS)
    return table.rename(columns={"top1": "top1 %", "top5": "top5 %", "mean_per_class": "mean per class %",
                                 "trainable_pct": "trainable %"}).round(3)


def photo_table(predictions: Mapping[str, Sequence[Mapping]]):
    """Each photo's top-1 class under each method, side by side (a pandas DataFrame).

    Args:
        predictions: `{method: photos.predict_photos(...) result}` for one dataset.
    """
    import pandas as pd

    rows: dict[str, dict[str, str]] = {}
    for method, results in predictions.items():
        for r in results:
            top = r.get("top_k") or [{}]
            cell = r["error"] if "error" in r else f"{top[0]['name']} ({top[0]['prob']:.0%})"
            rows.setdefault(Path(r["photo"]).name, {})[LABELS.get(method, method)] = cell
    return pd.DataFrame.from_dict(rows, orient="index")


# --------------------------------------------------------------------------- figures


def plot_curves(curves: Sequence[Mapping], title: str, path: str | Path | None = None) -> Figure:
    """Loss (train and validation) and validation top-1 per epoch of one run; best epoch marked.

    Args:
        curves: the entries of a curves.json.
        title: figure title.
        path: PNG to write (None: only return the figure).
    """
    from .train import best_epoch

    fig = _figure(figsize=(10, 3.8))
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = [e["epoch"] for e in curves]
    loss_ax.plot(epochs, [e["train_loss"] for e in curves], "o-", label="train")
    loss_ax.plot(epochs, [e["val_loss"] for e in curves], "s-", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    loss_ax.legend()
    acc_ax.plot(epochs, [100 * e["val_acc"] for e in curves], "o-", color="C2")
    best = best_epoch(curves)
    if best:
        acc_ax.axvline(best, color="grey", ls="--", lw=1, label=f"best epoch ({best})")
        acc_ax.legend()
    acc_ax.set(xlabel="epoch", ylabel="top-1 %", title="validation accuracy")
    fig.suptitle(title)
    return _save(fig, path)


def plot_dynamics(curves: Mapping[str, Sequence[Mapping]], title: str, path: str | Path | None = None) -> Figure:
    """The training dynamics of several methods on shared axes: loss and validation top-1 per epoch.

    Args:
        curves: `{method: curves}`, e.g. `{"linear_probe": [...], "lora": [...]}`.
        title: figure title.
        path: PNG to write (None: only return the figure).
    """
    fig = _figure(figsize=(10, 3.8))
    loss_ax, acc_ax = fig.subplots(1, 2, sharex=True)
    for i, (method, entries) in enumerate(curves.items()):
        epochs = [e["epoch"] for e in entries]
        label = LABELS.get(method, method)
        loss_ax.plot(epochs, [e["train_loss"] for e in entries], "-", color=f"C{i}", alpha=0.6,
                     label=f"{label} train")
        loss_ax.plot(epochs, [e["val_loss"] for e in entries], "--", color=f"C{i}", label=f"{label} validation")
        acc_ax.plot(epochs, [100 * e["val_acc"] for e in entries], "o-", color=f"C{i}", label=label)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="top-1 %", title="validation accuracy")
    loss_ax.legend(fontsize="small")
    acc_ax.legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)


def _bars(ax, rows: Sequence[Mapping], value, ylabel: str, title: str, log: bool = False) -> None:
    """Grouped bars: one group per dataset, one bar per method; missing values left out."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    width = 0.8 / len(METHODS)
    for k, method in enumerate(METHODS):
        xs, ys = [], []
        for i, dataset in enumerate(datasets):
            row = next((r for r in rows if r["dataset"] == dataset and r["method"] == method), None)
            y = value(row) if row else None
            if y is not None and not (isinstance(y, float) and math.isnan(y)) and (y > 0 or not log):
                xs.append(i + (k - (len(METHODS) - 1) / 2) * width)
                ys.append(y)
        bars = ax.bar(xs, ys, width, label=LABELS[method], color=f"C{k}")
        ax.bar_label(bars, fmt="%.3g", fontsize="x-small", padding=1)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set(ylabel=ylabel, title=title)
    if log:
        ax.set_yscale("log")


def plot_comparison(rows: Sequence[Mapping], path: str | Path | None = None) -> Figure:
    """Accuracy and cost side by side: test top-1 / top-5 / mean per-class, trainable parameters,
    training time and peak VRAM, per dataset and method.

    Args:
        rows: summary rows (`collect`).
        path: PNG to write (None: only return the figure).
    """
    fig = _figure(figsize=(18, 7))
    axes = fig.subplots(2, 3)
    for ax, key, name in zip(axes[0], ("top1", "top5", "mean_per_class"),
                             ("test top-1", "test top-5", "mean per-class accuracy"), strict=True):
        _bars(ax, rows, lambda r, k=key: 100 * r[k], "%", name)
        ax.set_ylim(0, 105)
    _bars(axes[1][0], rows, lambda r: r["trainable_params"], "parameters (log)", "trainable parameters", log=True)
    _bars(axes[1][1], rows, lambda r: r["train_seconds"], "seconds", "training time")
    vram = [r for r in rows if r["peak_vram_mb"] is not None]
    _bars(axes[1][2], rows, lambda r: r["peak_vram_mb"], "MB", "peak VRAM (training)")
    if not vram:
        axes[1][2].text(0.5, 0.5, "not recorded\n(no CUDA run)", transform=axes[1][2].transAxes,
                        ha="center", va="center", color="grey")
    axes[0][0].legend(fontsize="small")
    fig.suptitle("zero-shot vs linear probe vs LoRA: accuracy (top) and cost (bottom)")
    return _save(fig, path)


# --------------------------------------------------------------------------- entry point


def make_report(results_dir: str | Path) -> list[Path]:
    """Write summary.csv and redraw every curve and comparison figure from saved files.

    Args:
        results_dir: the results root.

    Returns:
        The written files: summary.csv, then the figures.

    Raises:
        FileNotFoundError: no saved run at all under `results_dir`.
    """
    results_dir = Path(results_dir)
    rows, missing = collect(results_dir)
    curves = saved_curves(results_dir)
    if not rows and not curves:
        raise FileNotFoundError(
            f"no saved results under {results_dir}: run `python -m clip_utils zeroshot|probe|lora --dataset ...` "
            f"(or the notebooks) first, or point --results-dir at the results folder"
        )
    for line in missing:
        print(f"report: no results for {line}", file=sys.stderr)
    figures = figures_dir(results_dir)
    written = [write_csv(results_dir / "summary.csv", COLUMNS, [[r[c] for c in COLUMNS] for r in rows])]
    for dataset, runs in curves.items():
        for method, entries in runs.items():
            path = figures / f"{dataset}_{method}_curves.png"
            plot_curves(entries, f"{dataset} {LABELS[method]}", path)
            written.append(path)
        path = figures / f"{dataset}_training_dynamics.png"
        plot_dynamics(runs, f"{dataset}: training dynamics", path)
        written.append(path)
    if rows:
        path = figures / "comparison.png"
        plot_comparison(rows, path)
        written.append(path)
    return written
