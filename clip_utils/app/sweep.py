"""The few-shot sweep: each method at each shots and seed, run where missing, then tabled and drawn.

    result = run_fewshot(lab, lab.resolve("flowers102"))      # config.FEWSHOT_*: the K of 1-16 every class fills, seeds 1-3
    result = run_fewshot(lab, "cub200", ["probe", "tip-adapter"], shots=(1, 2), seeds=(1, 2))
    result.summary, result.figure                             # mean/std per method and shots, the png
    python -m clip_utils fewshot --dataset flowers102 --methods all --shots 1,2,4,8,16 --seeds 1,2,3

Every method of a sweep fits on the same K-shot sample of each seed (drawn from the seed
alone, saved in each run's samples.json), and the cached image features are encoded once
for the whole sweep. Methods run one after another, each over every shots and seed, in the
order their declared dependencies need (`Method.requires`: LoRA after the probe, so it
starts from the probe of its own sample) and otherwise in registry order. A run whose
metrics.json exists with the same model and settings (`Method.recorded`) is reused, so a
second call only fills in what is missing (an interrupted run starts over: few-shot runs are
short). Then, from the saved runs alone:

    results/<dataset folder>/fewshot.csv          one row per method, shots and seed
    results/<dataset folder>/fewshot_summary.csv  mean and standard deviation over the seeds
    results/figures/<dataset folder>_fewshot.png  top-1 against shots (log scale), mean and a
                                              band of one standard deviation, zero-shot as a line
    results/figures/<dataset folder>_fewshot_cost.png   top-1 at the largest shots against fit time

The zero-shot line is the saved `auto` run of the same model when there is one, else
`auto` is run (`report` redraws the figures from files alone, with whatever zero-shot run
is saved).
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clip_utils import config, prompts, registry
from clip_utils.data import Dataset
from clip_utils.errors import InvalidValue
from clip_utils.figures.predictions import new_figure, save_figure
from clip_utils.figures.training import method_colour
from clip_utils.lab import Lab
from clip_utils.registry import Method
from clip_utils.results import fewshot, prompt_sets
from clip_utils.results.layout import figures_dir, folder_name
from clip_utils.runtime.files import kept_on_failure, read_json, run_lock, write_csv
from clip_utils.runtime.progress import info, write

CSV_FILE = "fewshot.csv"
SUMMARY_FILE = "fewshot_summary.csv"


@dataclass
class FewshotResult:
    """What `run_fewshot` did and wrote.

    Attributes:
        rows: one per run (`fewshot.ROW_COLUMNS`), every saved run of the dataset.
        summary: mean and std per method and shots (`fewshot.SUMMARY_COLUMNS`).
        trained: `(method, shots, seed)` of the runs trained now.
        reused: those found finished and reused.
        files: fewshot.csv, fewshot_summary.csv and the figure.
    """

    rows: list[dict]
    summary: list[dict]
    trained: list[tuple[str, int, int]]
    reused: list[tuple[str, int, int]]
    files: list[Path]

    @property
    def figure(self) -> Path:
        return self.files[-1]


def figure_path(results_dir: str | Path, dataset: Dataset | str) -> Path:
    """`results/figures/<dataset folder>_fewshot.png`."""
    return Path(results_dir) / "figures" / f"{folder_name(dataset)}_fewshot.png"


def cost_figure_path(results_dir: str | Path, dataset: Dataset | str) -> Path:
    """`results/figures/<dataset folder>_fewshot_cost.png`."""
    return Path(results_dir) / "figures" / f"{folder_name(dataset)}_fewshot_cost.png"


def _finished(folder: Path, lab: Lab, dataset: Dataset, shots: int, seed: int, expected: Mapping) -> bool:
    file = folder / "metrics.json"
    if not file.is_file():
        return False
    try:
        m = read_json(file)
    except ValueError:
        return False
    if (m.get("model"), m.get("shots"), m.get("seed")) != (lab.model, shots, seed):
        return False
    # the same class names (naming and label map) as this lab would use: the text classifier differs otherwise
    if m.get("class_names") != list(dataset.class_names) or m.get("class_names_source", lab.class_naming) != dataset.naming:
        return False
    if m.get("split_sha256") != dataset.source.sha256:  # another version of the split file: other images
        return False
    for key, value in expected.items():
        saved = m.get(key)
        if isinstance(value, dict):
            if not isinstance(saved, dict) or any(saved.get(k) != v for k, v in value.items()):
                return False
        elif saved != value:
            return False
    return True


def zeroshot_line(lab: Lab, dataset: Dataset) -> dict:
    """The zero-shot run the figure's line shows: the saved `auto` run of this model, else run now."""
    saved = prompt_sets.saved_results(lab.results_dir, model=lab.model).get(dataset.folder, {})
    if prompts.AUTO in saved:
        return saved[prompts.AUTO] | {"prompt_set": prompts.AUTO}
    reference = registry.reference()
    settings = reference.settings(argparse.Namespace(prompts=[prompts.AUTO], eval_split="test"))
    return reference.run(lab, dataset, settings)[prompts.AUTO] | {"prompt_set": prompts.AUTO}


