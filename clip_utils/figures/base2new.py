"""The base-to-new chart: base, new and HM accuracy per method, as grouped bars.

    fig = plot_base2new(base2new.summarise(rows), "flowers102: base-to-new, 16 shots", path="b2n.png")

Drawn from the table's rows alone (`results.base2new.summarise` or `read_table`), on
`figures.predictions.new_figure`. A method whose new accuracy is the zero-shot fallback has
hatched new and HM bars (the number is zero-shot's, not its own), and a method that cannot
name new classes shows "n/a" where those bars would be, never a bar of zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from clip_utils.errors import InvalidValue
from clip_utils.figures.predictions import new_figure, save_figure, short
from clip_utils.figures.training import percent

# The table's words for where a new accuracy comes from; `results.base2new.NEW_SOURCES` is
# built from these (figures may not import results).
OWN, FALLBACK, NO_NEW = "own", "zero-shot", "n/a"
FALLBACK_LEGEND = "new and HM: zero-shot fallback"
# One colour per measure, the same for every method: the groups are the methods.
COLOURS = {"base": "#3182bd", "new": "#e6550d", "hm": "#636363"}
NAMES = {"base": "base", "new": "new", "hm": "HM"}
HATCH = "///"
WIDTH = 0.27


def _spread(row: Mapping, key: str) -> float | None:
    value = row.get(f"{key}_std")
    return None if value in (None, "") else float(value)


def plot_base2new(summary: Sequence[Mapping], title: str, path: str | Path | None = None) -> Figure:
    """Grouped bars per method: base, new and HM top-1 %, with base/new std over seeds as error bars.

    Args:
        summary: the table's rows (`results.base2new.summarise`), reference first.
        title: figure title (the dataset, the shots).
        path: PNG to write (None: only return the figure).

    Raises:
        InvalidValue: no rows.
    """
    if not summary:
        raise InvalidValue("no base-to-new results to draw: run the base-to-new protocol first")
    fig = new_figure(figsize=(max(6.0, 2.5 + 1.3 * len(summary)), 4.6))
    ax = fig.add_subplot()
    # Another shot count is another experiment: name it under the method when the rows mix them.
    several_shots = len({r.get("shots") for r in summary}) > 1
    for i, row in enumerate(summary):
        source = row["new_source"]
        for j, key in enumerate(("base", "new", "hm")):
            x = i + (j - 1) * WIDTH
            value = row.get(key)
            if key != "base" and source == NO_NEW:  # no number exists: say so, draw nothing
                ax.text(x, 1, "n/a", ha="center", va="bottom", fontsize="small", color="grey")
                continue
            spread = _spread(row, key) if key != "hm" else None
            fallback = key != "base" and source == FALLBACK
            bars = ax.bar([x], [float(value)], WIDTH, color=COLOURS[key], yerr=None if spread is None else [spread],
                          capsize=2, hatch=HATCH if fallback else None, edgecolor="white" if fallback else None,
                          linewidth=0)
            ax.bar_label(bars, labels=[percent(float(value))], fontsize="x-small", padding=1)
    labels = [short(r["label"]) + (f"\n{r['shots']}-shot" if several_shots and r.get("shots") else "")
              for r in summary]
    ax.set_xticks(range(len(summary)), labels)
    ax.set_xlim(-0.5, len(summary) - 0.5)  # the texts of n/a do not widen the axis: the last group's would be cut
    ax.set_ylim(0, 110)  # head room for a label above a 100% bar
    ax.set_yticks(range(0, 101, 20))
    spread_said = any(_spread(r, k) is not None for r in summary for k in ("base", "new"))
    ax.set_ylabel("top-1 %" + (" (± std over seeds)" if spread_said else ""))
    handles = [Patch(color=COLOURS[k], label=NAMES[k]) for k in COLOURS]
    if any(r["new_source"] == FALLBACK for r in summary):
        handles.append(Patch(facecolor=COLOURS["new"], edgecolor="white", hatch=HATCH, label=FALLBACK_LEGEND))
    if any(r["new_source"] == NO_NEW for r in summary):
        handles.append(Patch(color="none", label="n/a: cannot name new classes"))
    ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title)
    return save_figure(fig, path)
