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
training and comparison charts are in `figures.training`.

Class names come in any script (an image folder of Japanese birds, Cyrillic mushrooms):
every figure draws its text with a fallback stack of the fonts this machine has (`font_stack`:
the default sans-serif, then any installed Noto/CJK/script font), and a character none of
them has makes one warning per figure naming it, where matplotlib would warn once per glyph
drawn (dozens of lines for one Japanese class name).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import textwrap
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.text import Text

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


# Families that cover scripts DejaVu Sans lacks, most useful first (CJK, then the rest of
# Noto, then the large fonts of other systems); only the installed ones join `font_stack`.
FALLBACK_FONTS = (
    "Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK KR", "Noto Sans JP", "Noto Sans SC",
    "Noto Sans TC", "Noto Sans KR", "Source Han Sans", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
    "Droid Sans Fallback", "IPAexGothic", "IPAGothic", "TakaoGothic", "Noto Sans", "Noto Sans Arabic",
    "Noto Sans Hebrew", "Noto Sans Devanagari", "Noto Sans Bengali", "Noto Sans Tamil", "Noto Sans Thai",
    "Noto Sans Georgian", "Noto Sans Armenian", "Noto Sans Ethiopic", "Noto Sans Symbols", "Noto Sans Symbols2",
    "Arial Unicode MS", "Microsoft YaHei", "Yu Gothic", "Meiryo", "Malgun Gothic", "Hiragino Sans",
    "PingFang SC", "Apple SD Gothic Neo", "Nirmala UI", "Segoe UI", "Segoe UI Symbol", "Unifont",
)
MAX_FALLBACK_FONTS = 8  # each one a font file matplotlib may open; CJK fonts are 10-20 MB
_GLYPH_WARNING = re.compile(r"Glyph (\d+) .*missing from")


def is_demo() -> bool:
    """Whether `CLIP_DEMO` says the figures come from the demo kit."""
    return os.environ.get(DEMO_ENV, "").strip().lower() in TRUE


def fallback_fonts(installed: Sequence[str]) -> list[str]:
    """The families of `FALLBACK_FONTS` among `installed` (font family names), in that order.

    Args:
        installed: the family names matplotlib's font manager knows.
    """
    have = set(installed)
    return [name for name in FALLBACK_FONTS if name in have][:MAX_FALLBACK_FONTS]


@functools.cache
def _installed_fallbacks() -> tuple[str, ...]:
    from matplotlib import font_manager

    return tuple(fallback_fonts([f.name for f in font_manager.fontManager.ttflist]))


def font_stack() -> list[str]:
    """matplotlib's `font.family` with every installed fallback font after it.

    `['sans-serif']` (DejaVu Sans, matplotlib's own) alone where no other font is installed,
    `['sans-serif', 'Noto Sans CJK JP', ...]` where one is: matplotlib draws each character
    with the first family of the list that has it.
    """
    families = list(matplotlib.rcParams["font.family"])
    return families + [name for name in _installed_fallbacks() if name not in families]


def _missing_glyphs_warning(chars: Sequence[str]) -> str:
    shown = "".join(sorted(set(chars)))
    return (f"{len(set(chars))} character(s) of this figure's text are in no installed font and show as "
            f"boxes: {shown[:20]}{'...' if len(shown) > 20 else ''}. Install a font that has them (Noto Sans CJK "
            f"for Chinese, Japanese, Korean: `apt install fonts-noto-cjk`) and restart Python.")


class _Figure(Figure):
    """A figure that draws its text with `font_stack` and warns once about characters no
    installed font has, instead of matplotlib's warning per glyph drawn."""

    _warned_glyphs = False

    @contextlib.contextmanager
    def _text_fonts(self) -> Iterator[None]:
        default, stack = list(matplotlib.rcParams["font.family"]), font_stack()
        if stack != default:  # texts made with the default family get the fallbacks too
            for text in self.findobj(Text):
                if list(text.get_fontfamily()) == default:
                    text.set_fontfamily(stack)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with matplotlib.rc_context({"font.family": stack}):  # tick labels made while drawing
                yield
        missing = []
        for w in caught:
            match = _GLYPH_WARNING.match(str(w.message))
            if match:
                missing.append(chr(int(match[1])))
            else:  # anything else is not ours to hide
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        if missing and not self._warned_glyphs:
            self._warned_glyphs = True
            warnings.warn(_missing_glyphs_warning(missing), UserWarning, stacklevel=4)

    def draw(self, renderer) -> None:
        with self._text_fonts():
            super().draw(renderer)

    def get_tightbbox(self, renderer=None, *args, **kwargs):
        with self._text_fonts():
            return super().get_tightbbox(renderer, *args, **kwargs)


