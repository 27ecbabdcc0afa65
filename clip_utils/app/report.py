"""The comparison of every method, redrawn from saved results alone.

    paths = make_report("results")     # results/summary.csv, results/figures/*.png
    table = summary_table("results")   # the same numbers as a pandas DataFrame

Everything here reads files (`metrics.json`, `predictions.csv`, `curves.json`) and draws:
no model, no GPU, so figures can be restyled or re-made on a laptop long after training.
`make_report` redraws summary.csv, the curves, the comparison, the prompt-set chart and
every run's confusion matrix; a sample-prediction grid needs the images themselves, so it
is redrawn only when every image of its predictions.csv is still on disk (and without the
probabilities, which are not saved). Runs that are missing are skipped and named, with the
command that would produce them.

Per dataset the zero-shot row is never chosen by test accuracy, which would select on the
test labels: it is `auto` (chosen on validation) when saved, else `domain`, else `default`,
else the first saved set (its name is in the `prompt_set` column).

Few-shot runs (`fewshot`, `sweep`) add one row per method and shots after the full-data
rows (`shots` empty), with their mean over the seeds run (`seeds`) and the standard deviation
of top-1 (`top1_std`, empty for one seed); the comparison figure draws them as groups of
their own with the spread as error bars, and each dataset's few-shot table and figure are
redrawn too.
"""

from __future__ import annotations

import csv
import shlex
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from clip_utils import registry
from clip_utils.app import sweep
from clip_utils.app.base2new import CSV_FILE as BASE2NEW_CSV
from clip_utils.app.base2new import redraw_base2new
from clip_utils.config import OFFICIAL_SPLIT
from clip_utils.errors import InvalidValue, MissingFile
from clip_utils.figures.predictions import plot_confusion, plot_prompt_comparison, plot_sample_predictions
from clip_utils.figures.training import plot_comparison, plot_curves, plot_dynamics
from clip_utils.results import fewshot, prompt_sets
from clip_utils.results.evaluation import method_figures, run_label
from clip_utils.results.layout import dataset_folders, figures_dir, method_dir, readable_metrics, recorded_folder
from clip_utils.runtime.files import read_json, write_csv

COLUMNS = ("dataset", "method", "prompt_set", "shots", "seeds", "fitted_on", "n", "top1", "top1_std", "top5",
           "mean_per_class",
           "trainable_params", "trainable_pct", "train_seconds", "seconds", "peak_vram_mb", "epochs", "best_epoch",
           "model")


# --------------------------------------------------------------------------- reading


def baseline_set(saved: Sequence[str]) -> str | None:
    """The prompt set that stands for zero-shot in the comparison (None when none is saved).

    Args:
        saved: the saved prompt sets of one dataset, in `prompt_sets.saved_results` order.
    """
    return prompt_sets.headline(saved) if saved else None


def zeroshot_baseline(results_dir: str | Path, dataset: str, model: str | None = None) -> dict | None:
    """The saved zero-shot metrics of `dataset` under `baseline_set` (None when there are none).

    Args:
        results_dir: the results root.
        dataset: dataset name.
        model: prefer the prompt sets run with this model (the trained methods' model), so a
            comparison does not set one model's zero-shot beside another's fine-tuning.

    Returns:
        The metrics.json content with `prompt_set` set to the folder it was read from.
    """
    sets = prompt_sets.saved_results(results_dir).get(dataset, {})
    same_model = {name: m for name, m in sets.items() if m.get("model") == model}
    sets = same_model or sets
    name = baseline_set(list(sets))
    return None if name is None else sets[name] | {"prompt_set": name}