def check_methods(methods: Sequence[str]) -> list[Method]:
    """The methods a sweep fits, in the order it runs them: each after the ones it requires.

    Args:
        methods: method names, commands or aliases.

    Raises:
        ValueError: none given, or one that fits nothing or does not exist.
    """
    chosen = [registry.get(m) for m in methods]
    fits = registry.trained()
    if not chosen or not all(m.trained for m in chosen):
        raise InvalidValue(f"few-shot runs fit a method on labelled images: choose among "
                         f"{', '.join(m.command for m in fits)} (got {', '.join(methods) or 'none'})")
    names = {m.name for m in chosen}
    ordered: list[Method] = []
    for m in fits:  # registry order, each method's requirements placed before it
        if m.name in names:
            ordered += [r for r in (registry.get(n) for n in m.requires) if r.name in names and r not in ordered]
            if m not in ordered:
                ordered.append(m)
    return ordered


def default_args() -> argparse.Namespace:
    """A command line that sets nothing: each method's settings at its defaults."""
    return argparse.Namespace(batch_size=None, seed=None)


def fit_run(lab: Lab, dataset: Dataset, method: Method, settings: Any, shots: int, seed: int) -> tuple[dict, bool]:
    """One K-shot run of a method: the finished one reused when it has the same model, settings,
    class names and split, else run now (one run per folder at a time, and a failed rerun gives
    the folder back as it was).

    Args:
        lab: the run context.
        dataset: the resolved dataset (or class subset).
        method: a method that fits.
        settings: its settings (`method.settings(args)`).
        shots: images per class.
        seed: the run's seed.

    Returns:
        `(metrics.json content, whether it was reused)`.
    """
    folder = fewshot.run_dir(lab.results_dir, dataset, method.name, shots, seed)
    if _finished(folder, lab, dataset, shots, seed, method.recorded(lab, settings, seed)):
        return read_json(folder / "metrics.json"), True
    with run_lock(folder), kept_on_failure(folder):
        return method.run(lab, dataset, settings, shots=shots, seed=seed), False


def default_shots(lab: Lab, dataset: Dataset) -> list[int]:
    """`config.FEWSHOT_SHOTS` without the K the dataset's smallest class cannot fill (at least
    that class's count), with a note line when some are left out."""
    most = fewshot.smallest_class(lab.dataset(dataset, "train").samples)
    grid = list(config.FEWSHOT_SHOTS)
    shots = [k for k in grid if k <= most] or [most]
    if shots != grid:
        info(f"note: {dataset.folder}'s smallest class has {most} training images: shots "
             f"{','.join(map(str, shots))} of the default {','.join(map(str, grid))}")
    return shots