def new_figure(constrained: bool = True, demo_mark: bool = True, **kwargs) -> Figure:
    """A pyplot-free figure with an Agg canvas attached (shared by every chart of the package).

    Its text is drawn with `font_stack`, and characters no font has make one warning per figure.

    Args:
        constrained: use matplotlib's constrained layout.
        demo_mark: mark it as a demo when `CLIP_DEMO` is set (False: a figure shown under
            another that carries the mark, as the explorer's second photo).
        **kwargs: passed to `Figure` (e.g. `figsize`).
    """
    # An Agg canvas from the start: without one every text-size query (seaborn checks tick
    # label overlap) builds a fresh full-size renderer, seconds and gigabytes at 200 classes.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = _Figure(layout="constrained" if constrained else None, **kwargs)
    FigureCanvasAgg(fig)
    if demo_mark and is_demo():
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
    from scipy.spatial.distance import pdist

    if len(matrix) < 3:
        return np.arange(len(matrix))
    sym = (matrix + matrix.T) / 2
    # The rows are observations: their distances passed condensed, so a square matrix is never
    # taken for a distance matrix (scipy warns when one looks like it).
    return leaves_list(linkage(pdist(sym, metric="euclidean"), method="average"))


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


# The photo charts, in inches: a row per class at a fixed height whatever top-k is (one bar
# as tall as the chart reads as a bug): the class name and, under it, its bar and
# probability (no tick labels to make room for); the photo beside the charts, at most
# CHARTS_PER_LINE methods side by side.
PHOTO_IN, CHART_IN, ROW_IN, BAR_IN = 2.6, 2.8, 0.34, 0.14
HEAD_IN, TITLE_IN, GAP_IN, MARGIN_IN, BANNER_IN = 0.3, 0.4, 0.25, 0.12, 0.5
CHARTS_PER_LINE = 3
TOP_COLOUR, OTHER_COLOUR, AXIS_COLOUR = "#3182bd", "#bdbdbd", "#636363"
# The explorer's images: inches above are whole pixels at this resolution, so a chart drawn
# with 20 rows cropped to k rows is exactly the chart of k rows.
EXPLORER_DPI = 100


def thumbnail(image, inches: float = PHOTO_IN, dpi: float = 200):
    """The photo scaled down to what a chart shows (`inches` wide at `dpi`), as a PIL image.

    Drawing a 1024-pixel photo into a 3-inch box costs more than the rest of the figure.
    """
    from PIL import Image

    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    side = int(inches * dpi)
    if max(image.size) <= side:
        return image
    small = image.copy()
    small.thumbnail((side, side))
    return small


def chart_height(rows: int) -> float:
    """The height in inches of a top-k chart of `rows` classes, its heading included."""
    return HEAD_IN + rows * ROW_IN


def _photo_height(photo) -> float:
    width, height = photo.size
    return float(np.clip(PHOTO_IN * height / max(width, 1), 1.2, 3.6))


def _rect(fig: Figure, left: float, top: float, width: float, height: float, **kwargs):
    """A rectangle placed in inches from the figure's top-left corner."""
    from matplotlib.patches import Rectangle

    w, h = fig.get_size_inches()
    fig.add_artist(Rectangle((left / w, 1 - (top + height) / h), width / w, height / h, transform=fig.transFigure,
                             linewidth=0, **kwargs))


def _text(fig: Figure, left: float, top: float, text: str, **kwargs) -> None:
    """A text placed in inches from the figure's top-left corner."""
    w, h = fig.get_size_inches()
    fig.text(left / w, 1 - top / h, text, **kwargs)


