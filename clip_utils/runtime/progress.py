"""Progress bars that behave in a terminal, a notebook and a log file alike.

    for batch in bar(batches, desc="encoding images", total=n, unit="batch"):
        ...

Every long pass of the package goes through `bar`, so one place decides how progress is shown:

- `TQDM_DISABLE=1` (tqdm's own variable) hides every bar, as does `enabled=False`;
- `CLIP_PROGRESS=text` asks for the log style below everywhere; the headless notebook runner
  sets it for its kernels, because a saved widget keeps whatever state it was last drawn in
  (`33% 1/3` on a full bar) and viewers without widget support show `0%| | 0/N`;
- otherwise a terminal gets tqdm's live bar, a Jupyter kernel its widget (`tqdm.auto`);
- anywhere else (CI, `nohup`, a batch job, a pipe) stderr is a log: a bar prints no line
  when it starts, a plain line at most every `LOG_INTERVAL_S` seconds while it runs, and
  always a last line with its final count (`49/49`), instead of a line of thousands of
  carriage returns.

`quiet_loading()` silences the bars transformers draws while it reads weights from disk
(`Loading weights: 78/78`, once per model load), which would otherwise fill notebooks and
logs with a bar per load; downloads from the hub keep theirs.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator

from tqdm import tqdm as text_tqdm
from tqdm.auto import tqdm as auto_tqdm
from tqdm.autonotebook import tqdm as notebook_tqdm  # what tqdm.auto builds on: widget or console

from clip_utils.errors import InvalidValue
from clip_utils.runtime.env import TRUE

LOG_INTERVAL_S = 30.0
PROGRESS_ENV = "CLIP_PROGRESS"
STYLES = ("auto", "text")


def disabled() -> bool:
    """Whether `TQDM_DISABLE` asks for no progress bars."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in TRUE


def style() -> str:
    """The bar style `CLIP_PROGRESS` asks for: `auto` (the default) or `text`.

    Raises:
        ValueError: any other value (the message names the choices).
    """
    value = os.environ.get(PROGRESS_ENV, "").strip().lower() or "auto"
    if value not in STYLES:
        raise InvalidValue(f"{PROGRESS_ENV}={value!r}: expected one of {', '.join(STYLES)}")
    return value


def _in_kernel() -> bool:
    """Whether tqdm.auto chose its notebook widget (a Jupyter kernel, not a console).

    Not "ipykernel is imported": any process that runs notebooks (nbclient, the tests)
    imports it without being a kernel, and its bars then lost their log style.
    """
    return notebook_tqdm is not text_tqdm


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


class _LogBar(text_tqdm):
    """The log-style bar: silent for its first `delay` seconds, a last line always.

    tqdm's `delay` drops the 0% line a log does not need (and that reads as unfinished
    in a saved notebook), but tqdm then also skips the final line of a bar that never
    printed; a pass shorter than the delay still owes the log its one, final line.
    """

    def close(self) -> None:
        if not self.disable:
            if self.last_print_t < self.start_t + self.delay:
                self.delay = 0.0  # never displayed: let close() print the final state
            elif self.last_print_n == self.n:
                # A long pass whose last step already printed the final count: in a terminal
                # close() redraws that line in place, in a log it would be a second copy.
                self.leave = False
        super().close()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        # A postfix (the running loss) goes into the next line the interval prints, not a
        # line of its own: tqdm's forced refresh would log `0/16` while a loop that counts
        # on its own (a bar iterated directly) has not told the bar its count yet.
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


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
    text = style() == "text"
    if disable or (_in_kernel() and not text):
        return auto_tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=disable, **kwargs)
    if sys.stderr.isatty() and not text:
        return text_tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, **kwargs)
    # position 0: a log has no screen rows, and a nested bar (an epoch's steps) would write
    # cursor-up escape codes into it to reach its own row.
    return _LogBar(iterable, desc=desc, total=total, unit=unit, leave=True, file=_Lines(sys.stderr),
                   mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S, delay=LOG_INTERVAL_S,
                   dynamic_ncols=False, ncols=100, **{"position": 0, **kwargs})


def write(message: str) -> None:
    """Print a line on stdout without breaking a bar in progress (`tqdm.write`)."""
    text_tqdm.write(message)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide the progress bars transformers itself draws inside the block (weights read or written).

    Only transformers' own bars are affected (through its `set_tqdm_hook`); the hub's
    download bars are another library's and stay, so a first download still shows progress.
    """
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is None:  # a transformers without the hook: its bars stay as they are
        yield
        return

    def hidden(factory, args, kwargs):
        return factory(*args, **{**kwargs, "disable": True})

    previous = set_hook(hidden)
    try:
        yield
    finally:
        set_hook(previous)
