"""Task1.ipynb executed end to end on the tiny model and synthetic data, driven by CLIP_* variables."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
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

from clip_utils import prompts
from clip_utils.app.notebooks import execute_notebook
from clip_utils.data import class_names, dataset_spec, load_dataset
from clip_utils.figures import predictions as plots

ROOT = Path(__file__).resolve().parents[1]
WIDGET = "application/vnd.jupyter.widget-view+json"
NOTEBOOK = ROOT / "Task1.ipynb"
DATASETS = ("flowers102", "cub200")


@pytest.fixture(scope="module")
def executed(kit, zeroshot_cli_run, image_folders, tmp_path_factory):
    """Run the notebook once; its results folder starts with the CLI run's feature cache."""
    results = tmp_path_factory.mktemp("task1") / "results"
    shutil.copytree(zeroshot_cli_run[0] / "cache", results / "cache")
    cached = sorted(p.name for p in (results / "cache" / "features").iterdir())
    env = {
        "CLIP_MODEL": str(kit["model"]), "CLIP_DATA_ROOT": str(kit["data"]), "CLIP_RESULTS_DIR": str(results),
        "CLIP_EPOCHS": "1", "CLIP_BATCH_SIZE": "256", "CLIP_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
        # A user's own folder beside the benchmarks: `CLIP_DATASETS` takes `imagefolder:PATH` like any name.
        "CLIP_DATASETS": ",".join([*DATASETS, f"imagefolder:{image_folders['flat']}"]),
    }
    out = results / "notebooks" / "Task1.ipynb"
    execute_notebook(NOTEBOOK, out, env, timeout=600)
    return results, nbformat.read(out, as_version=4), cached


def test_committed_notebook_is_thin_and_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    for var in ("CLIP_MODEL", "CLIP_DATA_ROOT", "CLIP_RESULTS_DIR", "CLIP_DATASETS", "CLIP_DEVICE", "CLIP_BATCH_SIZE"):
        assert var in code[0].source
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert not any(line.lstrip().startswith(("def ", "class ")) for c in code for line in c.source.splitlines())


def test_results_files_follow_the_contract(executed, kit):
    results, _, _ = executed
    for dataset in DATASETS:
        test = load_dataset(dataset, kit["data"], "test")
        sets = prompts.prompt_sets(dataset_spec(dataset))
        for name in [*sets, "auto"]:
            folder = results / dataset / "zeroshot" / name
            m = json.loads((folder / "metrics.json").read_text())
            assert {"dataset", "split", "method", "model", "n", "top1", "top5", "mean_per_class", "class_names",
                    "seconds", "templates", "prompt_set"} <= set(m)
            assert m["dataset"] == dataset and m["method"] == "zeroshot" and m["model"] == str(kit["model"])
            assert m["class_names"] == class_names(dataset, kit["data"]) and m["class_names_source"] == "curated"
            assert m["templates"] == sets[m.get("selected_set", name)]
            with open(folder / "predictions.csv", newline="") as f:
                rows = list(csv.DictReader(f))
            assert list(rows[0])[:3] == ["path", "label", "pred"] and len(rows) == len(test)
            assert (folder / "classification_report.txt").is_file()
            for kind in ("confusion", "samples"):
                assert (results / "figures" / f"{dataset}_zeroshot_{name}_{kind}.png").is_file()
    assert (results / "figures" / "zeroshot_prompt_sets.png").is_file()


def test_feature_cache_was_reused(executed):
    results, _, cached = executed
    now = sorted(p.name for p in (results / "cache" / "features").iterdir())
    assert set(cached) <= set(now)
    assert not [n for n in now if n.startswith("flowers102") and n not in cached]  # nothing re-encoded