def summary_row(metrics: Mapping) -> dict:
    """One row of summary.csv from a metrics.json (zero-shot: no training, no trainable parameters).

    Args:
        metrics: a method's metrics.json content.
    """
    zeroshot = registry.get(metrics["method"]).reference
    prompt_set = metrics.get("prompt_set", "")
    if zeroshot and metrics.get("selected_set"):
        prompt_set = f"{prompt_set} ({metrics['selected_set']})"
    return {
        "dataset": recorded_folder(metrics), "method": metrics["method"],
        "prompt_set": prompt_set if zeroshot else "",
        "n": metrics["n"], "top1": metrics["top1"], "top5": metrics["top5"],
        "mean_per_class": metrics["mean_per_class"],
        "trainable_params": 0 if zeroshot else metrics["trainable_params"],
        "trainable_pct": 0.0 if zeroshot else metrics.get("trainable_pct"),
        "train_seconds": 0.0 if zeroshot else metrics.get("train_seconds", metrics.get("seconds")),
        "seconds": metrics.get("seconds"), "peak_vram_mb": metrics.get("peak_vram_mb"),
        "epochs": metrics.get("epochs", ""), "best_epoch": metrics.get("best_epoch", ""), "model": metrics["model"],
        "shots": "", "seeds": 1, "top1_std": "",
        # which labelled images it fitted on: methods side by side should have seen the same
        "fitted_on": "" if zeroshot else metrics.get("fitted_on", "train"),
    }


def fewshot_rows(results_dir: str | Path, dataset: str) -> list[dict]:
    """Summary rows of a dataset's few-shot runs: one per method and shots, averaged over its seeds.

    Accuracies, times and memory are means over the seeds; `top1_std` is the standard
    deviation of top-1 over them (empty for a single seed), `seeds` how many there are.

    Args:
        results_dir: the results root.
        dataset: the dataset's results folder name.
    """
    groups: dict[tuple[str, int], list[dict]] = {}
    for m in fewshot.saved_metrics(results_dir, dataset):
        groups.setdefault((m["method"], m["shots"]), []).append(m)
    rows = []
    for (method, shots), runs in groups.items():
        row = summary_row(runs[0]) | {"method": method, "shots": shots, "seeds": len(runs), "best_epoch": ""}
        for key in ("top1", "top5", "mean_per_class", "train_seconds", "seconds", "peak_vram_mb"):
            values = [r[key] for r in (summary_row(m) for m in runs) if isinstance(r[key], (int, float))]
            row[key] = sum(values) / len(values) if values else row[key]
        spread = fewshot.aggregate([{**m, "dataset": dataset} for m in runs])[0]["top1_std"]
        row["top1_std"] = "" if spread is None else spread
        rows.append(row)
    return rows


def collect(results_dir: str | Path) -> tuple[list[dict], list[str]]:
    """Summary rows of every saved run, and a note for each dataset/method with none.

    Args:
        results_dir: the results root.

    Returns:
        `(rows, missing)`: rows in dataset then method order; `missing` has a line per dataset
        naming the methods with no full-data run and the command for each. The base-to-new
        protocol's base halves (`<dataset>-base/`) are left out: their accuracy is among half
        the classes, comparable with nothing here (`base2new.csv` reports them).
    """
    rows, missing = [], []
    for dataset in (folder.name for folder in dataset_folders(results_dir)):
        if is_class_subset(results_dir, dataset):
            continue
        trained = {}
        for m in registry.trained():
            file = Path(results_dir) / dataset / m.folder / "metrics.json"
            if file.is_file() and (metrics := readable_metrics(file)) is not None:
                trained[m.name] = metrics
        model = next((m["model"] for m in trained.values()), None)
        found = {registry.reference().name: zeroshot_baseline(results_dir, dataset, model), **trained}
        saved = next((m for m in found.values() if m), None) or next(iter(fewshot.saved_metrics(results_dir, dataset)), {})
        given = _dataset_args(saved, dataset)
        absent = []
        for m in registry.methods():
            if found.get(m.name) is None:
                absent.append(f"{m.label} (python -m clip_utils {m.command}"
                              f"{' --prompts all' if m.reference else ''} {given})")
            else:
                rows.append(summary_row(found[m.name]))
        if absent:  # one line per dataset, however many methods are registered
            missing.append(f"{dataset}: " + "; ".join(absent))
        rows += fewshot_rows(results_dir, dataset)
        models = sorted({r["model"] for r in rows if r["dataset"] == dataset})
        if len(models) > 1:
            warnings.warn(f"{dataset}: the saved results come from different models ({', '.join(models)}), so "
                          f"the comparison mixes them; rerun the older ones or keep each model in its own "
                          f"--results-dir", stacklevel=2)
    return rows, missing


