"""What an executed notebook saved: its text outputs and the progress bars in them (for the notebook tests)."""

from __future__ import annotations

import re

# tqdm's text bar: `desc: 100%|#####| 49/49 [00:05<00:00, 9.1batch/s]` (desc optional).
BAR = re.compile(r"^(?:(?P<desc>.*?): )?\s*(?P<pct>\d+)%\|[^|]*\| *(?P<n>\d+)/(?P<total>\d+)\b")
WIDGET = "application/vnd.jupyter.widget-view+json"


def saved_text(nb) -> str:
    """Every stream output and every plain-text rendering of a display, in cell order."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif "text/plain" in out.get("data", {}):
                parts.append(out.data["text/plain"])
    return "\n".join(parts)


def model_loads(text: str) -> list[str]:
    """The line `models.load_clip` prints for each model it loads."""
    return [line for line in text.splitlines() if re.match(r"loaded .+ \([\d.]+M parameters, \w+\) in [\d.]+ s$", line)]


def widget_cells(nb) -> list[int]:
    """The index of the cell of every widget output: what a reloaded or saved notebook shows
    as "Error displaying widget: model not found" (JupyterLab saves no widget state)."""
    return [i for i, cell in enumerate(nb.cells) for out in cell.get("outputs", []) if WIDGET in out.get("data", {})]


def stdout_text(nb) -> str:
    """Every stdout stream output, in cell order (what JupyterLab shows as plain output)."""
    return "".join(out.text for cell in nb.cells for out in cell.get("outputs", [])
                   if out.output_type == "stream" and out.name == "stdout")


def explorer_outputs(nb) -> tuple[dict, dict]:
    """The photo explorer cell's two outputs: its controls (a widget) and the static image of its view."""
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and "photo_explorer" in c.source]
    (controls,) = [out for out in cell.outputs if WIDGET in out.get("data", {})]
    (static,) = [out for out in cell.outputs if "image/png" in out.get("data", {})]
    assert cell.outputs.index(controls) < cell.outputs.index(static)  # the view under its controls
    return controls, static


def bar_lines(text: str) -> list[tuple[str, int, int, str]]:
    """`(desc, n, total, line)` of every progress-bar line in `text`."""
    found = []
    for line in text.replace("\r", "\n").splitlines():
        m = BAR.match(line.strip())
        if m:
            found.append((m["desc"] or "", int(m["n"]), int(m["total"]), line.strip()))
    return found


def unfinished_bars(text: str) -> list[str]:
    """The last saved line of every bar that did not reach its total.

    A line short of its total is fine when a later line of the same bar continues it (a
    long pass prints one every half minute, with the same count when nothing moved); it is
    unfinished when the text ends first, or when a new bar with the same label starts over
    (its count falls).
    """
    short: list[str] = []
    open_: dict[str, tuple[int, str]] = {}
    for desc, n, total, line in bar_lines(text):
        previous = open_.pop(desc, None)
        if previous is not None and n < previous[0]:
            short.append(previous[1])
        if n < total:
            open_[desc] = (n, line)
    return short + [line for _, line in open_.values()]