def test_photos_and_summary(executed):
    results, nb, _ = executed
    photos = sorted(p.name for p in (ROOT / "my_photo").iterdir())
    figures = sorted(p.name for p in (results / "figures").glob("photo_*.png"))
    assert len(figures) == len(photos) * (len(DATASETS) + 1)  # and the image folder
    summary = json.loads((results / "task1_summary.json").read_text())
    assert set(DATASETS) < set(summary["zeroshot"]) and len(summary["zeroshot"]) == len(DATASETS) + 1
    for dataset in DATASETS:
        assert [Path(r["photo"]).name for r in summary["photos"][dataset]] == photos
        assert all(len(r["top_k"]) == 5 for r in summary["photos"][dataset])
        assert summary["zeroshot"][dataset]["auto"]["selected_set"] in prompts.prompt_sets(dataset_spec(dataset))


def test_the_executed_notebook_shows_its_pictures(executed):
    _, nb, _ = executed
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # 2 confusion matrices + 2 sample grids + the comparison chart + one chart per photo and dataset
    assert len(images) >= 5 + 3 * (len(DATASETS) + 1)
    text = "".join(o.get("text", "") for o in outputs)
    assert "more classes in" in text and "macro avg" in text and "task1_summary.json" in text


def test_an_image_folder_runs_through_the_notebook(executed, image_folders):
    results, _, _ = executed
    name = f"imagefolder:{image_folders['flat']}"
    for prompt_set in [*prompts.prompt_sets(dataset_spec(name)), "auto"]:
        m = json.loads((results / "mushrooms_flat" / "zeroshot" / prompt_set / "metrics.json").read_text())
        assert m["dataset"] == dataset_spec(name).name and m["class_names"] == class_names(name)
    table = json.loads((results / "task1_summary.json").read_text())["zeroshot"]["mushrooms_flat"]  # by results folder
    assert table["auto"]["selected_set"] in prompts.prompt_sets(dataset_spec(name))


def test_the_explorer_cell_shows_its_controls_and_a_static_image_of_its_view(executed):
    _, nb, _ = executed
    controls, static = explorer_outputs(nb)
    assert WIDGET in controls["data"]  # the controls: they need a live kernel
    # What a saved notebook shows without one: the first photo once, its charts beside it (zero-shot).
    assert static["data"]["text/plain"] == f"bird.jpg ({DATASETS[0]})"
    image = Image.open(io.BytesIO(base64.b64decode(static["data"]["image/png"])))
    assert image.width == round((2 * plots.MARGIN_IN + plots.PHOTO_IN + 1 * (plots.GAP_IN + plots.CHART_IN))
                                * plots.EXPLORER_DPI)


def test_saved_progress_is_plain_text_that_ends_at_each_total(executed):
    _, nb, _ = executed
    text = saved_text(nb)
    # Run as in JupyterLab (live widget bars, no widget state saved): every bar ended as its text
    # line, so the only widget left is the explorer's controls.
    assert "widgets" not in nb.metadata
    assert widget_cells(nb) == [i for i, c in enumerate(nb.cells) if "photo_explorer" in c.source]
    assert bar_lines(text), "no progress saved at all"
    assert unfinished_bars(text) == []
    assert "\x1b" not in text  # no terminal escape codes in a saved notebook
    assert "Warning:" not in text  # no library warnings in what a reader sees
    assert "Loading weights" not in text


def test_each_prompt_set_is_encoded_under_its_own_bar_once(executed):
    _, nb, _ = executed
    descs = [desc for desc, *_ in bar_lines(saved_text(nb))]
    for dataset in DATASETS:
        for name in prompts.prompt_sets(dataset_spec(dataset)):
            assert descs.count(f"encoding {dataset} prompts ({name})") == 1, (dataset, name)


def test_the_model_is_loaded_once(executed):
    # Zero-shot under every prompt set, the photos and the explorer share one load of the checkpoint.
    _, nb, _ = executed
    loads = model_loads(saved_text(nb))
    assert len(loads) == 1, loads
    assert model_loads(stdout_text(nb)) == loads  # information, not a warning box (stderr)