def _dataset_args(saved: Mapping, folder: str) -> str:
    """What --dataset and --split said for a saved run (an image folder's path quoted), for the
    commands that fill the gaps; a split file of one's own is named as a placeholder (the
    metrics keep its hash, not its path)."""
    args = ["--dataset", saved.get("dataset", folder)]
    source = saved.get("split_source", OFFICIAL_SPLIT)
    if source != OFFICIAL_SPLIT:
        args += ["--split", source]
    text = shlex.join(args)
    sha = saved.get("split_sha256") or ""
    if source != OFFICIAL_SPLIT and sha and folder.endswith(f"-{source}-{sha[:8]}"):
        text += " --split-file YOUR_SPLIT_FILE"
    return text


def is_class_subset(results_dir: str | Path, dataset: str) -> bool:
    """Whether a results folder holds a class subset's runs (base-to-new's base half)."""
    saved = next(iter(fewshot.saved_metrics(results_dir, dataset)), None)
    return bool(saved and saved.get("class_subset"))


def fitted_methods(results_dir: str | Path, dataset: str) -> list[str]:
    """The methods that fit on labelled images with a full-data run saved for `dataset`, in
    registry order (what a notebook's per-method sections show).

    Args:
        results_dir: the results root.
        dataset: the dataset's name or results folder name.
    """
    return [m.name for m in registry.trained()
            if (method_dir(results_dir, dataset, m.name) / "metrics.json").is_file()]


def saved_curves(results_dir: str | Path) -> dict[str, dict[str, list[dict]]]:
    """Every saved curves.json: `{dataset: {method: curves}}`.

    Args:
        results_dir: the results root.
    """
    out: dict[str, dict[str, list[dict]]] = {}
    for dataset in (folder.name for folder in dataset_folders(results_dir)):
        for m in registry.trained():
            file = Path(results_dir) / dataset / m.folder / "curves.json"
            if m.epochs and file.is_file():
                out.setdefault(dataset, {})[m.name] = read_json(file)
    return out


def saved_evaluations(results_dir: str | Path) -> list[tuple[Path, dict[str, Path]]]:
    """Every saved evaluation and where its figures go, named as `save_evaluation` names them.

    Args:
        results_dir: the results root.

    Returns:
        `[(folder holding metrics.json and predictions.csv, {"confusion": png, "samples": png})]`,
        in dataset, method and prompt-set order; zero-shot validation runs (`<set>/val/`) included.
    """
    results_dir = Path(results_dir)
    saved_sets = prompt_sets.saved_results(results_dir)
    out = []
    for dataset in (folder.name for folder in dataset_folders(results_dir)):
        for name in saved_sets.get(dataset, {}):
            out.append((prompt_sets.output_dir(results_dir, dataset, name),
                        prompt_sets.figures(results_dir, dataset, name)))
        # saved_results reads test runs only; an `--eval-split val` run keeps its own figures.
        for file in sorted((results_dir / dataset / registry.reference().folder).glob("*/val/metrics.json")):
            name = file.parent.parent.name
            out.append((file.parent, prompt_sets.figures(results_dir, dataset, name, "val")))
        for m in registry.trained():
            folder = method_dir(results_dir, dataset, m.name)
            if (folder / "metrics.json").is_file():
                out.append((folder, method_figures(results_dir, dataset, m.name)))
    return out


