"""Evaluation figures: confusion matrices, sample predictions, prompt-set and photo charts.

    fig = plot_confusion(labels, preds, class_names, "Flowers102 zero-shot", path="cm.png")
    fig = plot_sample_predictions(paths, labels, preds, class_names, probs=probs, path="s.png")
    fig = plot_prompt_comparison({"flowers102": {"default": 0.71, "domain": 0.79}})
    fig = plot_photo_predictions(image, top_k, "my_photo/flower.png")

Every function returns a `matplotlib.figure.Figure` and saves it as PNG when `path` is
given. Figures are built with `Figure()` rather than `pyplot`, so a library call that only
saves a picture never leaks an open figure or pops up a window, while a notebook still
displays the returned figure (once) as the cell's value.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from . import metrics
from .data import UnreadableImageError, open_rgb
from .methods import METHODS
from .methods import method as method_named
from .results import atomic_path
from .train import best_epoch

RIGHT, WRONG = "#1a9850", "#d73027"


def new_figure(constrained: bool = True, **kwargs) -> Figure:
    """A pyplot-free figure with an Agg canvas attached (shared by every chart of the package).

    Args:
        constrained: use matplotlib's constrained layout.
        **kwargs: passed to `Figure` (e.g. `figsize`).
    """
    # An Agg canvas from the start: without one every text-size query (seaborn checks tick
    # label overlap) builds a fresh full-size renderer, seconds and gigabytes at 200 classes.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(layout="constrained" if constrained else None, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path | None, dpi: int = 150) -> Figure:
    """Write `fig` as PNG atomically when `path` is given, and return it.

    Args:
        fig: the figure.
        path: PNG to write (None: do not save).
        dpi: resolution.
    """
    if path is not None:
        # atomic_path's temporary name has no .png suffix, so name the format explicitly.
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return fig


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def cluster_order(matrix: np.ndarray) -> np.ndarray:
    """A class order that puts classes confused with each other next to each other.

    Args:
        matrix: `(C, C)` row-normalised confusion matrix.

    Returns:
        A permutation of `range(C)`: the leaf order of an average-linkage clustering of the
        symmetrised confusion rows (two classes mistaken for each other share mass in the
        same columns, so their rows are close).
    """
    from scipy.cluster.hierarchy import leaves_list, linkage

    if len(matrix) < 3:
        return np.arange(len(matrix))
    sym = (matrix + matrix.T) / 2
    return leaves_list(linkage(sym, method="average", metric="euclidean"))


def plot_confusion(
    labels: Sequence[int],
    preds: Sequence[int],
    class_names: Sequence[str],
    title: str,
    path: str | Path | None = None,
    order: str = "cluster",
    top_pairs: int = 15,
) -> Figure:
    """Row-normalised confusion heatmap plus the most confused pairs by name.

    Readable at 102 and 200 classes: no per-cell numbers, a colour scale in recall units,
    tick labels sized to the class count, and a side panel that names the largest
    mistakes, which is what a reader actually looks for in a 200 x 200 matrix.

    Args:
        labels: true labels.
        preds: predicted labels.
        class_names: names in label order.
        title: figure title.
        path: PNG to write (None: do not save).
        order: `cluster` (confused classes adjacent) or `label`.
        top_pairs: rows in the side panel.
    """
    import seaborn as sns

    if order not in ("cluster", "label"):
        raise ValueError(f"order must be 'cluster' or 'label', got {order!r}")
    n = len(class_names)
    matrix = metrics.confusion(labels, preds, n, normalize=True)
    perm = cluster_order(matrix) if order == "cluster" else np.arange(n)
    names = [class_names[i] for i in perm]

    # Fixed margins rather than constrained layout: laying out 2 x 200 tick labels several
    # times costs seconds per figure; bbox_inches="tight" on save trims the edges anyway.
    fig = new_figure(constrained=False, figsize=(15, 11))
    grid = fig.add_gridspec(1, 2, width_ratios=[2.4, 1], wspace=0.02, left=0.16, right=0.99, bottom=0.18)
    ax = fig.add_subplot(grid[0])
    fontsize = float(np.clip(700 / max(n, 1), 3, 9))
    sns.heatmap(
        matrix[np.ix_(perm, perm)], ax=ax, cmap="viridis", vmin=0, vmax=1, square=True,
        xticklabels=names, yticklabels=names, cbar_kws={"label": "share of the true class", "shrink": 0.6},
    )
    ax.tick_params(labelsize=fontsize, length=0)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}\n(rows normalised; classes ordered {'by confusion' if order == 'cluster' else 'by label'})")

    side = fig.add_subplot(grid[1])
    side.axis("off")
    pairs = metrics.most_confused(labels, preds, class_names, k=top_pairs)
    lines = [f"{i}. {_wrap(p['true'], 40)}\n    -> {_wrap(p['pred'], 36)}\n    {p['count']} images, "
             f"{p['share_of_true']:.0%} of the class" for i, p in enumerate(pairs, 1)]
    side.set_title("most confused pairs (true -> predicted)", loc="left", fontsize=11)
    side.text(0, 1, "\n".join(lines) if lines else "no mistakes", va="top", ha="left", fontsize=8.5,
              family="monospace", transform=side.transAxes)
    # 200 names fit only in small type: a higher resolution keeps them legible when zoomed.
    return save_figure(fig, path, dpi=150 if n <= 120 else 220)


def choose_samples(labels: Sequence[int], preds: Sequence[int], n: int, seed: int = 0) -> np.ndarray:
    """Indices of `n` samples, about half of them mistakes when there are enough.

    Args:
        labels: true labels.
        preds: predicted labels.
        n: how many.
        seed: sampling seed.
    """
    rng = np.random.default_rng(seed)
    correct = np.asarray(labels) == np.asarray(preds)
    right, wrong = np.flatnonzero(correct), np.flatnonzero(~correct)
    n = min(n, len(correct))
    n_wrong = min(len(wrong), max(n // 2, n - len(right)))
    picked = np.concatenate([rng.choice(wrong, n_wrong, replace=False),
                             rng.choice(right, n - n_wrong, replace=False)])
    return rng.permutation(picked)


def plot_sample_predictions(
    paths: Sequence[str],
    labels: Sequence[int],
    preds: Sequence[int],
    class_names: Sequence[str],
    probs: Sequence[Sequence[float]] | np.ndarray | None = None,
    n: int = 16,
    seed: int = 0,
    title: str = "",
    path: str | Path | None = None,
) -> Figure:
    """A grid of images with their true and predicted names, green when right, red when wrong.

    Args:
        paths: image files.
        labels: true labels.
        preds: predicted labels.
        class_names: names in label order.
        probs: `(N, C)` class probabilities; adds the predicted class's probability.
        n: images in the grid (about half of them mistakes when there are enough).
        seed: sampling seed.
        title: figure title.
        path: PNG to write (None: do not save).
    """
    picked = choose_samples(labels, preds, n, seed)
    cols = int(np.ceil(np.sqrt(len(picked)))) or 1
    rows = int(np.ceil(len(picked) / cols)) or 1
    fig = new_figure(figsize=(3.1 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for ax, i in zip(axes, picked, strict=False):  # the grid may have spare cells
        true, pred = int(labels[i]), int(preds[i])
        colour = RIGHT if true == pred else WRONG
        try:
            ax.imshow(open_rgb(paths[i]))
        except UnreadableImageError:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes)
        ax.set_frame_on(True)
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(5)
        p = f" ({float(probs[i][pred]):.0%})" if probs is not None else ""
        mark = "right" if true == pred else "WRONG"
        ax.set_title(f"{mark}\ntrue: {_wrap(class_names[true], 24)}\npred: {_wrap(class_names[pred], 24)}{p}",
                     color=colour, fontsize=8.5)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_prompt_comparison(table: Mapping[str, Mapping[str, float]], path: str | Path | None = None) -> Figure:
    """Grouped bars: top-1 accuracy of each prompt set, one group per dataset.

    Args:
        table: `{dataset: {prompt_set: top1 in [0, 1]}}`.
        path: PNG to write (None: do not save).
    """
    import seaborn as sns

    rows = [(ds, ps, 100 * acc) for ds, sets in table.items() for ps, acc in sets.items()]
    if not rows:
        raise ValueError("no zero-shot results to compare: run zero-shot evaluation first")
    fig = new_figure(figsize=(min(14.0, max(6.0, 2.5 + 0.8 * len(rows))), 4.8))
    ax = fig.add_subplot()
    datasets = list(dict.fromkeys(r[0] for r in rows))
    sets = list(dict.fromkeys(r[1] for r in rows))
    sns.barplot(x=[r[0] for r in rows], y=[r[2] for r in rows], hue=[r[1] for r in rows],
                order=datasets, hue_order=sets, ax=ax, palette="tab10")
    for container in ax.containers:
        ax.bar_label(container, fmt="%.1f", fontsize=8, padding=2)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_xlabel("")
    ax.set_ylim(0, min(100, max(r[2] for r in rows) * 1.15 + 1))
    ax.set_title("Zero-shot top-1 by prompt set")
    ax.legend(title="prompt set", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


def plot_photo_predictions(image, top_k: Sequence[Mapping], title: str, path: str | Path | None = None) -> Figure:
    """A photo beside a horizontal bar chart of its top-k class probabilities.

    Args:
        image: the photo (RGB PIL image or array).
        top_k: `[{"name": str, "prob": float}, ...]`, most likely first.
        title: figure title (the photo's name, the dataset, the method).
        path: PNG to write (None: do not save).
    """
    fig = new_figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.3])
    left.imshow(image)
    left.axis("off")
    names = [_wrap(t["name"], 30) for t in top_k][::-1]
    probs = [100 * float(t["prob"]) for t in top_k][::-1]
    bars = right.barh(names, probs, color=["#bdbdbd"] * (len(probs) - 1) + ["#3182bd"])
    right.bar_label(bars, fmt="%.1f%%", padding=3, fontsize=9)
    right.set_xlim(0, 115)
    right.set_xlabel("probability (%)")
    right.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- training and comparison


def plot_curves(curves: Sequence[Mapping], title: str, path: str | Path | None = None) -> Figure:
    """Loss (train and validation) and validation top-1 per epoch of one run; best epoch marked.

    Args:
        curves: the entries of a curves.json.
        title: figure title.
        path: PNG to write (None: only return the figure).
    """
    fig = new_figure(figsize=(10, 3.8))
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
    return save_figure(fig, path)


def plot_dynamics(curves: Mapping[str, Sequence[Mapping]], title: str, path: str | Path | None = None) -> Figure:
    """The training dynamics of several methods on shared axes: loss and validation top-1 per epoch.

    Args:
        curves: `{method: curves}`, e.g. `{"linear_probe": [...], "lora": [...]}`.
        title: figure title.
        path: PNG to write (None: only return the figure).
    """
    fig = new_figure(figsize=(10, 3.8))
    loss_ax, acc_ax = fig.subplots(1, 2, sharex=True)
    for i, (method, entries) in enumerate(curves.items()):
        epochs = [e["epoch"] for e in entries]
        label = method_named(method).label
        loss_ax.plot(epochs, [e["train_loss"] for e in entries], "-", color=f"C{i}", alpha=0.6,
                     label=f"{label} train")
        loss_ax.plot(epochs, [e["val_loss"] for e in entries], "--", color=f"C{i}", label=f"{label} validation")
        acc_ax.plot(epochs, [100 * e["val_acc"] for e in entries], "o-", color=f"C{i}", label=label)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="top-1 %", title="validation accuracy")
    loss_ax.legend(fontsize="small")
    acc_ax.legend(fontsize="small")
    fig.suptitle(title)
    return save_figure(fig, path)


def _bars(ax, rows: Sequence[Mapping], value, ylabel: str, title: str, log: bool = False, error=None) -> None:
    """Grouped bars: one group per dataset, one bar per method; missing values left out.

    `error(row)`, when given, is the bar's error bar (a standard deviation; None: none).
    """
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    width = 0.8 / len(METHODS)
    for k, (method, entry) in enumerate(METHODS.items()):
        xs, ys, errors = [], [], []
        for i, dataset in enumerate(datasets):
            row = next((r for r in rows if r["dataset"] == dataset and r["method"] == method), None)
            y = value(row) if row else None
            if y is not None and not (isinstance(y, float) and math.isnan(y)) and (y > 0 or not log):
                xs.append(i + (k - (len(METHODS) - 1) / 2) * width)
                ys.append(y)
                spread = error(row) if error else None
                errors.append(math.nan if spread is None else spread)  # NaN: no error bar drawn
        drawn = any(e > 0 for e in errors)  # NaN compares False
        bars = ax.bar(xs, ys, width, label=entry.label, color=f"C{k}", yerr=errors if drawn else None, capsize=2)
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
    fig = new_figure(figsize=(18, 7))
    axes = fig.subplots(2, 3)
    for ax, key, name in zip(axes[0], ("top1", "top5", "mean_per_class"),
                             ("test top-1", "test top-5", "mean per-class accuracy"), strict=True):
        # Rows averaged over seeds carry their spread: top-1 shows it as error bars.
        spread = None if key != "top1" or all(r.get("top1_std") in (None, "") for r in rows) else (
            lambda r: 100 * r["top1_std"] if r.get("top1_std") not in (None, "") else None)
        _bars(ax, rows, lambda r, k=key: 100 * r[k], "%", name + (" (± std over seeds)" if spread else ""),
              error=spread)
        ax.set_ylim(0, 105)
    _bars(axes[1][0], rows, lambda r: r["trainable_params"], "parameters (log)", "trainable parameters", log=True)
    _bars(axes[1][1], rows, lambda r: r["train_seconds"], "seconds", "training time")
    vram = [r for r in rows if r["peak_vram_mb"] is not None]
    _bars(axes[1][2], rows, lambda r: r["peak_vram_mb"], "MB", "peak VRAM (zero-shot: encoding; others: training)")
    if not vram:
        axes[1][2].text(0.5, 0.5, "not recorded\n(no CUDA run)", transform=axes[1][2].transAxes,
                        ha="center", va="center", color="grey")
    axes[0][0].legend(fontsize="small")
    fig.suptitle("zero-shot vs linear probe vs LoRA: accuracy (top) and cost (bottom)")
    return save_figure(fig, path)
