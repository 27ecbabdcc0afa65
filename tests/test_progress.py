"""progress: bars that end in their true final state wherever they are saved, and quiet model loads."""

from __future__ import annotations

import pytest
from notebook_outputs import bar_lines, unfinished_bars

from clip_utils.runtime import progress


@pytest.fixture(autouse=True)
def _log_style(monkeypatch):
    """Every test starts from the default style, bars enabled."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)


class Handle:
    """What `IPython.display.display(obj, display_id=True)` returns, recording what is shown."""

    def __init__(self, shown: list) -> None:
        self.shown = shown

    def update(self, obj, raw: bool = False) -> None:
        self.shown[-1] = obj


@pytest.fixture
def kernel(monkeypatch):
    """A Jupyter kernel as `bar` sees one: widgets available, displays recorded in order."""
    shown: list = []

    def display(obj, display_id=None):
        assert display_id is True  # the bar must be able to replace its own output
        shown.append(obj)
        return Handle(shown)

    monkeypatch.setattr(progress, "_widget_bars", lambda: True)
    monkeypatch.setattr(progress, "in_kernel", lambda: True)
    monkeypatch.setattr(progress, "_display", display)
    return shown


def test_a_kernel_bar_is_a_widget_that_leaves_its_final_line_as_text(kernel):
    import ipywidgets

    b = progress.bar(range(3), desc="epochs", unit="epoch")
    (widget,) = kernel
    assert isinstance(widget, ipywidgets.HBox)  # while the pass runs: tqdm's widget
    assert list(b) == [0, 1, 2]  # iterating to the end closes the bar
    # After: plain text in the widget's place; a saved notebook has no widget to lose.
    assert kernel == [{"text/plain": kernel[0]["text/plain"]}]
    assert [(d, n, t) for d, n, t, _ in bar_lines(kernel[0]["text/plain"])] == [("epochs", 3, 3)]
    assert widget.comm is None and all(child.comm is None for child in widget.children)  # models closed

    with progress.bar(total=16, desc="encoding", unit="batch", leave=False) as manual:  # left as text too
        manual.update(9)  # stopped short: the line says so
    assert unfinished_bars(kernel[1]["text/plain"]) == [kernel[1]["text/plain"].strip()]
    assert "9/16" in kernel[1]["text/plain"]


def test_text_style_in_a_kernel_prints_plain_lines_that_end_at_the_total(kernel, monkeypatch, capsys):
    monkeypatch.setenv(progress.PROGRESS_ENV, "text")
    assert list(progress.bar(range(3), desc="epochs", unit="epoch")) == [0, 1, 2]
    with progress.bar(total=16, desc="encoding", unit="batch") as manual:
        for _ in range(16):
            manual.update(1)
    out, err = capsys.readouterr()
    assert kernel == [] and err == ""  # no widget, and nothing on stderr (JupyterLab's pink box)
    assert "\r" not in out
    # one line per bar, and it is the final one: no `0%| | 0/N` start line to read as unfinished
    assert [(d, n, t) for d, n, t, _ in bar_lines(out)] == [("epochs", 3, 3), ("encoding", 16, 16)]


def test_information_goes_to_stdout_in_a_kernel_and_to_stderr_elsewhere(monkeypatch, capsys):
    progress.info("loaded a model")
    assert capsys.readouterr() == ("", "loaded a model\n")  # a command's stdout stays its result
    monkeypatch.setattr(progress, "in_kernel", lambda: True)
    progress.info("loaded a model")
    assert capsys.readouterr() == ("loaded a model\n", "")


def test_this_process_is_not_a_kernel():
    # pytest imports IPython and ipykernel (nbclient does) without being a kernel
    assert progress.in_kernel() is False


def test_nested_bars_in_a_log_print_one_final_line_each_and_no_escape_codes(capsys):
    # the training loop's shape: an epoch bar around a step bar that shows the running loss
    for epoch in progress.bar(range(2), desc="run", unit="epoch"):
        steps = progress.bar(range(16), desc=f"epoch {epoch}", unit="step")
        for step in steps:
            steps.set_postfix(loss=f"{1 / (step + 1):.4f}")
    err = capsys.readouterr().err
    assert "\x1b" not in err
    assert [(d, n, t) for d, n, t, _ in bar_lines(err)] == [("epoch 0", 16, 16), ("epoch 1", 16, 16), ("run", 2, 2)]
    assert "loss=0.0625" in err  # the postfix is in the final line


def test_a_bar_that_stops_short_says_so_in_its_last_line(capsys):
    with progress.bar(total=49, desc="steps", unit="step") as steps:
        steps.update(48)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "48/49" in line
    assert unfinished_bars(line) == [line]


def test_a_long_pass_prints_progress_lines_then_its_final_line(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)  # every update is "half a minute later"
    for _ in progress.bar(range(4), desc="long"):
        pass
    counts = [n for _, n, _, _ in bar_lines(capsys.readouterr().err)]
    assert counts[-1] == 4 and len(counts) > 1 and counts == sorted(counts)
    assert counts.count(4) == 1  # the last step printed the final count: close() does not repeat it


def test_an_unknown_style_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv(progress.PROGRESS_ENV, "widgets")
    with pytest.raises(ValueError, match="CLIP_PROGRESS='widgets': expected one of auto, text"):
        progress.bar(range(2))


def test_unfinished_bars_reads_saved_text_as_a_reader_would():
    done = "a: 100%|##########| 3/3 [00:00<00:00]"
    assert unfinished_bars(done) == []
    continued = "a:  40%|####      | 2/5 [00:30<00:45]\na: 100%|##########| 5/5 [01:10<00:00]"
    assert unfinished_bars(continued) == []
    # a count that falls means a new bar with the same label: the one before ended short
    short = "a:  98%|######### | 48/49 [00:30<00:01]"
    restarted = f"{short}\na:  33%|###       | 16/49 [00:30<01:00]\na: 100%|##########| 49/49 [01:30<00:00]"
    assert unfinished_bars(restarted) == [short]
    # a long pass refreshed while nothing moved (an epoch bar during a slow epoch), then done
    stalled = ("a:  67%|######    | 2/3 [00:32<00:16]\na:  67%|######    | 2/3 [01:09<00:16]\n"
               "a: 100%|##########| 3/3 [01:14<00:00]")
    assert unfinished_bars(stalled) == []
    widget_text = "Loading weights:   0%|          | 0/78 [00:00<?, ?it/s]"
    assert unfinished_bars(widget_text) == [widget_text]


def test_loading_a_model_draws_no_transformers_bar_and_says_so_where_it_reads_as_information(
        kit, capfd, monkeypatch):
    from clip_utils.model.clip import load_clip

    capfd.readouterr()
    load_clip(kit["model"])
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err
    assert out == "" and err.startswith(f"loaded {kit['model']} (")  # the command line: stderr
    monkeypatch.setattr(progress, "in_kernel", lambda: True)
    load_clip(kit["model"])
    out, err = capfd.readouterr()
    assert err == "" and out.startswith(f"loaded {kit['model']} (")  # a notebook: stdout, no warning box


def test_quiet_loading_hides_only_transformers_bars_and_only_inside(capfd):
    from transformers.utils import logging as hf_logging

    with progress.quiet_loading():
        for _ in hf_logging.tqdm(range(3), desc="inside"):
            pass
    for _ in hf_logging.tqdm(range(3), desc="outside"):
        pass
    err = capfd.readouterr().err
    assert "inside" not in err and "outside" in err