def read_predictions(path: str | Path) -> tuple[list[str], list[int], list[int]]:
    """The `path`, `label` and `pred` columns of a predictions.csv.

    Args:
        path: the predictions.csv file.

    Raises:
        ValueError: a row without those columns or with a non-integer label.
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        return [r["path"] for r in rows], [int(r["label"]) for r in rows], [int(r["pred"]) for r in rows]
    except (KeyError, TypeError, ValueError) as err:
        raise InvalidValue(f"{path} is not a predictions file with path,label,pred columns ({err!r})") from err


def summary_table(results_dir: str | Path):
    """The comparison as a pandas DataFrame (accuracies in %, one row per dataset and method).

    Args:
        results_dir: the results root.
    """
    import pandas as pd

    rows, _ = collect(results_dir)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    if table["model"].nunique() <= 1:  # one model: say it once, elsewhere, not on every row
        table = table.drop(columns=["model"])
    table["shots"] = table["shots"].map(lambda k: "all" if k == "" else k)
    table["top1_std"] = pd.to_numeric(table["top1_std"], errors="coerce")
    for col in ("top1", "top1_std", "top5", "mean_per_class"):
        table[col] = 100 * table[col]
    table["method"] = table["method"].map(lambda name: registry.get(name).label)
    return table.rename(columns={"top1": "top1 %", "top1_std": "top1 std %", "top5": "top5 %",
                                 "mean_per_class": "mean per class %", "trainable_pct": "trainable %"}).round(3)


def photo_table(predictions: Mapping[str, Sequence[Mapping]]):
    """Each photo's top-1 class under each method, side by side (a pandas DataFrame).

    Args:
        predictions: `{method: photos.predict_photos(...) result}` for one dataset.
    """
    import pandas as pd

    rows: dict[str, dict[str, str]] = {}
    for method, results in predictions.items():
        for r in results:
            top = r.get("top_k") or [{}]
            cell = r["error"] if "error" in r else f"{top[0]['name']} ({top[0]['prob']:.0%})"
            rows.setdefault(Path(r["photo"]).name, {})[registry.get(method).label] = cell
    return pd.DataFrame.from_dict(rows, orient="index")


# --------------------------------------------------------------------------- figures


def redraw_evaluation(folder: str | Path, figures: Mapping[str, Path]) -> tuple[list[Path], list[str]]:
    """Redraw one run's confusion matrix, and its sample grid when every image is still there.

    Args:
        folder: the run's results folder (metrics.json with `class_names`, predictions.csv).
        figures: `{"confusion": png, "samples": png}` (`evaluation.figure_paths`).

    Returns:
        `(written figures, notes on what was not redrawn and why)`.
    """
    folder = Path(folder)
    predictions = folder / "predictions.csv"
    if not predictions.is_file():
        return [], [f"{folder}: no predictions.csv, its confusion and sample figures were not redrawn"]
    try:
        metrics = read_json(folder / "metrics.json")
        names = metrics["class_names"]
        paths, labels, preds = read_predictions(predictions)
    except (KeyError, ValueError) as err:  # a partial or older run: skip it, keep the rest of the report
        return [], [f"{folder}: cannot redraw its figures ({err!s})"]
    what = run_label(metrics)  # the title save_evaluation gave these figures
    plot_confusion(labels, preds, names, title=f"{what}: top-1 {metrics['top1']:.1%}", path=figures["confusion"])
    absent = [p for p in paths if not Path(p).is_file()]
    if absent:
        return [figures["confusion"]], [f"{figures['samples'].name} not redrawn: {len(absent)} of {len(paths)} "
                                        f"images listed in {predictions} are missing (e.g. {absent[0]})"]
    plot_sample_predictions(paths, labels, preds, names, title=what, path=figures["samples"])
    return [figures["confusion"], figures["samples"]], []


# --------------------------------------------------------------------------- entry point


def is_c_sweep(curves: Sequence[Mapping]) -> bool:
    """Whether a curves.json is an L-BFGS probe's sweep of C (one entry per C) rather than epochs."""
    return any("C" in entry for entry in curves)


