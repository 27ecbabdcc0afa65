"""The headless notebook runner behind `make run`, `make demo` and the notebook tests."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from clip_utils.app.notebooks import NotebookFailed, execute_notebook


def _notebook(path, *sources):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in sources])
    nbformat.write(nb, path)
    return path


def test_runs_with_the_given_environment_and_banner(tmp_path):
    path = _notebook(tmp_path / "nb.ipynb", "import os\nprint(os.environ['CLIP_PROBE'])")
    execute_notebook(path, tmp_path / "out" / "nb.ipynb", env={"CLIP_PROBE": "hello"}, banner="**DEMO**")
    done = nbformat.read(tmp_path / "out" / "nb.ipynb", as_version=4)
    assert done.cells[0].cell_type == "markdown" and done.cells[0].source == "**DEMO**"
    assert done.cells[1].outputs[0]["text"].strip() == "hello"
    assert not nbformat.read(path, as_version=4).cells[0].outputs  # the source notebook stays clean


def test_no_kernel_outlives_its_notebook(tmp_path):
    import psutil

    path = _notebook(tmp_path / "nb.ipynb", "x = 1")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    execute_notebook(path, tmp_path / "out.ipynb")
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    assert left == []


def test_a_failing_cell_is_one_line_and_the_executed_copy_is_kept(tmp_path):
    path = _notebook(tmp_path / "nb.ipynb", "print('before')", "raise ValueError('no such dataset')", "print('after')")
    out = tmp_path / "out" / "nb.ipynb"
    with pytest.raises(NotebookFailed, match="nb.ipynb stopped with ValueError: no such dataset") as err:
        execute_notebook(path, out)
    assert str(out) in str(err.value)
    done = nbformat.read(out, as_version=4)
    assert done.cells[0].outputs[0]["text"].strip() == "before"  # the work up to the failure is saved
    assert not done.cells[2].outputs


def _parameters(notebook: str, monkeypatch, **env) -> dict:
    """Run a notebook's `parameters` cell (plain Python) under `env`; returns its variables."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cell = next(c for c in nbformat.read(notebook, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    scope: dict = {}
    exec(cell.source, scope)
    return scope


def test_task2_parameters_read_flags_and_lists_as_people_write_them(monkeypatch):
    scope = _parameters("Task2.ipynb", monkeypatch, CLIP_RESUME="true", CLIP_GRAD_CHECKPOINTING="yes",
                        CLIP_DATASETS="flowers102, cub200", CLIP_LORA_TARGETS="q_proj, v_proj", CLIP_EPOCHS="4")
    assert scope["RESUME"] is True and scope["GRAD_CHECKPOINTING"] is True
    assert scope["DATASETS"] == ["flowers102", "cub200"] and scope["LORA_TARGETS"] == ("q_proj", "v_proj")
    assert scope["PROBE_EPOCHS"] == scope["LORA_EPOCHS"] == 4


@pytest.mark.parametrize("notebook", ["Task1.ipynb", "Task2.ipynb"])
def test_a_bad_override_stops_the_parameters_cell_naming_the_variable(monkeypatch, notebook):
    from clip_utils.runtime.env import ParameterError

    with pytest.raises(ParameterError, match="CLIP_BATCH_SIZE='lots'"):
        _parameters(notebook, monkeypatch, CLIP_BATCH_SIZE="lots")


def test_relative_paths_mean_the_callers_folder_for_results_and_notebooks(tmp_path, monkeypatch):
    from clip_utils.app.notebooks import main

    (tmp_path / "nbdir").mkdir()
    nb = _notebook(tmp_path / "nbdir" / "nb.ipynb", "import os, pathlib\n"
                   "out = pathlib.Path(os.environ['CLIP_RESULTS_DIR'])\n"
                   "out.mkdir(parents=True, exist_ok=True)\n(out / 'written.txt').write_text('1')")
    here = tmp_path / "elsewhere"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setenv("CLIP_RESULTS_DIR", "myresults")
    assert main([str(nb)]) == 0
    assert (here / "myresults" / "written.txt").is_file()  # where the kernel wrote
    assert (here / "myresults" / "notebooks" / "nb.ipynb").is_file()  # and where the notebook went


