"""The base-to-new protocol: fit on the first half of the classes, test on both halves.

    result = run_base2new(lab, "flowers102", ["coop", "clip_adapter", "tip_adapter"], shots=16, seeds=(1, 2, 3))
    result.summary, result.figure                 # mean ± std per method, HM; the png
    python -m clip_utils base2new --dataset flowers102 --split coop --methods coop,clip-adapter --shots 16

CoCoOp's protocol (Zhou et al., CVPR 2022), as MaPLe, KgCoOp, PromptSRC and CLIP-LoRA report
it: a dataset's classes in label order are cut in two (`results.base2new.halves`: base = the
first ceil(n/2), new = the rest, each relabelled from 0). Every method fits on base classes
only (K shots per base class, validation from base classes: a K-shot run of the `base`
class subset, in `results/<dataset>-base/`), and is scored

- base: on the base test images among the base classes (its run's own test score);
- new: on the new test images among the new classes, as it declares
  (`registry.Method.new_classes`): by its own classifier for the new names (`score_new`:
  CoOp's learned context before the new names, CLIP-Adapter's adapted feature against the
  new classes' text classifier), by the zero-shot classifier of its prompt set for methods
  that hold class-specific parts (marked `zero-shot` in the table: the number is
  zero-shot's), or not at all (`n/a`: a linear probe cannot name classes it never saw).

Zero-shot is the reference row, with one fixed prompt set (`config.BASE2NEW_ZEROSHOT_SET`,
`domain`) on both halves, as CoCoOp's CLIP row uses one hand-written template: choosing among
sets on all base validation images would tune it on more labels than the K-shot methods see.
Nothing here selects on a test split, and a new class's image or name is never seen before
it is scored.

Writes `results/<dataset folder>/base2new.csv` (mean ± std over seeds, HM of the means as
CoCoOp), `base2new_runs.csv` (one row per method and seed) and
`results/figures/<dataset folder>_base2new.png`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clip_utils import config, prompts, registry
from clip_utils.app.sweep import check_methods, default_args, fit_run
from clip_utils.data import Dataset
from clip_utils.errors import InvalidValue
from clip_utils.figures.base2new import plot_base2new
from clip_utils.lab import Lab
from clip_utils.registry import Method
from clip_utils.results import base2new as table
from clip_utils.results import fewshot
from clip_utils.results.layout import figures_dir
from clip_utils.runtime.files import write_csv
from clip_utils.runtime.progress import write

CSV_FILE = "base2new.csv"
RUNS_FILE = "base2new_runs.csv"
RUN_COLUMNS = ("method", "label", "seed", "shots", "base", "new", "new_source")
BASE, NEW = "base", "new"


@dataclass
class Base2NewResult:
    """What `run_base2new` did and wrote.

    Attributes:
        runs: one `results.base2new.Run` per method and seed (zero-shot: one).
        summary: one row per method (`results.base2new.CSV_COLUMNS`).
        prompt_set: the zero-shot row's prompt set (`config.BASE2NEW_ZEROSHOT_SET`).
        files: base2new_runs.csv, base2new.csv and the figure.
    """

    runs: list[table.Run]
    summary: list[dict]
    prompt_set: str
    files: list[Path]

    @property
    def figure(self) -> Path:
        return self.files[-1]


def class_halves(dataset: Dataset) -> tuple[Dataset, Dataset]:
    """The base and new class subsets of a dataset (CoCoOp's cut, `results.base2new.halves`).

    Raises:
        InvalidValue: the dataset is already a class subset, or has fewer than 2 classes.
    """
    if dataset.classes is not None:
        raise InvalidValue(f"{dataset.folder} is already a class subset: give base2new the whole dataset")
    base, new = table.halves(len(dataset.class_names))
    return dataset.subset(base, BASE), dataset.subset(new, NEW)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in % (note: one CPU-GPU sync, once per scored split)."""
    return 100.0 * (logits.argmax(dim=1).cpu() == labels.cpu()).double().mean().item()


def zeroshot_top1(lab: Lab, dataset: Dataset, prompt_set: str) -> float:
    """Zero-shot top-1 % of a class set's test images among its classes, under a prompt set."""
    test = lab.features(dataset, "test")
    text = lab.text_classifier(dataset, prompt_set)
    logits = prompts.zeroshot_logits(test.embeddings.to(text.device), text, lab.logit_scale, lab.logit_bias)
    return top1(logits, test.labels)


def can_score(method: Method) -> bool:
    """Whether base2new can score the method's new classes: it does not declare that it names
    them, or it also says how (`score_new`)."""
    return not (method.new_classes == "text" and method.score_new is None)


def check_can_score(methods: Sequence[Method]) -> None:
    """Refuse a method that declares it names new classes but has no way to score them here."""
    missing = [m.label for m in methods if not can_score(m)]
    if missing:
        raise InvalidValue(f"base2new cannot score new classes with {', '.join(missing)} yet (declared able to name "
                           f"them, but no score_new): leave it out of --methods")


def new_top1(lab: Lab, method: Method, base: Dataset, new: Dataset, run: Mapping[str, Any], shots: int,
             seed: int) -> float | None:
    """A finished base run's top-1 % on the new classes, as the method declares it can score them.

    Args:
        lab: the run context.
        method: the registered method.
        base: the class set it was fitted on.
        new: the new classes.
        run: the base run's metrics.json content.
        shots: its images per class.
        seed: its seed.

    Returns:
        The new accuracy; None for a method that cannot name new classes.
    """
    if method.new_classes == "closed":
        return None
    if method.new_classes == "fallback":  # its class-specific parts have no row for a new class
        return zeroshot_top1(lab, new, run.get("prompt_set") or config.PHOTO_PROMPT_SET)
    logits = method.score_new(lab, base, new, shots=shots, seed=seed, run=run)
    return top1(logits, lab.features(new, "test").labels)


def run_base2new(lab: Lab, dataset: Dataset | str, methods: Sequence[str], shots: int = 16,
                 seeds: Sequence[int] = config.FEWSHOT_SEEDS, *, args: argparse.Namespace | None = None
                 ) -> Base2NewResult:
    """Fit each method on the base classes (K shots per seed), score base and new, write the table.

    Args:
        lab: the run context.
        dataset: the whole dataset (a name is resolved by the lab: this is an entry point).
        methods: registered methods that fit (names, commands or aliases); zero-shot, the
            reference row, is always included.
        shots: training images per base class.
        seeds: one K-shot sample of the base classes each (every method fits on the same one).
        args: the `base2new` command line, read by each method's `settings` (None: defaults).

    Returns:
        A `Base2NewResult`.

    Raises:
        InvalidValue: no method that fits, one that cannot score new classes here, or a K some
            base class cannot fill.
    """
    dataset = lab.resolve(dataset)
    order = check_methods(methods)
    check_can_score(order)
    fewshot.check_shots(shots)
    base, new = class_halves(dataset)
    try:  # before any run: a K some base class cannot fill is refused, not found out half-way
        fewshot.check_enough(lab.dataset(base, "train").samples, shots)
    except InvalidValue as err:
        raise InvalidValue(f"{base.folder}: {err}") from None
    reference, chosen = registry.reference(), config.BASE2NEW_ZEROSHOT_SET
    runs = [table.Run(reference.name, reference.label, 0, None, zeroshot_top1(lab, base, chosen),
                      zeroshot_top1(lab, new, chosen), table.SOURCE_OF[reference.new_classes])]
    write(f"base2new: {dataset.folder} {reference.label} ({chosen}): base {runs[0].base:.1f}, new {runs[0].new:.1f}")
    for m in order:
        settings = m.settings(args or default_args())
        for seed in dict.fromkeys(seeds):
            metrics, reused = fit_run(lab, base, m, settings, shots, seed)
            run = table.run(m.name, seed=seed, shots=shots, base=100.0 * metrics["top1"],
                            new=new_top1(lab, m, base, new, metrics, shots, seed))
            runs.append(run)
            new_text = "n/a" if run.new is None else f"{run.new:.1f} ({run.new_source})"
            write(f"base2new: {dataset.folder} {m.label} {shots}-shot seed {seed}"
                  f"{' (reused)' if reused else ''}: base {run.base:.1f}, new {new_text}")
    summary = table.summarise(runs)
    return Base2NewResult(runs, summary, chosen, write_base2new(lab.results_dir, dataset, runs, summary))


def write_base2new(results_dir: str | Path, dataset: Dataset, runs: Sequence[table.Run], summary: Sequence[dict],
                   ) -> list[Path]:
    """base2new_runs.csv, base2new.csv and the figure of a dataset.

    Args:
        results_dir: the results root.
        dataset: the whole dataset.
        runs: every run (`results.base2new.Run`).
        summary: `results.base2new.summarise(runs)`.
    """
    folder = Path(results_dir) / dataset.folder
    files = [write_csv(folder / RUNS_FILE, RUN_COLUMNS, [[getattr(r, c) for c in RUN_COLUMNS] for r in runs]),
             table.write_table(folder / CSV_FILE, summary)]
    return [*files, draw_base2new(results_dir, dataset.folder, summary)]


def draw_base2new(results_dir: str | Path, folder: str, summary: Sequence[Mapping]) -> Path:
    """`results/figures/<folder>_base2new.png` from the table's rows alone."""
    fitted = [r for r in summary if r.get("shots")]
    shots = sorted({int(r["shots"]) for r in fitted})
    seeds = max((int(r["seeds"]) for r in fitted), default=1)
    spread = " (mean ± std over seeds)" if seeds > 1 else " (one seed)"
    path = figures_dir(results_dir) / f"{folder}_base2new.png"
    plot_base2new(summary, f"{folder}: base-to-new, {'/'.join(map(str, shots))} shots per base class{spread}",
                  path=path)
    return path


def redraw_base2new(results_dir: str | Path, folder: str) -> list[Path]:
    """The base-to-new figure of a results folder redrawn from its base2new.csv (`report`), if any."""
    file = Path(results_dir) / folder / CSV_FILE
    return [draw_base2new(results_dir, folder, table.read_table(file))] if file.is_file() else []