def _draw_chart(fig: Figure, left: float, top: float, label: str, top_k: Sequence[Mapping]) -> None:
    """One method's top-k at (`left`, `top`) inches: its heading, then a fixed-height row per class.

    Drawn on the figure itself, without axes: no ticks to lay out, so a chart costs its text.
    """
    if label:
        _text(fig, left, top + HEAD_IN - 0.09, label, ha="left", va="baseline", fontsize=10, weight="bold")
    top += HEAD_IN
    _rect(fig, left, top, 0.8 / 72, len(top_k) * ROW_IN, color=AXIS_COLOUR)
    full = CHART_IN - 0.6  # a bar at 100%: room for its percentage after it
    for rank, t in enumerate(top_k):
        p, row = float(t["prob"]), top + rank * ROW_IN
        _text(fig, left + 0.05, row + 0.15, short(str(t["name"])), ha="left", va="baseline", fontsize=8.5)
        _rect(fig, left, row + 0.18, full * p, BAR_IN, color=TOP_COLOUR if rank == 0 else OTHER_COLOUR)
        _text(fig, left + full * p + 0.05, row + 0.18 + BAR_IN / 2, f"{100 * p:.1f}%", ha="left", va="center_baseline",
              fontsize=8, color="#404040")


def plot_photo_methods(image, tops: Mapping[str, Sequence[Mapping]], title: str, path: str | Path | None = None,
                       demo_mark: bool = True) -> Figure:
    """A photo beside one compact top-k chart per method, as one figure.

    Every class is a row of fixed height (`ROW_IN`): its name, then its bar and probability,
    the most likely in colour; so a top-1 chart is one short bar, a top-20 chart a tall one.
    Charts sit side by side, `CHARTS_PER_LINE` to a line. The explorer shows the same rows,
    assembled from cached pieces (`chart_image`, `photo_panel`, `photo_row`).

    Args:
        image: the photo (RGB PIL image or array).
        tops: `{method label: [{"name": str, "prob": float}, ...]}`, most likely first; an
            empty label draws a chart without a heading.
        title: figure title (the photo's name, the dataset, the method when there is one).
        path: PNG to write (None: do not save).
        demo_mark: carry the demo mark when `CLIP_DEMO` is set.
    """
    photo = thumbnail(image)
    rows = max([len(top) for top in tops.values()] or [1])
    cols = max(1, min(len(tops), CHARTS_PER_LINE))
    lines = max(1, math.ceil(len(tops) / CHARTS_PER_LINE))
    charts_h = lines * chart_height(rows) + (lines - 1) * GAP_IN
    photo_h = _photo_height(photo)
    fig_w = _row_width(cols)
    fig_h = TITLE_IN + max(photo_h, charts_h) + MARGIN_IN
    fig = new_figure(constrained=False, demo_mark=demo_mark, figsize=(fig_w, fig_h))
    _draw_panel(fig, photo, title, photo_h)
    for i, (label, top) in enumerate(tops.items()):
        line, col = divmod(i, CHARTS_PER_LINE)
        _draw_chart(fig, MARGIN_IN + PHOTO_IN + GAP_IN + col * (CHART_IN + GAP_IN),
                    TITLE_IN + line * (chart_height(rows) + GAP_IN), label, top)
    return save_figure(fig, path)


def _row_width(cols: int) -> float:
    return 2 * MARGIN_IN + PHOTO_IN + cols * (GAP_IN + CHART_IN)


def _draw_panel(fig: Figure, photo, title: str, photo_h: float) -> None:
    """The title along the top and the photo under it, at the figure's left."""
    w, h = fig.get_size_inches()
    fig.suptitle(title, x=MARGIN_IN / w, y=1 - 0.1 / h, ha="left", va="top", fontsize=11, weight="bold")
    pic = fig.add_axes((MARGIN_IN / w, 1 - (TITLE_IN + photo_h) / h, PHOTO_IN / w, photo_h / h))
    pic.imshow(photo)
    pic.axis("off")


