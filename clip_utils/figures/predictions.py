"""Evaluation figures: confusion matrices, sample predictions, prompt-set and photo charts.

    fig = plot_confusion(labels, preds, class_names, "Flowers102 zero-shot", path="cm.png")
    fig = plot_sample_predictions(paths, labels, preds, class_names, probs=probs, path="s.png")
    fig = plot_prompt_comparison({"flowers102": {"default": 0.71, "domain": 0.79}})
    fig = plot_photo_predictions(image, top_k, "my_photo/flower.png")

Every function returns a `matplotlib.figure.Figure` and saves it as PNG when `path` is
given. Figures are built with `Figure()` rather than `pyplot`, so a library call that only
saves a picture never leaks an open figure or pops up a window, while a notebook still
displays the returned figure (once) as the cell's value. Every figure of the package is
made by `new_figure`, so one place marks them all as a demo when `CLIP_DEMO=1` (set by
`make demo`): numbers from the tiny random model must never pass for results. The
training and comparison charts are in `charts`.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from clip_utils import metrics
from clip_utils.data import UnreadableImageError, open_rgb
from clip_utils.errors import InvalidValue
from clip_utils.runtime.env import TRUE
from clip_utils.runtime.files import atomic_path

RIGHT, WRONG = "#1a9850", "#d73027"
DEMO_ENV = "CLIP_DEMO"
DEMO_MARK = "DEMO: tiny random model, numbers mean nothing"
# Tick labels: the smallest type still read without zooming, and the line height it needs.
MIN_LABEL_PT, LINE_HEIGHT = 5.5, 1.2
# Every k-th class named at most this sparsely; beyond, names would only be noise: none.
MAX_LABEL_STEP = 8
# Tick labels and bar names are cut to this many characters (an ellipsis marks the cut).
MAX_LABEL = 40
# The confusion figure's base size names up to about this many classes; it grows with the
# class count, up to CONFUSION_MAX_SCALE, so that Flowers102's 102 names all fit.
CONFUSION_BASE_CLASSES, CONFUSION_MAX_SCALE = 72, 1.45


def is_demo() -> bool:
    """Whether `CLIP_DEMO` says the figures come from the demo kit."""
    return os.environ.get(DEMO_ENV, "").strip().lower() in TRUE


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
    if is_demo():
        from matplotlib.transforms import ScaledTranslation

        # Above the top edge (and its box's padding 10 points clear of it): no layout moves
        # it onto a title, and the tight bounding box of a saved PNG, as of a notebook's
        # inline display, grows to keep it.
        above = fig.transFigure + ScaledTranslation(0, 10 / 72, fig.dpi_scale_trans)
        fig.text(0.5, 1.0, DEMO_MARK, transform=above, ha="center", va="bottom", fontsize=13, weight="bold",
                 color="white", bbox={"boxstyle": "round,pad=0.4", "facecolor": "#b2182b", "edgecolor": "none"})
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


def short(text: str, width: int = MAX_LABEL) -> str:
    """`text` cut to `width` characters with an ellipsis: every label drawn has a bounded size.

    Full names stay in the CSV and JSON files; a figure of 300-character class names would
    otherwise be thousands of pixels wide, and laying it out can take hours.

    Args:
        text: a class name (or any label).
        width: the most characters kept, the ellipsis included.
    """
    text = str(text)
    return text if len(text) <= width else text[: width - 1].rstrip() + "\u2026"


def _wrap(text: str, width: int) -> str:
    # At most two lines of `width`: a long name is cut with an ellipsis, never wrapped without end.
    return "\n".join(textwrap.wrap(short(text, 2 * width), width)) or short(text, width)


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


def tick_layout(n: int, cell_pt: float) -> tuple[int, float]:
    """Which class names fit beside a heatmap: `(k, fontsize)`, every k-th class named (k = 0: none).

    Args:
        n: classes on the axis.
        cell_pt: height of one row (width of one column) in points.

    Returns:
        `(1, size)` when every name fits in its row at `MIN_LABEL_PT` or more; else the
        smallest step k whose labels fit at `MIN_LABEL_PT` (the labels then sit k rows apart);
        `(0, 0.0)` when even every `MAX_LABEL_STEP`-th name would not fit.
    """
    if n <= 0 or cell_pt <= 0:
        return 0, 0.0
    size = min(9.0, cell_pt / LINE_HEIGHT)
    if size >= MIN_LABEL_PT:
        return 1, size
    k = math.ceil(MIN_LABEL_PT * LINE_HEIGHT / cell_pt)
    if k > MAX_LABEL_STEP:
        return 0, 0.0
    return k, min(9.0, k * cell_pt / LINE_HEIGHT, MIN_LABEL_PT + 1.0)


def _label_axes(ax, names: Sequence[str], fig: Figure) -> str:
    """Name the heatmap's classes as `tick_layout` allows; returns how the axes say which are named."""
    ax.apply_aspect()  # the square heatmap's final box, colour bar taken out
    n = len(names)
    cell = ax.get_position().height * fig.get_figheight() * 72 / max(n, 1)
    k, size = tick_layout(n, cell)
    ticks = np.arange(0, n, k) + 0.5 if k else []
    shown = [short(names[i]) for i in range(0, n, k)] if k else []
    ax.set_xticks(ticks, shown, rotation=90)
    ax.set_yticks(ticks, shown, rotation=0)
    ax.tick_params(labelsize=size or 1, length=0)
    if k == 1:
        return ""
    return f" (one class in {k} named)" if k else f" ({n} classes, too many to name; see the side panel)"


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
    class names only where they fit (`tick_layout`: every name, every k-th, or none; the
    axis label says which), and a side panel that names the largest mistakes, which is what
    a reader actually looks for in a 200 x 200 matrix.

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
    scale = float(np.clip(n / CONFUSION_BASE_CLASSES, 1.0, CONFUSION_MAX_SCALE))
    fig = new_figure(constrained=False, figsize=(15 * scale, 11 * scale))
    grid = fig.add_gridspec(1, 2, width_ratios=[2.4, 1], wspace=0.02, left=0.16, right=0.99, bottom=0.18,
                            top=0.93)
    ax = fig.add_subplot(grid[0])
    sns.heatmap(
        matrix[np.ix_(perm, perm)], ax=ax, cmap="viridis", vmin=0, vmax=1, square=True,
        xticklabels=False, yticklabels=False, cbar_kws={"label": "share of the true class", "shrink": 0.6},
    )
    named = _label_axes(ax, names, fig)
    ax.set_xlabel(f"predicted class{named}")
    ax.set_ylabel(f"true class{named}")
    ax.set_title(f"{title}\n(rows normalised; classes ordered {'by confusion' if order == 'cluster' else 'by label'})")

    side = fig.add_subplot(grid[1])
    side.axis("off")
    pairs = metrics.most_confused(labels, preds, class_names, k=top_pairs)
    lines = [f"{i}. {_wrap(p['true'], 40)}\n    -> {_wrap(p['pred'], 36)}\n    {p['count']} images, "
             f"{p['share_of_true']:.0%} of the class" for i, p in enumerate(pairs, 1)]
    side.set_title("most confused pairs (true -> predicted)", loc="left", fontsize=11)
    side.text(0, 1, "\n".join(lines) if lines else "no mistakes", va="top", ha="left", fontsize=8.5,
              family="monospace", transform=side.transAxes)
    return save_figure(fig, path)


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