def run_fewshot(lab: Lab, dataset: Dataset | str, methods: Sequence[str] = config.FEWSHOT_METHODS,
                shots: Sequence[int] | None = None, seeds: Sequence[int] = config.FEWSHOT_SEEDS, *,
                settings: Mapping[str, Any] | None = None, args: argparse.Namespace | None = None) -> FewshotResult:
    """Run the missing few-shot runs of a dataset, then write its table, summary and figures.

    Args:
        lab: the run context (model, data, results folder, device).
        dataset: the dataset (a name is resolved by the lab: this is an entry point).
        methods: registered methods that fit (names, commands or aliases).
        shots: images per class, e.g. `(1, 2, 4, 8, 16)`; a K some class cannot fill is refused.
            None: `config.FEWSHOT_SHOTS` without the K the dataset's smallest class cannot fill
            (a note line says which were left out).
        seeds: the seeds each shots value runs with (each draws its own sample, shared by
            every method).
        settings: `{method name: its settings}` for methods not at their defaults (e.g. the
            probe's `ProbeSettings`); each run's seed replaces the settings' own.
        args: the `fewshot` command line, read by each method's `settings` (its options and
            `--epochs` apply where they can); None: defaults.

    Returns:
        A `FewshotResult`; its `rows` and `summary` cover every saved few-shot run of the
        dataset, this call's and earlier ones'.
    """
    dataset = lab.resolve(dataset)
    order = check_methods(methods)
    if shots is None:
        shots = default_shots(lab, dataset)
    for k in shots:
        fewshot.check_shots(k)
    try:  # before any run: a K some class cannot fill is refused, not found out half-way
        fewshot.check_enough(lab.dataset(dataset, "train").samples, max(shots))
    except InvalidValue as err:
        raise InvalidValue(f"{dataset.folder}: {err}") from None
    given = dict(settings or {})
    trained, reused = [], []
    for m in order:
        chosen = given.get(m.name) or m.settings(args or default_args())
        for k in sorted(set(shots)):
            for seed in dict.fromkeys(seeds):
                result, was_reused = fit_run(lab, dataset, m, chosen, k, seed)
                (reused if was_reused else trained).append((m.name, k, seed))
                what = f"{dataset.folder} {m.label} {k}-shot seed {seed}"
                write(f"fewshot: {what}: " + ("finished earlier, reused" if was_reused else f"top-1 {result['top1']:.2%}"))
    line = zeroshot_line(lab, dataset)
    rows, summary, files = write_fewshot_report(lab.results_dir, dataset, line)
    return FewshotResult(rows, summary, trained, reused, files)


def write_fewshot_report(results_dir: str | Path, dataset: Dataset | str, zeroshot_run: Mapping | None = None,
                         ) -> tuple[list[dict], list[dict], list[Path]]:
    """fewshot.csv, fewshot_summary.csv and the figure of a dataset, from its saved few-shot runs.

    Args:
        results_dir: the results root.
        dataset: the resolved dataset, or its results folder's name.
        zeroshot_run: the zero-shot metrics for the figure's line (None: the saved `auto` run,
            else the baseline `report` uses, else no line).

    Returns:
        `(rows, summary, written files)`; no files when no few-shot run is saved.
    """
    rows, name = fewshot.saved_runs(results_dir, dataset), folder_name(dataset)
    if not rows:
        return [], [], []
    for message in fewshot.mixed_settings(fewshot.saved_metrics(results_dir, dataset)):
        warnings.warn(f"{name}: {message}", stacklevel=2)
    summary = fewshot.aggregate(rows)
    folder = Path(results_dir) / name
    files = [write_csv(folder / CSV_FILE, fewshot.ROW_COLUMNS, [[r.get(c) for c in fewshot.ROW_COLUMNS] for r in rows]),
             write_csv(folder / SUMMARY_FILE, fewshot.SUMMARY_COLUMNS,
                       [[r.get(c) for c in fewshot.SUMMARY_COLUMNS] for r in summary])]
    if zeroshot_run is None:
        saved = prompt_sets.saved_results(results_dir, model=rows[0].get("model")).get(name, {})
        headline = prompt_sets.headline(saved) if saved else None
        zeroshot_run = saved[headline] | {"prompt_set": headline} if headline else None
    figures_dir(results_dir)
    path = figure_path(results_dir, dataset)
    plot_fewshot(summary, zeroshot_run, f"{name}: few-shot test top-1 (mean ± std over seeds)", path)
    cost = cost_figure_path(results_dir, dataset)
    plot_fewshot_cost(summary, zeroshot_run, f"{name}: accuracy against fit time", cost)
    return rows, summary, [*files, cost, path]


