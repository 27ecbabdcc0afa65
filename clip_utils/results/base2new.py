"""The base-to-new table (CoCoOp, Zhou et al., CVPR 2022): train on half the classes, test on both halves.

    base, new = halves(102)                          # [0..50], [51..101]
    rows = [run("zeroshot", seed=1, shots=16, base=72.4, new=77.8),
            run("coop", seed=1, shots=16, base=80.1, new=66.0), ...]
    summary = summarise(rows)                        # one row per method, mean and std over seeds
    write_table("results/flowers102/base2new.csv", summary)

A dataset's classes, in label order, are cut in two as CoCoOp's `subsample_classes` cuts them:
base = the first ceil(n/2) classes, new = the rest, each half relabelled from 0. A method trains
on base classes only; its "base" accuracy is top-1 on base test images among base classes, its
"new" accuracy top-1 on new test images among new classes, and HM their harmonic mean.

How a method scores new classes (`NEW_SOURCES`, from `registry.Method.new_classes`): `own` (it
names them itself: zero-shot, CoOp, CLIP-Adapter, LoRA), `zero-shot` (it holds class-specific
parts and falls back to the zero-shot classifier on new classes, so its new accuracy is
zero-shot's under the run's own prompt set, and the table says so), `n/a` (a closed-set head, the linear probe: no new
accuracy and no HM, never a silent number).

The table follows CoCoOp: base and new are averaged over seeds (with their sample standard
deviation over seeds, as `fewshot.aggregate`), and HM is the harmonic mean of those two means,
not the mean of per-seed HMs. Accuracies are top-1 in % (0-100).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from clip_utils import registry
from clip_utils.errors import InvalidValue
from clip_utils.figures.base2new import FALLBACK, NO_NEW, OWN
from clip_utils.runtime.files import regular_file, write_csv

NEW_SOURCES = (OWN, FALLBACK, NO_NEW)
"""Where a row's new accuracy comes from: `own` (the method names new classes itself),
`zero-shot` (its fallback on new classes is the zero-shot classifier: its new accuracy is
zero-shot's), `n/a` (it cannot name classes it did not train on: no new accuracy, no HM)."""

# `registry.NewClasses` (what a method declares) -> the table's word for it.
SOURCE_OF = {"text": OWN, "fallback": FALLBACK, "closed": NO_NEW}

CSV_COLUMNS = ("method", "label", "shots", "seeds", "base", "base_std", "new", "new_std", "hm", "new_source")
_FLOATS = ("base", "base_std", "new", "new_std", "hm")


def halves(n_classes: int) -> tuple[list[int], list[int]]:
    """The base and new labels of a dataset: the first ceil(n/2) classes, then the rest (CoCoOp).

    Args:
        n_classes: the dataset's class count (at least 2: each half needs a class).

    Returns:
        `(base, new)`, labels in the dataset's order (each half relabelled from 0 when trained or tested).

    Raises:
        InvalidValue: fewer than 2 classes.
    """
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise InvalidValue(f"base-to-new needs at least 2 classes to cut in two halves, got {n_classes!r}")
    m = math.ceil(n_classes / 2)  # an odd count gives base the extra class, as CoCoOp
    return list(range(m)), list(range(m, n_classes))


def harmonic_mean(base: float, new: float) -> float:
    """HM = 2·base·new / (base + new), 0 when both are 0 (the base-to-new table's summary number).

    Args:
        base: base accuracy (%).
        new: new accuracy (%).
    """
    total = base + new
    return 0.0 if total == 0 else 2 * base * new / total


def new_source(method: str) -> str:
    """How a registered method scores new classes, in the table's words (`NEW_SOURCES`).

    Args:
        method: a registered method's name, command or alias.
    """
    return SOURCE_OF[registry.get(method).new_classes]


@dataclass(frozen=True)
class Run:
    """One base-to-new run: a method, a seed and its two accuracies.

    Attributes:
        method: registry name (`registry.Method.name`).
        label: how the table and figure name it.
        seed: the run's seed.
        shots: training images per base class (None: all).
        base: top-1 % on base test images among base classes.
        new: top-1 % on new test images among new classes; None exactly when `new_source` is `n/a`.
        new_source: one of `NEW_SOURCES`.
    """

    method: str
    label: str
    seed: int
    shots: int | None
    base: float
    new: float | None
    new_source: str

    def __post_init__(self) -> None:
        # Checked here, so a wrong row fails where it is made, not as an odd number in a table.
        if self.new_source not in NEW_SOURCES:
            raise InvalidValue(f"{self.method}: new_source must be one of {', '.join(NEW_SOURCES)}, "
                               f"got {self.new_source!r}")
        if (self.new is None) != (self.new_source == NO_NEW):
            raise InvalidValue(f"{self.method} seed {self.seed}: a new accuracy is given exactly when the method "
                               f"can name new classes (new_source {self.new_source!r}, new {self.new!r})")
        for name in ("base", "new"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 100):
                raise InvalidValue(f"{self.method} seed {self.seed}: {name} accuracy must be a top-1 % in "
                                   f"[0, 100], got {value!r}")


def run(method: str, *, seed: int, shots: int | None, base: float, new: float | None) -> Run:
    """A `Run` of a registered method, its label and new source taken from the registry.

    Args:
        method: a registered method's name, command or alias.
        seed: the run's seed.
        shots: training images per base class (None: all).
        base: top-1 % on base classes.
        new: top-1 % on new classes (None for a method that cannot name them).
    """
    entry = registry.get(method)
    return Run(entry.name, entry.label, seed, shots, base, new, SOURCE_OF[entry.new_classes])


def _as_run(row: Run | Mapping) -> Run:
    if isinstance(row, Run):
        return row
    return Run(**{f.name: row.get(f.name) for f in fields(Run)})


def _std(values: Sequence[float]) -> float | None:
    # As `fewshot.aggregate`: the sample standard deviation over seeds; None for one seed (no spread measured).
    return statistics.stdev(values) if len(values) > 1 else None


def _reference() -> str | None:
    try:
        return registry.reference().name
    except StopIteration:  # no reference registered (a test's toy registry): input order alone
        return None


def summarise(rows: Iterable[Run | Mapping]) -> list[dict]:
    """Mean and std over seeds per method (and shots): the base-to-new table, one dict per row.

    HM is CoCoOp's: the harmonic mean of the mean base and the mean new accuracy, not the mean
    of per-seed HMs (which is smaller whenever base and new vary between seeds).

    Args:
        rows: `Run`s (or mappings with its fields), any order.

    Returns:
        Dicts with `CSV_COLUMNS`, in order of first appearance, the reference method (zero-shot)
        first. `new`, `new_std` and `hm` are None for `n/a`; a std is None for a single seed.

    Raises:
        InvalidValue: a method's runs disagree on their new source, or repeat a seed.
    """
    groups: dict[tuple, list[Run]] = {}
    for r in map(_as_run, rows):  # another shot count is another experiment, never averaged in
        groups.setdefault((r.method, r.shots), []).append(r)
    reference = _reference()
    order = sorted(groups, key=lambda key: key[0] != reference)  # stable: first appearance otherwise
    out = []
    for method, shots in order:
        runs = groups[(method, shots)]
        sources = {r.new_source for r in runs}
        if len(sources) > 1:
            raise InvalidValue(f"{method}: its runs disagree on new_source ({', '.join(sorted(sources))})")
        seeds = [r.seed for r in runs]
        if len(set(seeds)) < len(seeds):  # a seed counted twice would weigh its run double
            raise InvalidValue(f"{method} ({shots} shots): a seed appears more than once ({seeds})")
        source = runs[0].new_source
        base = [float(r.base) for r in runs]
        entry = {"method": method, "label": runs[0].label, "shots": shots, "seeds": len(runs),
                 "base": statistics.fmean(base), "base_std": _std(base), "new": None, "new_std": None, "hm": None,
                 "new_source": source}
        if source != NO_NEW:
            new = [float(r.new) for r in runs]
            entry |= {"new": statistics.fmean(new), "new_std": _std(new)}
            entry["hm"] = harmonic_mean(entry["base"], entry["new"])
        out.append(entry)
    return out


def write_table(path: str | Path, summary: Sequence[Mapping]) -> Path:
    """Write the table as CSV (`CSV_COLUMNS`; None as an empty cell), atomically.

    Args:
        path: output file.
        summary: `summarise`'s rows.
    """
    return write_csv(path, CSV_COLUMNS, [["" if r.get(c) is None else r.get(c) for c in CSV_COLUMNS]
                                         for r in summary])


def read_table(path: str | Path) -> list[dict]:
    """Read a table written by `write_table`: numbers as numbers, empty cells as None.

    Args:
        path: the CSV file.

    Raises:
        InvalidValue: it lacks a column of `CSV_COLUMNS` or holds a cell that is not a number where one belongs.
    """
    with open(regular_file(path, "base-to-new table"), newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise InvalidValue(f"{path} is not a base-to-new table: no {', '.join(missing)} column")
        rows = list(reader)
    out = []
    for r in rows:
        try:
            entry = {c: r[c] for c in CSV_COLUMNS}
            entry["shots"] = int(r["shots"]) if r["shots"] else None
            entry["seeds"] = int(r["seeds"])
            entry |= {c: float(r[c]) if r[c] else None for c in _FLOATS}
        except ValueError as err:
            raise InvalidValue(f"{path}: the row of {r.get('method')!r} holds a value that is not a number "
                               f"({err})") from err
        out.append(entry)
    return out