def sample_caption(labels: Sequence[int], preds: Sequence[int], picked: Sequence[int]) -> str:
    """How a sample grid was chosen, so that its share of mistakes is not read as the error rate.

    Args:
        labels: true labels of the whole split.
        preds: predicted labels of the whole split.
        picked: the indices shown (`choose_samples`).
    """
    correct = np.asarray(labels) == np.asarray(preds)
    right = int(correct[np.asarray(picked, dtype=int)].sum())
    wrong = len(picked) - right
    if correct.all():
        how = f"{right} right (no mistakes in the split)"
    elif not correct.any():
        how = f"{wrong} wrong (nothing right in the split)"
    else:
        how = f"{right} right, {wrong} wrong, picked to show both"
    return f"sample predictions: {how}; top-1 {correct.mean():.1%} overall"


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
        title: what was evaluated (e.g. `cub200 lora`); the figure's title adds how the
            images were picked and the split's top-1 (`sample_caption`).
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
    caption = sample_caption(labels, preds, picked)
    fig.suptitle(f"{title}\n{caption}" if title else caption)
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
        raise InvalidValue("no zero-shot results to compare: run zero-shot evaluation first")
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
    # Head room above the tallest bar for its value label, also at 100%: a limit capped at
    # 100 put the labels of near-perfect sets on the title. Ticks stop at 100.
    top = max(r[2] for r in rows) * 1.12 + 3
    ax.set_ylim(0, top)
    ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= min(100, top)])
    ax.set_title("Zero-shot top-1 by prompt set", pad=8)
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
