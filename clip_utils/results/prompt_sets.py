"""Saved zero-shot results, one per prompt set: where they live, and tables of them.

    output_dir("results", "flowers102", "domain")      # results/flowers102/zeroshot/domain/
    saved_results("results")                           # {dataset: {prompt_set: metrics}}
    results_table("results")                           # a pandas DataFrame
    headline(["domain", "auto"])                       # "auto": the set that stands for zero-shot

The reference method (zero-shot, `registry.reference()`) keeps one results folder per prompt
set; reports, the few-shot figure's zero-shot line and the notebooks read them here.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

from clip_utils import prompts, registry
from clip_utils.data import Dataset
from clip_utils.results.evaluation import figure_paths
from clip_utils.results.layout import dataset_folders, folder_name, method_dir, readable_metrics

# How tables list the prompt sets of any dataset (each dataset has some of them).
SET_ORDER = ("default", "domain", "diverse", "domain_ensemble", "clip", prompts.WAFFLE, prompts.DESCRIPTIONS)

COMPARISON_FIGURE = "zeroshot_prompt_sets.png"


def output_dir(results_dir: str | Path, dataset: Dataset | str, prompt_set: str, split: str = "test") -> Path:
    """Where one prompt set's results go: `<results>/<dataset>/zeroshot/<set>/`.

    A validation-split run goes one level deeper (`.../<set>/val/`) so that it never
    overwrites the test results the contract, the tables and the charts refer to.

    Args:
        results_dir: the results root.
        dataset: the dataset.
        prompt_set: the prompt set.
        split: the evaluated split.
    """
    folder = method_dir(results_dir, dataset, registry.reference().name, prompt_set)
    return folder if split == "test" else folder / split


def figures(results_dir: str | Path, dataset: Dataset | str, prompt_set: str, split: str = "test") -> dict[str, Path]:
    """The confusion and sample figures of one dataset and prompt set: `{"confusion", "samples"}`.

    Args:
        results_dir: the results root.
        dataset: the dataset.
        prompt_set: the prompt set.
        split: the evaluated split.
    """
    return figure_paths(results_dir, figure_prefix(dataset, prompt_set, split))


def figure_prefix(dataset: Dataset | str, prompt_set: str, split: str = "test") -> str:
    """How one prompt set's figure files start: `<dataset>_zeroshot_<set>[_val]`."""
    return f"{folder_name(dataset)}_{registry.reference().name}_{prompt_set}" + ("" if split == "test" else f"_{split}")


def saved_results(results_dir: str | Path, model: str | None = None) -> dict[str, dict[str, dict]]:
    """Every zero-shot metrics.json under `results_dir`: `{dataset folder: {prompt_set: metrics}}`.

    Args:
        results_dir: the results root.
        model: keep only the runs of this model (None: every run, whatever its model).
    """
    out: dict[str, dict[str, dict]] = {}
    for folder in dataset_folders(results_dir):
        dataset, folder = folder.name, folder / registry.reference().folder
        known = [*SET_ORDER, prompts.AUTO]
        found = sorted(folder.glob("*/metrics.json"), key=lambda p: (
            known.index(p.parent.name) if p.parent.name in known else len(known), p.parent.name))
        runs = {p.parent.name: m for p in found if (m := readable_metrics(p)) is not None}
        runs = {name: m for name, m in runs.items() if model is None or m.get("model") == model}
        if runs:
            out[dataset] = runs
    return out


def prompt_table(results_dir: str | Path, model: str | None = None) -> dict[str, dict[str, float]]:
    """Top-1 per dataset and prompt set from the saved results (input of the comparison chart).

    Args:
        results_dir: the results root.
        model: only this model's runs (None: all; several models then warn, see `results_table`).
    """
    saved = _one_model(saved_results(results_dir, model))
    return {ds: {name: m["top1"] for name, m in sets.items()} for ds, sets in saved.items()}


def _one_model(saved: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    models = sorted({str(m.get("model")) for sets in saved.values() for m in sets.values()})
    if len(models) > 1:
        warnings.warn(f"the saved zero-shot results come from {len(models)} models ({', '.join(models)}): "
                      f"keep each model in its own --results-dir (in Python: pass model= to keep one)", stacklevel=3)
    return saved


def results_table(results_dir: str | Path, model: str | None = None):
    """The saved zero-shot results as a pandas DataFrame, one row per dataset and prompt set.

    Args:
        results_dir: the results root.
        model: only this model's runs (None: every run; a `model` column appears, with a
            warning, when they come from several models).
    """
    import pandas as pd

    saved = _one_model(saved_results(results_dir, model))
    rows = [
        {"dataset": ds, "prompt_set": name, "templates": prompts.prompts_per_class(m["templates"]),
         "selected_set": m.get("selected_set", ""), "n": m["n"], "top1 %": 100 * m["top1"],
         "top5 %": 100 * m["top5"], "mean per class %": 100 * m["mean_per_class"], "model": m.get("model")}
        for ds, sets in saved.items() for name, m in sets.items()
    ]
    table = pd.DataFrame(rows)
    if not table.empty and table["model"].nunique() <= 1:
        table = table.drop(columns=["model"])
    return table.round(2)


# The set that stands for zero-shot in reports and comparisons: `auto` was chosen on the
# validation split; the others are fixed in advance. Never "the best on test", which would
# choose by looking at the test labels.
HEADLINE_ORDER = (prompts.AUTO, "domain", "default")


def headline(sets: Iterable[str]) -> str:
    """The prompt set to report for a dataset: `auto`, else `domain`, else `default`, else the first.

    Args:
        sets: the prompt sets run (e.g. the keys of `run_zeroshot`'s result).
    """
    names = list(sets)
    if not names:
        raise ValueError("no zero-shot results")
    return next((name for name in HEADLINE_ORDER if name in names), names[0])


def summarise(results: Mapping[str, Mapping[str, Mapping]]) -> dict:
    """The numbers worth keeping from `{dataset: run_zeroshot(...)}`, for task1_summary.json.

    Args:
        results: `{dataset: {set name: metrics}}`.
    """
    keep = ("n", "top1", "top5", "mean_per_class", "selected_set", "seconds")
    return {ds: {name: {k: m[k] for k in keep if k in m} | {"templates": prompts.prompts_per_class(m["templates"])}
                 for name, m in sets.items()} for ds, sets in results.items()}
