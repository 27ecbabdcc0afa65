"""The few-shot sweep: each method at each shots and seed, run where missing, then tabled and drawn.

    result = run_fewshot(lab, "flowers102")                   # config.FEWSHOT_*: 1-16 shots, seeds 1-3
    result = run_fewshot(lab, "cub200", shots=(1, 2), seeds=(1, 2), methods=("linear_probe",))
    result.summary, result.figure                             # mean/std per method and shots, the png
    python -m clip_utils fewshot --dataset flowers102 --methods probe,lora --shots 1,2,4,8,16 --seeds 1,2,3

For every shots K and seed S the probe runs before LoRA, so LoRA starts from the probe of
its own sample (LP-FT, see `lora`). A run whose metrics.json exists with the same model,
solver and training settings is reused, so a second call only fills in what is missing (an
interrupted run starts over: few-shot runs are short). Then, from the saved runs alone:

    results/<dataset>/fewshot.csv            one row per method, shots and seed
    results/<dataset>/fewshot_summary.csv    mean and standard deviation over the seeds
    results/figures/<dataset>_fewshot.png    top-1 against shots (log scale), mean and a
                                             band of one standard deviation, zero-shot as a line

The zero-shot line is the saved `auto` run of the same model when there is one, else
`auto` is run (`report` redraws the figure from files alone, with whatever zero-shot run
is saved).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from clip_utils import config

from clip_utils.results import fewshot

from clip_utils import prompts

from clip_utils.methods import zeroshot
from clip_utils.config import LoraSettings, TrainConfig
from clip_utils.data import canonical_name, results_name
from clip_utils.lab import Lab
from clip_utils.methods.lora import run_lora
from clip_utils.registry import METHODS
from clip_utils.registry import method as method_named
from clip_utils.figures.predictions import new_figure, save_figure
from clip_utils.methods.probe import run_probe
from clip_utils.runtime.progress import write
from clip_utils.runtime.files import read_json, write_csv
from clip_utils.results.layout import figures_dir

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


def figure_path(results_dir: str | Path, dataset: str) -> Path:
    """`results/figures/<dataset>_fewshot.png`."""
    return Path(results_dir) / "figures" / f"{results_name(dataset)}_fewshot.png"


def _lora_config(settings: LoraSettings) -> dict:
    # As lora.run_lora records it in metrics.json's config.
    return {"lora_" + k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()}


def _expected(lab: Lab, method: str, cfg: TrainConfig, solver: str, settings: LoraSettings) -> dict:
    """The metrics.json fields a finished run with these settings has."""
    if method == "linear_probe" and solver == "lbfgs":
        return {"solver": solver}  # no training settings: L-BFGS uses none of them
    recorded = asdict(cfg.resolved(lab.batch_size, lab.seed))
    if method == "lora":
        recorded |= _lora_config(settings)
    return {"config": recorded} | ({"solver": solver} if method == "linear_probe" else {})


def _finished(folder: Path, lab: Lab, shots: int, seed: int, expected: Mapping) -> bool:
    file = folder / "metrics.json"
    if not file.is_file():
        return False
    try:
        m = read_json(file)
    except ValueError:
        return False
    if (m.get("model"), m.get("shots"), m.get("seed")) != (lab.model, shots, seed):
        return False
    for key, value in expected.items():
        saved = m.get(key)
        if isinstance(value, dict):
            if not isinstance(saved, dict) or any(saved.get(k) != v for k, v in value.items()):
                return False
        elif saved != value:
            return False
    return True


def zeroshot_line(lab: Lab, dataset: str) -> dict:
    """The zero-shot run the figure's line shows: the saved `auto` run of this model, else run now."""
    saved = zeroshot.saved_results(lab.results_dir, model=lab.model).get(results_name(dataset), {})
    if prompts.AUTO in saved:
        return saved[prompts.AUTO] | {"prompt_set": prompts.AUTO}
    return zeroshot.run_zeroshot(lab, dataset, [prompts.AUTO])[prompts.AUTO] | {"prompt_set": prompts.AUTO}


def check_methods(methods: Sequence[str]) -> list[str]:
    """The canonical names of the methods a sweep trains (`probe` -> `linear_probe`).

    Args:
        methods: method names or aliases.

    Raises:
        ValueError: none given, or one that trains nothing or does not exist.
    """
    names = [method_named(m).name for m in methods]
    if not names or not all(METHODS[m].trained for m in names):
        raise ValueError(f"few-shot runs train a method: choose among probe, lora (got {', '.join(methods) or 'none'})")
    return names