def plot_fewshot(summary: Sequence[Mapping], zeroshot_run: Mapping | None, title: str,
                 path: str | Path | None = None):
    """Top-1 against shots per class (log scale): each method's mean over seeds, a band of one
    standard deviation where there are several seeds, zero-shot as a horizontal line.

    Args:
        summary: `fewshot.aggregate` rows of one dataset.
        zeroshot_run: zero-shot metrics (`top1`, optionally `prompt_set`, `selected_set`), or None.
        title: the figure's title.
        path: PNG to write (None: only return the figure).
    """
    fig = new_figure(figsize=(7, 4.5))
    ax = fig.subplots()
    every = sorted({r["shots"] for r in summary})
    for k, m in enumerate(registry.methods()):
        runs = sorted((r for r in summary if r["method"] == m.name), key=lambda r: r["shots"])
        if not runs:
            continue
        xs, mean = [r["shots"] for r in runs], [100 * r["top1"] for r in runs]
        std = [100 * (r["top1_std"] or 0.0) for r in runs]
        seeds = sorted({r["seeds"] for r in runs})
        label = f"{m.label} ({'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''})"
        ax.plot(xs, mean, "o-", color=method_colour(k), label=label)
        if any(r["seeds"] > 1 for r in runs):
            ax.fill_between(xs, [a - b for a, b in zip(mean, std, strict=True)],
                            [a + b for a, b in zip(mean, std, strict=True)], color=method_colour(k), alpha=0.2, lw=0)
    if zeroshot_run is not None:
        # `auto` picks its prompt set on the whole validation split, more labelled images than a
        # K-shot run's min(K, 4) per class: the legend says so
        chosen = (f": {zeroshot_run['selected_set']} on the full val split" if zeroshot_run.get("selected_set")
                  else "")
        ax.axhline(100 * zeroshot_run["top1"], color="C0", ls="--", lw=1.2,
                   label=f"{registry.reference().label} ({zeroshot_run.get('prompt_set', '')}{chosen})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(every, [str(k) for k in every])
    ax.minorticks_off()
    ax.set(xlabel="training images per class (shots)", ylabel="test top-1 %", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, path)


def plot_fewshot_cost(summary: Sequence[Mapping], zeroshot_run: Mapping | None, title: str,
                      path: str | Path | None = None):
    """Each method's top-1 at the largest shots it ran against its mean fit time (log scale), the
    question behind every comparison: is the accuracy worth the time?

    Args:
        summary: `fewshot.aggregate` rows of one dataset (`train_seconds` is the fit time).
        zeroshot_run: zero-shot metrics for a reference line, or None.
        title: the figure's title.
        path: PNG to write (None: only return the figure).
    """
    fig = new_figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for k, m in enumerate(registry.methods()):
        runs = [r for r in summary if r["method"] == m.name]
        if not runs:
            continue
        top = max(runs, key=lambda r: r["shots"])
        seconds = max(float(top.get("train_seconds") or 0.0), 1e-3)  # a log axis: training-free fits take ~0 s
        ax.errorbar([seconds], [100 * top["top1"]], yerr=[100 * (top["top1_std"] or 0.0)], fmt="o", color=method_colour(k),
                    capsize=3, label=f"{m.label} ({top['shots']}-shot)")
    if zeroshot_run is not None:
        ax.axhline(100 * zeroshot_run["top1"], color="C0", ls="--", lw=1.2, label=registry.reference().label)
    ax.set_xscale("log")
    ax.set(xlabel="fit time per run, s (log)", ylabel="test top-1 %", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, path)


def summary_table(summary: Sequence[Mapping]):
    """The summary as a pandas DataFrame: accuracies in %, one row per method and shots.

    Args:
        summary: `fewshot.aggregate` rows (`FewshotResult.summary`).
    """
    import pandas as pd

    table = pd.DataFrame(list(summary), columns=list(fewshot.SUMMARY_COLUMNS)).drop(columns=["model"])
    for col in ("top1", "top1_std", "top5", "top5_std", "mean_per_class", "mean_per_class_std"):
        table[col] = 100 * table[col].astype(float)
    table["method"] = table["method"].map(lambda name: registry.get(name).label)
    return table.round(2)