def draw_curves(curves: Mapping[str, Mapping[str, Sequence[Mapping]]], figures: Path) -> list[Path]:
    """Each run's curves and each dataset's training dynamics (of the runs trained by epochs).

    Args:
        curves: `saved_curves(...)`.
        figures: the figures folder.
    """
    written = []
    for dataset, runs in curves.items():
        for method, entries in runs.items():
            path = figures / f"{dataset}_{method}_curves.png"
            # An L-BFGS probe's "epochs" rank the C values it tried, smallest first.
            sweep_note = " (L-BFGS: one point per C, increasing)" if is_c_sweep(entries) else ""
            plot_curves(entries, f"{dataset} {registry.get(method).label}{sweep_note}", path)
            written.append(path)
        by_epoch = {method: entries for method, entries in runs.items() if not is_c_sweep(entries)}
        if by_epoch:
            path = figures / f"{dataset}_training_dynamics.png"
            plot_dynamics(by_epoch, f"{dataset}: training dynamics", path)
            written.append(path)
    return written


def draw_prompt_sets(results_dir: Path, figures: Path) -> list[Path]:
    """The chart a zero-shot run ends with, from every saved prompt set (none: nothing).

    Args:
        results_dir: the results root.
        figures: the figures folder.
    """
    table = prompt_sets.prompt_table(results_dir)
    if not table:
        return []
    path = figures / prompt_sets.COMPARISON_FIGURE
    plot_prompt_comparison(table, path=path)
    return [path]


def draw_evaluations(results_dir: Path) -> list[Path]:
    """Every saved run's confusion (and, images permitting, sample) figure; skips named on stderr.

    Args:
        results_dir: the results root.
    """
    written = []
    for folder, paths in saved_evaluations(results_dir):
        drawn, notes = redraw_evaluation(folder, paths)
        written += drawn
        for line in notes:
            print(f"report: {line}", file=sys.stderr)
    return written


def comparison_rows(rows: Sequence[Mapping]) -> list[dict]:
    """The summary rows as the comparison figure groups them: few-shot rows under `<dataset> K-shot`.

    Args:
        rows: `collect` rows.
    """
    return [dict(r, dataset=f"{r['dataset']}\n{r['shots']}-shot") if r.get("shots") not in (None, "") else dict(r)
            for r in rows]


def make_report(results_dir: str | Path) -> list[Path]:
    """Write summary.csv and redraw every figure from saved files.

    Missing runs and figures that cannot be redrawn (no predictions.csv, images gone) are
    named on stderr, never fatal.

    Args:
        results_dir: the results root.

    Returns:
        The written files: summary.csv, then the figures (curves, comparison), each dataset's
        fewshot.csv, fewshot_summary.csv and few-shot figure (where few-shot runs are saved),
        each base-to-new figure (where base2new.csv is saved), the prompt-set chart, then each
        run's confusion and sample figures.

    Raises:
        FileNotFoundError: no saved run at all under `results_dir`.
    """
    results_dir = Path(results_dir)
    rows, missing = collect(results_dir)
    curves = saved_curves(results_dir)
    # a dataset whose runs are all base-to-new's holds only its table (the runs are in <dataset>-base/)
    base2new = sorted(f.parent.name for f in results_dir.glob(f"*/{BASE2NEW_CSV}")) if results_dir.is_dir() else []
    if not rows and not curves and not base2new:
        raise MissingFile(
            f"no saved results under {results_dir}: run `python -m clip_utils {'|'.join(registry.choices())} --dataset ...` "
            f"(or the notebooks) first, or point --results-dir at the results folder"
        )
    for line in missing:
        print(f"report: no full-data results for {line}", file=sys.stderr)
    figures = figures_dir(results_dir)
    written = [write_csv(results_dir / "summary.csv", COLUMNS, [[r[c] for c in COLUMNS] for r in rows])]
    written += draw_curves(curves, figures)
    if rows:
        written.append(figures / "comparison.png")
        plot_comparison(comparison_rows(rows), written[-1])
    for dataset in (folder.name for folder in dataset_folders(results_dir)):
        if not is_class_subset(results_dir, dataset):
            written += sweep.write_fewshot_report(results_dir, dataset)[2]
    for dataset in base2new:
        written += redraw_base2new(results_dir, dataset)
    return written + draw_prompt_sets(results_dir, figures) + draw_evaluations(results_dir)
