"""Progress bars that behave in a terminal, a notebook and a log file alike.

    for batch in bar(batches, desc="encoding images", total=n, unit="batch"):
        ...

Every long pass of the package goes through `bar`, so one place decides how progress is shown:

- `TQDM_DISABLE=1` (tqdm's own variable) hides every bar, as does `enabled=False`;
- a Jupyter kernel gets tqdm's widget while the pass runs, and at its end the widget is
  replaced, in place, by the bar's final line as plain text (`encoding images: 100%|...| 49/49`).
  A widget left in a notebook is a dead one once the kernel is gone: JupyterLab does not save
  widget state, so after a reload, in the saved file and in any viewer it reads "Error
  displaying widget: model not found". The text line is what stays;
- `CLIP_PROGRESS=text` asks for the log style below everywhere (in a kernel on stdout, which
  JupyterLab shows as plain output; stderr there is a pink warning box);
- otherwise a terminal gets tqdm's live bar;
- anywhere else (CI, `nohup`, a batch job, a pipe) stderr is a log: a bar prints no line
  when it starts, a plain line at most every `LOG_INTERVAL_S` seconds while it runs, and
  always a last line with its final count (`49/49`), instead of a line of thousands of
  carriage returns.

`info` prints the package's informational lines (`loaded MODEL ...`): on stdout in a kernel,
where stderr is drawn as a warning, and on stderr elsewhere, so that a command's stdout stays
its result (`predict --json` prints pure JSON).

`quiet_loading()` silences the bars transformers draws while it reads weights from disk
(`Loading weights: 78/78`, once per model load), which would otherwise fill notebooks and
logs with a bar per load; downloads from the hub keep theirs.
"""

from __future__ import annotations

import contextlib
import functools
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


def _widget_bars() -> bool:
    """Whether tqdm.auto chose its notebook widget (a Jupyter kernel with ipywidgets; a kernel
    without them gets text bars, though `in_kernel()` still holds there).

    Not "ipykernel is imported": any process that runs notebooks (nbclient, the tests)
    imports it without being a kernel, and its bars then lost their log style.
    """
    return notebook_tqdm is not text_tqdm


def in_kernel() -> bool:
    """Whether this process is a Jupyter kernel (an IPython shell with a kernel behind it).

    A terminal IPython or a process that merely imports ipykernel (nbclient, the tests) is not.
    """
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


def _display(obj, **kwargs):
    """`IPython.display.display` (one name for tests to replace)."""
    from IPython.display import display

    return display(obj, **kwargs)


def final_line(pbar: text_tqdm) -> str:
    """A bar's state as one plain line (`desc: 100%|##########| 49/49 [00:05<00:00, 9.1batch/s]`).

    The overall rate rather than the last moments' average, as tqdm prints when a bar closes.
    """
    state = {**pbar.format_dict, "ncols": None, "colour": None, "rate": None}
    return pbar.format_meter(**state)


@functools.cache
def _widget_bar_class() -> type:
    """tqdm's notebook bar that leaves its final line as plain text, built on first use
    (importing tqdm.notebook imports ipywidgets, which a command line does not need)."""
    from tqdm.notebook import tqdm_notebook

    class WidgetBar(tqdm_notebook):
        """The notebook widget while the pass runs; its final line, as text, in its place after.

        The widget is shown through a display handle, and `close()` updates that output to the
        text (the saved notebook keeps the text, not a widget whose model dies with the kernel)
        and then closes the widget's models.
        """

        def __init__(self, *args, **kwargs) -> None:
            self._handle = None
            super().__init__(*args, **{**kwargs, "display": False})
            if not self.disable:
                self._handle = _display(self.container, display_id=True)
                self.displayed = True

        def close(self) -> None:
            if self.disable:
                return
            line = final_line(self)
            super().close()
            if self._handle is not None:
                self._handle.update({"text/plain": line}, raw=True)
                self._handle = None
            for widget in (*self.container.children, self.container):
                widget.close()

    return WidgetBar


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
    if disable:
        return auto_tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=True, **kwargs)
    if _widget_bars() and not text:
        # Always left (as its text line): a notebook keeps the record a log keeps.
        return _widget_bar_class()(iterable, desc=desc, total=total, unit=unit, leave=True, **kwargs)
    if sys.stderr.isatty() and not text:
        return text_tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, **kwargs)
    # position 0: a log has no screen rows, and a nested bar (an epoch's steps) would write
    # cursor-up escape codes into it to reach its own row. In a kernel the log goes to stdout.
    stream = sys.stdout if in_kernel() else sys.stderr
    return _LogBar(iterable, desc=desc, total=total, unit=unit, leave=True, file=_Lines(stream),
                   mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S, delay=LOG_INTERVAL_S,
                   dynamic_ncols=False, ncols=100, **{"position": 0, **kwargs})


def write(message: str) -> None:
    """Print a line on stdout without breaking a bar in progress (`tqdm.write`)."""
    text_tqdm.write(message)


def info(message: str) -> None:
    """Print an informational line (`loaded MODEL ...`) where it reads as one.

    In a Jupyter kernel on stdout: JupyterLab draws stderr as a pink warning box, which is
    for warnings and errors. Elsewhere on stderr, so that a command's stdout stays its result.
    """
    text_tqdm.write(message, file=sys.stdout if in_kernel() else sys.stderr)


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
