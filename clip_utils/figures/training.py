"""Training and comparison charts: per-run curves, training dynamics, the method comparison.

    fig = plot_curves(read_curves("results/cub200/lora"), "cub200 LoRA", path="curves.png")
    fig = plot_dynamics({"linear_probe": [...], "lora": [...]}, "cub200: training dynamics")
    fig = plot_comparison(report.collect("results")[0], path="comparison.png")

Drawn from saved files alone (`report` redraws them), on `figures.predictions.new_figure`, so they share
its demo mark. Epoch axes tick whole epochs; each comparison panel labels its bars in its
own unit (`29.6` %, `3.8k` parameters, `2.5 s`, `1,234 MB`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from clip_utils import registry
from clip_utils.figures.predictions import new_figure, save_figure, short
from clip_utils.model.training import best_epoch

NOT_RECORDED = "not recorded (no CUDA run)"


def percent(value: float) -> str:
    """A percentage bar label: one decimal (`29.6`)."""
    return f"{value:.1f}"


def count(value: float) -> str:
    """A parameter count bar label: `850`, `3.8k`, `1.2M`, `1.3G`."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.1f}{suffix}"
    return f"{value:.0f}"


def seconds(value: float) -> str:
    """A duration bar label in seconds, to the precision its size deserves (`0 s`, `0.07 s`, `2.5 s`, `1,890 s`)."""
    if value == 0:
        return "0 s"
    if abs(value) < 1:
        return f"{value:.2f} s"
    return f"{value:.1f} s" if abs(value) < 10 else f"{value:,.0f} s"


def megabytes(value: float) -> str:
    """A memory bar label: `1,234 MB` (`0.4 MB` below 10)."""
    return f"{value:.1f} MB" if abs(value) < 10 else f"{value:,.0f} MB"


def _epoch_axis(ax) -> None:
    # Epochs are whole numbers: no 1.25, 1.75, ... ticks on a three-epoch run.
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


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
    for ax in (loss_ax, acc_ax):
        _epoch_axis(ax)
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
        label = registry.get(method).label
        loss_ax.plot(epochs, [e["train_loss"] for e in entries], "-", color=f"C{i}", alpha=0.6,
                     label=f"{label} train")
        loss_ax.plot(epochs, [e["val_loss"] for e in entries], "--", color=f"C{i}", label=f"{label} validation")
        acc_ax.plot(epochs, [100 * e["val_acc"] for e in entries], "o-", color=f"C{i}", label=label)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="top-1 %", title="validation accuracy")
    _epoch_axis(loss_ax)  # shared with acc_ax
    loss_ax.legend(fontsize="small")
    acc_ax.legend(fontsize="small")
    fig.suptitle(title)
    return save_figure(fig, path)


def method_colour(index: int):
    """The colour of the method at `index` in `registry.methods()`, the same in every figure:
    matplotlib's ten-colour cycle, then tab20's lighter shades (the cycle would repeat C0,
    the reference's colour, at the eleventh method)."""
    if index < 10:
        return f"C{index}"
    import matplotlib

    return matplotlib.colormaps["tab20"]((2 * (index - 10) + 1) % 20)


def _bars(ax, rows: Sequence[Mapping], value: Callable[[Mapping], float | None], label: Callable[[float], str],
          ylabel: str, title: str, log: bool = False,
          error: Callable[[Mapping], float | None] | None = None) -> list[float]:
    """Grouped bars: one group per dataset, one bar per method; missing values (and, on a log
    axis, zeros) left out; `error(row)`, when given, is the bar's error bar (a standard
    deviation over seeds; None: none). Returns the drawn values."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    every = registry.methods()
    present = [m for m in every if any(r["method"] == m.name for r in rows)]  # no empty slots
    width = 0.8 / max(len(present), 1)
    drawn: list[float] = []
    for j, entry in enumerate(present):
        method, k = entry.name, every.index(entry)  # a method keeps its colour in every figure
        xs, ys, errors = [], [], []
        for i, dataset in enumerate(datasets):
            row = next((r for r in rows if r["dataset"] == dataset and r["method"] == method), None)
            y = value(row) if row else None
            if y is not None and not (isinstance(y, float) and math.isnan(y)) and (y > 0 or not log):
                xs.append(i + (j - (len(present) - 1) / 2) * width)
                ys.append(y)
                spread = error(row) if error else None
                errors.append(math.nan if spread is None else spread)  # NaN: no error bar drawn
        with_errors = any(e > 0 for e in errors)  # NaN compares False
        bars = ax.bar(xs, ys, width, label=entry.label, color=method_colour(k), yerr=errors if with_errors else None,
                      capsize=2)
        ax.bar_label(bars, labels=[label(y) for y in ys], fontsize="x-small", padding=1)
        drawn += ys
    ax.set_xticks(range(len(datasets)), [short(d) for d in datasets])  # imagefolder:PATH can be long
    ax.set(ylabel=ylabel, title=title)
    if log and drawn:  # nothing above zero (training-free methods alone): a linear axis
        ax.set_yscale("log")
        if drawn:
            # From a decade below the smallest bar, so each bar spans at least a decade (an
            # autoscaled log axis starts just under the smallest and leaves it a sliver), to
            # room above the largest for its label.
            ax.set_ylim(10 ** math.floor(math.log10(min(drawn) / 10)), max(drawn) * 4)
    return drawn


def plot_comparison(rows: Sequence[Mapping], path: str | Path | None = None) -> Figure:
    """Accuracy and cost side by side: test top-1 / top-5 / mean per-class, trainable parameters,
    training time and peak VRAM, per dataset and method.

    Args:
        rows: summary rows (`report.collect`).
        path: PNG to write (None: only return the figure).
    """
    fig = new_figure(figsize=(18, 7))
    axes = fig.subplots(2, 3)
    for ax, key, name in zip(axes[0], ("top1", "top5", "mean_per_class"),
                             ("test top-1", "test top-5", "mean per-class accuracy"), strict=True):
        # Rows averaged over seeds carry their spread: top-1 shows it as error bars.
        spread = None if key != "top1" or all(r.get("top1_std") in (None, "") for r in rows) else (
            lambda r: 100 * r["top1_std"] if r.get("top1_std") not in (None, "") else None)
        _bars(ax, rows, lambda r, k=key: 100 * r[k], percent, "%", name + (" (± std over seeds)" if spread else ""),
              error=spread)
        ax.set_ylim(0, 110)  # head room for a label above a 100% bar
        ax.set_yticks(range(0, 101, 20))
    _bars(axes[1][0], rows, lambda r: r["trainable_params"], count, "parameters (log)",
          "trainable parameters (zero-shot: none)", log=True)
    _bars(axes[1][1], rows, lambda r: r["train_seconds"], seconds, "seconds", "training time")
    vram_ax = axes[1][2]
    vram_title = "peak VRAM (zero-shot: encoding; others: training)"
    if _bars(vram_ax, rows, lambda r: r["peak_vram_mb"], megabytes, "MB", vram_title):
        vram_ax.set_ylim(0, vram_ax.get_ylim()[1] * 1.1)
    else:  # a CPU run: an empty axis from -0.04 to 0.04 MB would say nothing true
        vram_ax.axis("off")
        vram_ax.text(0.5, 0.5, NOT_RECORDED, transform=vram_ax.transAxes, ha="center", va="center",
                     color="grey", fontsize="large")
    axes[0][0].legend(fontsize="small")
    fig.suptitle("the methods side by side: accuracy (top) and cost (bottom)")
    return save_figure(fig, path)
