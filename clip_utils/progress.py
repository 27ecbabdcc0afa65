"""Progress bars that behave in a terminal, a notebook and a log file alike.

    for batch in bar(batches, desc="encoding images", total=n, unit="batch"):
        ...

Every long pass of the package goes through `bar`, so one place decides how progress is shown:

- `TQDM_DISABLE=1` (tqdm's own variable) hides every bar, as does `enabled=False`;
- a terminal gets tqdm's live bar, a Jupyter kernel its widget (`tqdm.auto`);
- anywhere else (CI, `nohup`, a batch job, a pipe) stderr is a log: the bar prints a
  plain line at most every `LOG_INTERVAL_S` seconds and a last line with the final count,
  instead of a line of thousands of carriage returns.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm import tqdm as text_tqdm
from tqdm.auto import tqdm as auto_tqdm

from .params import TRUE

LOG_INTERVAL_S = 30.0


def disabled() -> bool:
    """Whether `TQDM_DISABLE` asks for no progress bars."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in TRUE


def _in_kernel() -> bool:
    return "ipykernel" in sys.modules and auto_tqdm is not text_tqdm


class _Lines:
    """A stream for tqdm that turns each carriage-return refresh into one line of a log."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable: Iterable | None = None, *, desc: str | None = None, total: int | None = None, unit: str = "it",
        leave: bool = False, enabled: bool = True, **kwargs) -> text_tqdm:
    """A tqdm progress bar suited to where the output goes (see the module docstring).

    Args:
        iterable: what to iterate (None: update the bar by hand).
        desc: label.
        total: expected number of items (default: `len(iterable)` when it has one).
        unit: what one item is.
        leave: keep the finished bar on screen (in a log the last line always stays).
        enabled: False hides the bar (e.g. for timing runs).
        **kwargs: passed to tqdm.
    """
    disable = disabled() or not enabled
    if disable or _in_kernel():
        return auto_tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=disable, **kwargs)
    if sys.stderr.isatty():
        return text_tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, **kwargs)
    return text_tqdm(iterable, desc=desc, total=total, unit=unit, leave=True, file=_Lines(sys.stderr),
                     mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S, dynamic_ncols=False, ncols=100,
                     **kwargs)


def write(message: str) -> None:
    """Print a line on stdout without breaking a bar in progress (`tqdm.write`)."""
    text_tqdm.write(message)