def run_fewshot(lab: Lab, dataset: str, methods: Sequence[str] = config.FEWSHOT_METHODS,
                shots: Sequence[int] = config.FEWSHOT_SHOTS, seeds: Sequence[int] = config.FEWSHOT_SEEDS, *,
                probe_cfg: TrainConfig = config.PROBE, lora_cfg: TrainConfig = config.LORA,
                lora_settings: LoraSettings = config.LORA_SETTINGS,
                solver: str = config.PROBE_SOLVER) -> FewshotResult:
    """Run the missing few-shot runs of a dataset, then write its table, summary and figure.

    Args:
        lab: the run context (model, data, results folder, device).
        dataset: a registered dataset or `imagefolder:PATH`.
        methods: `linear_probe` (or `probe`) and/or `lora`.
        shots: images per class, e.g. `(1, 2, 4, 8, 16)`.
        seeds: the seeds each shots value runs with (each draws its own sample).
        probe_cfg: the probe's settings (its seed is each run's).
        lora_cfg: LoRA's settings (likewise).
        lora_settings: LoRA's adapter settings.
        solver: the probe's solver (`lbfgs` or `adamw`).

    Returns:
        A `FewshotResult`; its `rows` and `summary` cover every saved few-shot run of the
        dataset, this call's and earlier ones'.
    """
    dataset = canonical_name(dataset)
    names = check_methods(methods)
    for k in shots:
        fewshot.check_shots(k)
    # The probe first: LoRA's head starts from the probe of the same shots and seed.
    order = [m for m in METHODS if m in names]
    trained, reused = [], []
    for k in sorted(set(shots)):
        for seed in dict.fromkeys(seeds):
            for method in order:
                cfg = replace(probe_cfg if method == "linear_probe" else lora_cfg, seed=seed)
                folder = fewshot.run_dir(lab.results_dir, dataset, method, k, seed)
                what = f"{results_name(dataset)} {METHODS[method].label} {k}-shot seed {seed}"
                if _finished(folder, lab, k, seed, _expected(lab, method, cfg, solver, lora_settings)):
                    reused.append((method, k, seed))
                    write(f"fewshot: {what}: finished earlier, reused")
                    continue
                if method == "linear_probe":
                    m = run_probe(lab, dataset, cfg, shots=k, solver=solver)
                else:
                    m = run_lora(lab, dataset, cfg, lora_settings, shots=k)
                trained.append((method, k, seed))
                write(f"fewshot: {what}: top-1 {m['top1']:.2%}")
    line = zeroshot_line(lab, dataset)
    rows, summary, files = write_fewshot_report(lab.results_dir, dataset, line)
    return FewshotResult(rows, summary, trained, reused, files)


def write_fewshot_report(results_dir: str | Path, dataset: str, zeroshot_run: Mapping | None = None,
                         ) -> tuple[list[dict], list[dict], list[Path]]:
    """fewshot.csv, fewshot_summary.csv and the figure of a dataset, from its saved few-shot runs.

    Args:
        results_dir: the results root.
        dataset: a dataset name or its results folder's name.
        zeroshot_run: the zero-shot metrics for the figure's line (None: the saved `auto` run,
            else the baseline `report` uses, else no line).

    Returns:
        `(rows, summary, written files)`; no files when no few-shot run is saved.
    """
    rows = fewshot.saved_runs(results_dir, dataset)
    if not rows:
        return [], [], []
    for message in fewshot.mixed_settings(fewshot.saved_metrics(results_dir, dataset)):
        warnings.warn(f"{results_name(dataset)}: {message}", stacklevel=2)
    summary = fewshot.aggregate(rows)
    folder = Path(results_dir) / results_name(dataset)
    files = [write_csv(folder / CSV_FILE, fewshot.ROW_COLUMNS, [[r.get(c) for c in fewshot.ROW_COLUMNS] for r in rows]),
             write_csv(folder / SUMMARY_FILE, fewshot.SUMMARY_COLUMNS,
                       [[r.get(c) for c in fewshot.SUMMARY_COLUMNS] for r in summary])]
    if zeroshot_run is None:
        saved = zeroshot.saved_results(results_dir, model=rows[0].get("model")).get(results_name(dataset), {})
        name = zeroshot.headline(saved) if saved else None
        zeroshot_run = saved[name] | {"prompt_set": name} if name else None
    figures_dir(results_dir)
    path = figure_path(results_dir, dataset)
    plot_fewshot(summary, zeroshot_run, f"{results_name(dataset)}: few-shot test top-1 (mean ± std over seeds)", path)
    return rows, summary, [*files, path]


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
    for k, (name, m) in enumerate(METHODS.items()):
        runs = sorted((r for r in summary if r["method"] == name), key=lambda r: r["shots"])
        if not runs:
            continue
        xs, mean = [r["shots"] for r in runs], [100 * r["top1"] for r in runs]
        std = [100 * (r["top1_std"] or 0.0) for r in runs]
        seeds = sorted({r["seeds"] for r in runs})
        label = f"{m.label} ({'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''})"
        ax.plot(xs, mean, "o-", color=f"C{k}", label=label)
        if any(r["seeds"] > 1 for r in runs):
            ax.fill_between(xs, [a - b for a, b in zip(mean, std, strict=True)],
                            [a + b for a, b in zip(mean, std, strict=True)], color=f"C{k}", alpha=0.2, lw=0)
    if zeroshot_run is not None:
        chosen = f": {zeroshot_run['selected_set']}" if zeroshot_run.get("selected_set") else ""
        ax.axhline(100 * zeroshot_run["top1"], color="C0", ls="--", lw=1.2,
                   label=f"zero-shot ({zeroshot_run.get('prompt_set', '')}{chosen})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(every, [str(k) for k in every])
    ax.minorticks_off()
    ax.set(xlabel="training images per class (shots)", ylabel="test top-1 %", title=title)
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
    table["method"] = table["method"].map(lambda name: METHODS[name].label)
    return table.round(2)