def plot_photo_predictions(image, top_k: Sequence[Mapping], title: str, path: str | Path | None = None) -> Figure:
    """A photo beside a bar chart of its top-k class probabilities (a bar's height is fixed).

    Args:
        image: the photo (RGB PIL image or array).
        top_k: `[{"name": str, "prob": float}, ...]`, most likely first.
        title: figure title (the photo's name, the dataset, the method).
        path: PNG to write (None: do not save).
    """
    return plot_photo_methods(image, {"": top_k}, title, path)


# --------------------------------------------------------------------------- the explorer's pieces


def _image(fig: Figure):
    """The figure drawn at its own size (`EXPLORER_DPI`), as an RGB PIL image."""
    from PIL import Image

    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")


def chart_image(label: str, top_k: Sequence[Mapping]):
    """One method's chart (`plot_photo_methods`'s) as a PIL image at `EXPLORER_DPI`.

    Its rows are whole pixels, so `photo_row` cuts it to any smaller top-k without drawing again.
    """
    fig = new_figure(constrained=False, demo_mark=False, figsize=(CHART_IN, chart_height(len(top_k))),
                     dpi=EXPLORER_DPI)
    _draw_chart(fig, 0.01, 0, label, top_k)
    return _image(fig)


def photo_panel(image, title: str):
    """The title and the photo of an explorer row, as a PIL image at `EXPLORER_DPI`, as wide
    as a full row of charts (`photo_row` cuts it to the row it heads, so one panel serves any
    number of methods)."""
    photo = thumbnail(image)
    photo_h = _photo_height(photo)
    fig = new_figure(constrained=False, demo_mark=False, dpi=EXPLORER_DPI,
                     figsize=(_row_width(CHARTS_PER_LINE), TITLE_IN + photo_h))
    _draw_panel(fig, photo, title, photo_h)
    return _image(fig)


@functools.lru_cache(maxsize=8)
def demo_banner(width_px: int):
    """The demo mark as a strip `width_px` wide (`photo_row` puts it above a view's first row;
    drawn once per width)."""
    fig = new_figure(constrained=False, demo_mark=False, dpi=EXPLORER_DPI,
                     figsize=(width_px / EXPLORER_DPI, BANNER_IN))
    fig.text(0.5, 0.5, DEMO_MARK, ha="center", va="center", fontsize=13, weight="bold", color="white",
             bbox={"boxstyle": "round,pad=0.4", "facecolor": "#b2182b", "edgecolor": "none"})
    return _image(fig)


def photo_row(panel, charts: Sequence, rows: int, banner: bool = False):
    """A photo's row of the explorer: its panel, and each chart cut to its first `rows` classes.

    Args:
        panel: `photo_panel`'s image.
        charts: `chart_image`s, drawn with at least `rows` classes each.
        rows: top-k to show.
        banner: put the demo mark above it (the first row of a view, with `CLIP_DEMO` set).
    """
    from PIL import Image

    px = EXPLORER_DPI
    chart_px = round(chart_height(rows) * px)
    lines = max(1, math.ceil(len(charts) / CHARTS_PER_LINE))
    charts_px = lines * chart_px + (lines - 1) * round(GAP_IN * px)
    top = round(BANNER_IN * px) if banner else 0
    width = round(_row_width(max(1, min(len(charts), CHARTS_PER_LINE))) * px)
    height = top + max(panel.height, round(TITLE_IN * px) + charts_px) + round(MARGIN_IN * px)
    row = Image.new("RGB", (width, height), "white")
    if banner:
        row.paste(demo_banner(width), (0, 0))
    row.paste(panel.crop((0, 0, width, panel.height)), (0, top))
    for i, chart in enumerate(charts):
        line, col = divmod(i, CHARTS_PER_LINE)
        x = round((MARGIN_IN + PHOTO_IN + GAP_IN + col * (CHART_IN + GAP_IN)) * px)
        y = top + round(TITLE_IN * px) + line * (chart_px + round(GAP_IN * px))
        row.paste(chart.crop((0, 0, chart.width, min(chart_px, chart.height))), (x, y))
    return row
