"""Task2.ipynb executed end to end on the tiny model and synthetic data, driven by CLIP_* variables."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import nbformat
import pytest
from notebook_outputs import (
    bar_lines,
    explorer_outputs,
    model_loads,
    saved_text,
    stdout_text,
    unfinished_bars,
    widget_cells,
)
from PIL import Image

from clip_utils import config
from clip_utils.app.notebooks import execute_notebook
from clip_utils.data import class_names, load_dataset
from clip_utils.figures import predictions as plots

ROOT = Path(__file__).resolve().parents[1]
WIDGET = "application/vnd.jupyter.widget-view+json"
NOTEBOOK = ROOT / "Task2.ipynb"
# The kit's 20-class CUB keeps the run to seconds; `make demo` runs both datasets.
DATASET = "cub200"
EPOCHS = 2
# A user's own folder beside it: `CLIP_DATASETS` takes `imagefolder:PATH` like any name.
FOLDER = "mushrooms_flat"


@pytest.fixture(scope="module")
def executed(kit, image_folders, tmp_path_factory):
    results = tmp_path_factory.mktemp("task2") / "results"
    env = {
        "CLIP_MODEL": str(kit["model"]), "CLIP_DATA_ROOT": str(kit["data"]), "CLIP_RESULTS_DIR": str(results),
        "CLIP_DATASETS": f"{DATASET},imagefolder:{image_folders['flat']}", "CLIP_EPOCHS": str(EPOCHS),
        "CLIP_BATCH_SIZE": "32", "CLIP_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
        # One shot count over the default two seeds: the protocol and its spread, at half the cost.
        "CLIP_FEWSHOT_SHOTS": "1",
    }
    out = results / "notebooks" / "Task2.ipynb"
    execute_notebook(NOTEBOOK, out, env, timeout=600)
    return results, nbformat.read(out, as_version=4)


def test_committed_notebook_is_thin_and_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    for var in ("CLIP_MODEL", "CLIP_DATA_ROOT", "CLIP_RESULTS_DIR", "CLIP_DATASETS", "CLIP_EPOCHS",
                "CLIP_BATCH_SIZE", "CLIP_DEVICE", "CLIP_PROBE_SOLVER", "CLIP_FEWSHOT_SHOTS", "CLIP_FEWSHOT_SEEDS"):
        assert var in code[0].source
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert not any(line.lstrip().startswith(("def ", "class ")) for c in code for line in c.source.splitlines())


def test_trained_methods_write_the_contract_files(executed, kit):
    results, _ = executed
    test = load_dataset(DATASET, kit["data"], "test")
    for method in ("linear_probe", "lora"):
        folder = results / DATASET / method
        m = json.loads((folder / "metrics.json").read_text())
        assert {"dataset", "split", "method", "model", "n", "top1", "top5", "mean_per_class", "class_names",
                "seconds", "trainable_params", "trainable_pct", "epochs", "best_epoch", "peak_vram_mb",
                "config"} <= set(m)
        curves = json.loads((folder / "curves.json").read_text())
        # The default probe is L-BFGS: its "epochs" are the C values it tried, one curve entry each.
        epochs = len(curves) if m.get("solver") == "lbfgs" else EPOCHS
        assert (m["method"], m["epochs"], m["n"], m["peak_vram_mb"]) == (method, epochs, len(test), None)
        assert m["class_names"] == class_names(DATASET, kit["data"]) and m["model"] == str(kit["model"])
        with open(folder / "predictions.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(test) and {"path", "label", "pred"} <= set(rows[0])
        assert [e["epoch"] for e in curves] == list(range(1, epochs + 1))
        assert (folder / "head.safetensors").is_file()
    assert (results / DATASET / "lora" / "adapter" / "adapter_config.json").is_file()
    assert (results / DATASET / "zeroshot" / "auto" / "metrics.json").is_file()


def test_the_baseline_is_the_zero_shot_number_of_the_summary(executed):
    results, nb = executed
    baseline = json.loads((results / DATASET / "zeroshot" / "auto" / "metrics.json").read_text())
    summary = json.loads((results / "task2_summary.json").read_text())
    row = next(r for r in summary["comparison"] if r["dataset"] == DATASET and r["method"] == "zeroshot")
    assert row["prompt_set"] == f"auto ({baseline['selected_set']})" and row["top1"] == baseline["top1"]
    printed = "".join(o.get("text", "") for c in nb.cells if "run_zeroshot" in c.source for o in c.outputs)
    assert f"top-1 {baseline['top1']:.2%}" in printed and baseline["selected_set"] in printed


def test_comparison_figures_and_summary(executed):
    results, nb = executed
    with open(results / "summary.csv", newline="") as f:
        methods = [r["method"] for r in csv.DictReader(f) if r["dataset"] == DATASET and not r["shots"]]
    assert methods == ["zeroshot", "linear_probe", "lora"]
    figures = results / "figures"
    for name in ("comparison.png", f"{DATASET}_training_dynamics.png", f"{DATASET}_lora_confusion.png",
                 f"{DATASET}_linear_probe_samples.png"):
        assert (figures / name).is_file(), name
    summary = json.loads((results / "task2_summary.json").read_text())
    # the full-data rows, and the few-shot section's methods (config.NOTEBOOK_FEWSHOT_METHODS)
    assert {r["method"] for r in summary["comparison"]} == {"zeroshot", *config.NOTEBOOK_FEWSHOT_METHODS}
    assert set(summary["photos"][DATASET]) == {"zero-shot", "linear probe", "LoRA"}
    assert all(v["peak_allocated_mb"] is None for v in summary["vram"].values())
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {}))
    assert images >= 5  # curves, reports, comparison and photos are shown, not only saved


def test_the_few_shot_section_runs_the_protocol_and_shows_it(executed):
    results, nb = executed
    with open(results / DATASET / "fewshot.csv", newline="") as f:
        runs = {(r["method"], r["shots"], r["seed"]) for r in csv.DictReader(f)}
    # shots 1 (the test's CLIP_FEWSHOT_SHOTS), the notebook's default seeds 1 and 2
    assert runs == {(m, "1", s) for m in config.NOTEBOOK_FEWSHOT_METHODS for s in ("1", "2")}
    with open(results / "summary.csv", newline="") as f:
        spread = [r for r in csv.DictReader(f) if r["dataset"] == DATASET and r["shots"]]
    assert len(spread) == len(config.NOTEBOOK_FEWSHOT_METHODS)
    assert all(r["seeds"] == "2" and r["top1_std"] != "" for r in spread)
    assert (results / "figures" / f"{DATASET}_fewshot.png").is_file()
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and "run_fewshot" in c.source]
    assert sum("image/png" in o.get("data", {}) for o in cell.outputs) == 2  # one figure per dataset
    summary = json.loads((results / "task2_summary.json").read_text())
    assert {r["shots"] for r in summary["fewshot"][DATASET]} == {1}


def test_an_image_folder_runs_through_every_method(executed):
    results, _ = executed
    rows = [r for r in csv.DictReader(open(results / "summary.csv", newline=""))
            if r["dataset"] == FOLDER and not r["shots"]]
    assert [r["method"] for r in rows] == ["zeroshot", "linear_probe", "lora"]
    for method in ("linear_probe", "lora"):
        assert (results / FOLDER / method / "head.safetensors").is_file()
        assert (results / "figures" / f"{FOLDER}_{method}_confusion.png").is_file()


def test_the_explorer_cell_shows_its_controls_and_a_static_image_of_its_view(executed):
    _, nb = executed
    controls, static = explorer_outputs(nb)
    assert WIDGET in controls["data"]  # the controls: they need a live kernel
    # What a saved notebook shows without one: the first photo once, a chart per trained method beside it.
    assert static["data"]["text/plain"] == f"bird.jpg ({DATASET})"
    image = Image.open(io.BytesIO(base64.b64decode(static["data"]["image/png"])))
    assert image.width == round((2 * plots.MARGIN_IN + plots.PHOTO_IN + 3 * (plots.GAP_IN + plots.CHART_IN))
                                * plots.EXPLORER_DPI)


def test_saved_progress_is_plain_text_that_ends_at_each_total(executed):
    _, nb = executed
    text = saved_text(nb)
    # Run as in JupyterLab (live widget bars, no widget state saved): every bar ended as its text
    # line, so the only widget left is the explorer's controls.
    assert "widgets" not in nb.metadata
    assert widget_cells(nb) == [i for i, c in enumerate(nb.cells) if "photo_explorer" in c.source]
    descs = [desc for desc, *_ in bar_lines(text)]
    assert f"{DATASET} LoRA" in descs  # the epoch bars (the default probe is L-BFGS: no epochs)
    assert unfinished_bars(text) == []
    assert "\x1b" not in text  # no terminal escape codes in a saved notebook
    assert "Warning:" not in text  # a library's warning repeated per fit (scikit-learn's, on K-shot labels)
    assert "Loading weights" not in text  # transformers' bar per load: the lab's own line says it


def test_the_model_is_loaded_once(executed):
    # Zero-shot, the probe, LoRA's training and test on each dataset, the few-shot sweep, the
    # photos and the explorer share one load of the checkpoint.
    _, nb = executed
    loads = model_loads(saved_text(nb))
    assert len(loads) == 1, loads
    assert model_loads(stdout_text(nb)) == loads  # information, not a warning box (stderr)
