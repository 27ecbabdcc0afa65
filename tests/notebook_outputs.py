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


def progress_widgets(nb) -> list[str]:
    """The plain-text fallbacks of progress bars saved as widgets (a viewer without widget
    support shows that stale text); other widgets (the photo explorer) are not progress."""
    return [out.data["text/plain"] for cell in nb.cells for out in cell.get("outputs", [])
            if WIDGET in out.get("data", {}) and bar_lines(out.data.get("text/plain", ""))]


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