def test_unset_paths_are_the_projects_wherever_the_runner_starts(tmp_path, monkeypatch):
    from clip_utils.app.notebooks import PROJECT_ROOT, _absolute_paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CLIP_RESULTS_DIR", raising=False)
    monkeypatch.delenv("CLIP_DATA_ROOT", raising=False)
    env = _absolute_paths({})
    assert env["CLIP_RESULTS_DIR"] == str(PROJECT_ROOT / "results")
    assert env["CLIP_DATA_ROOT"] == str(PROJECT_ROOT / "data")


def test_kernel_bars_end_as_text_and_informational_lines_are_not_warnings(tmp_path, monkeypatch):
    # As in JupyterLab: the live widget bar, and no widget state saved; what is saved must read
    # without a kernel: the bar's final line as text, never "Error displaying widget".
    monkeypatch.delenv("CLIP_PROGRESS", raising=False)
    source = ("from clip_utils.runtime.progress import bar, info\nfor _ in bar(range(3), desc='pass'):\n    pass\n"
              "info('loaded a model')")
    path = _notebook(tmp_path / "nb.ipynb", source)
    package = {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # the kernel runs in tmp_path
    execute_notebook(path, tmp_path / "widget.ipynb", env=package)
    saved = nbformat.read(tmp_path / "widget.ipynb", as_version=4)
    bar_out, info_out = saved.cells[0].outputs
    assert bar_out["output_type"] == "display_data" and list(bar_out["data"]) == ["text/plain"]
    assert "pass: 100%" in bar_out["data"]["text/plain"] and "3/3" in bar_out["data"]["text/plain"]
    assert (info_out["name"], info_out["text"]) == ("stdout", "loaded a model\n")  # not a pink stderr box
    assert "widgets" not in saved.metadata  # JupyterLab saves no widget state either
    execute_notebook(path, tmp_path / "text.ipynb", env={**package, "CLIP_PROGRESS": "text"})
    bar_out, _ = nbformat.read(tmp_path / "text.ipynb", as_version=4).cells[0].outputs
    assert bar_out["name"] == "stdout" and "pass: 100%" in bar_out["text"] and "3/3" in bar_out["text"]


def test_a_demo_ends_saying_where_its_notebooks_are_and_how_to_use_its_kit(tmp_path, monkeypatch, capsys):
    import shlex
    import sys

    from clip_utils.app import notebooks
    from clip_utils.app.cli import build_parser
    from clip_utils.figures import predictions as plots

    (tmp_path / "kit").mkdir()
    (tmp_path / "kit" / "KIT.json").write_text("{}")  # an existing kit: nothing is built
    ran = []
    monkeypatch.setattr(notebooks, "execute_notebook", lambda nb, out, env, banner: ran.append((out, env)))
    monkeypatch.chdir(tmp_path)
    assert notebooks.main(["--demo", str(tmp_path)]) == 0
    (out, env), _ = ran
    assert env[plots.DEMO_ENV] == "1"  # every figure of the run carries the demo mark
    printed = capsys.readouterr().out
    assert f"executed demo notebooks: {out.parent.relative_to(tmp_path)}/" in printed
    command = next(line.strip() for line in printed.splitlines() if "python -m clip_utils zeroshot" in line)
    words = shlex.split(command)
    assert words[0] == "CLIP_DEMO=1" and Path(words[1]).resolve() == Path(sys.executable).resolve()
    assert words[2:4] == ["-m", "clip_utils"]
    args = build_parser().parse_args(words[4:])  # the printed command is one the CLI takes
    assert (Path(args.model), Path(args.data_root), Path(args.results_dir)) == (
        Path("kit/model"), Path("kit/data"), Path("results"))
