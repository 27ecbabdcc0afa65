"""The few-shot protocol: K images per class, drawn per class with a seed, and where such runs live.

    sample = draw(train.samples, val.samples, shots=4, seed=1)   # 4 train and 4 val images per class
    sample.train, sample.val                                     # indices into the two splits
    run_dir("results", "flowers102", "lora", shots=4, seed=1)    # results/flowers102/lora/shots_4/seed_1
    rows = saved_runs("results", "flowers102")                   # one row per method, shots and seed
    table = aggregate(rows)                                      # mean and std over the seeds

CoOp's protocol, which Tip-Adapter and CLIP-LoRA follow: K training images per class from
the training split, validation on min(K, 4) per class from the validation split, results
averaged over seeds (1, 2, 3). Each class draws from its own generator, seeded by the run's
seed and the class, as a random permutation of its images of which the run takes the first
K: the same seed always draws the same sample, another seed another one, and a seed's
2-shot sample holds its 1-shot sample (shots differ by the images added, not by a new
draw). A K that some class cannot fill is refused (`check_enough`): a K-shot run has K images
in every class.

A run without shots trains on every image, in the method's own folder
(`results/<dataset>/<method>/`); a few-shot run in `<method>/shots_<K>/seed_<S>/`, so it never
overwrites a full-data run, with the exact sample it used in `samples.json`.
"""

from __future__ import annotations

import hashlib
import math
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clip_utils import registry
from clip_utils.config import FEWSHOT_VAL_SHOTS
from clip_utils.data import Dataset
from clip_utils.data.images import Samples
from clip_utils.errors import InvalidValue
from clip_utils.results.layout import method_dir, readable_metrics, recorded_folder
from clip_utils.runtime.files import read_json, write_json

SAMPLES_FILE = "samples.json"
RUN_FOLDER = re.compile(r"shots_(\d+)/seed_(-?\d+)$")
# What one row of fewshot.csv holds, and which of them `aggregate` averages.
ROW_COLUMNS = ("dataset", "method", "shots", "seed", "top1", "top5", "mean_per_class", "n_train", "n_val",
               "head_init", "solver", "train_seconds", "model")
AVERAGED = ("top1", "top5", "mean_per_class", "train_seconds")
SUMMARY_COLUMNS = ("dataset", "method", "shots", "seeds", "top1", "top1_std", "top5", "top5_std",
                   "mean_per_class", "mean_per_class_std", "train_seconds", "model")


def check_shots(shots: int | None) -> None:
    """Raise `ValueError` unless `shots` is None (all images) or a positive whole number."""
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
        raise InvalidValue(f"shots must be a positive whole number of images per class (or None for all), got {shots!r}")


def val_shots(shots: int) -> int:
    """Validation images per class of a K-shot run: min(K, 4), as CoOp."""
    return min(shots, FEWSHOT_VAL_SHOTS)


def _class_generator(seed: int, label: int, split: str) -> np.random.Generator:
    # A hash, so each (seed, class, split) has its own stream and neighbouring seeds never share one.
    digest = hashlib.sha256(f"fewshot:{seed}:{split}:{label}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def sample_per_class(samples: Samples, shots: int, seed: int, split: str = "train") -> list[int]:
    """Indices of `shots` samples per class (all of a class's when it has fewer), drawn per class with `seed`.

    Args:
        samples: `(path, label)` pairs of one split (`ImageListDataset.samples`).
        shots: images per class.
        seed: the draw's seed.
        split: the split's name, so train and val draws are independent streams.

    Returns:
        Sorted indices into `samples`.
    """
    check_shots(shots)
    by_class: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(samples):
        by_class.setdefault(int(label), []).append(index)
    picked: list[int] = []
    for label, indices in by_class.items():
        order = _class_generator(seed, label, split).permutation(len(indices))
        picked += [indices[i] for i in order[:shots]]
    return sorted(picked)


@dataclass(frozen=True)
class Sample:
    """A few-shot run's images: indices into the train and val splits."""

    shots: int
    seed: int
    train: list[int]
    val: list[int]


def smallest_class(train: Samples) -> int:
    """How many training images the smallest class has: the largest K a K-shot run can take."""
    return min(Counter(int(label) for _, label in train).values())


def check_enough(train: Samples, shots: int) -> None:
    """Refuse a K-shot run that some class cannot fill: K images per class means K, never fewer.

    Raises:
        InvalidValue: a class has fewer than `shots` training images (the message says how many
            the smallest class has).
    """
    counts = Counter(int(label) for _, label in train)
    short = sorted((n, label) for label, n in counts.items() if n < shots)
    if short:
        n, label = short[0]
        raise InvalidValue(f"--shots {shots} needs {shots} training images in every class, but {len(short)} of "
                           f"{len(counts)} classes have fewer (class {label} has {n}): use --shots {n} or less, or a "
                           f"split with more training images per class (--split coop, Zhou et al.'s, where the "
                           f"dataset has one)")


def draw(train: Samples, val: Samples, shots: int, seed: int) -> Sample:
    """The K-shot sample of a seed: `shots` per class from train, min(shots, 4) per class from val.

    Args:
        train: the training split's samples (every class must have `shots` of them).
        val: the validation split's samples (a class with fewer than min(shots, 4) gives all it has).
        shots: training images per class.
        seed: the draw's seed.

    Raises:
        InvalidValue: a class has fewer than `shots` training images.
    """
    check_enough(train, shots)
    return Sample(shots, seed, sample_per_class(train, shots, seed, "train"),
                  sample_per_class(val, val_shots(shots), seed, "val"))


def run_dir(results_dir: str | Path, dataset: Dataset | str, method: str, shots: int | None = None,
            seed: int | None = None) -> Path:
    """The results folder of one run: the method's folder, or `shots_<K>/seed_<S>/` inside it.

    Args:
        results_dir: the results root.
        dataset: the resolved dataset, or its results folder's name.
        method: `linear_probe` (or `probe`) or `lora`.
        shots: images per class (None: all, the method's own folder).
        seed: the run's seed (needed with `shots`).
    """
    check_shots(shots)
    folder = method_dir(results_dir, dataset, method)
    if shots is None:
        return folder
    if seed is None:
        raise ValueError("a few-shot run's folder needs its seed")
    return folder / f"shots_{shots}" / f"seed_{seed}"


def write_samples(folder: Path, sample: Sample, train: Samples, val: Samples) -> Path:
    """Write `samples.json`: the run's shots, seed and the exact train and val files with labels.

    Args:
        folder: the run's folder.
        sample: the drawn indices.
        train: the training split's samples (what `sample.train` indexes).
        val: the validation split's samples.
    """
    def listed(samples: Samples, indices: Sequence[int]) -> list[dict]:
        return [{"path": str(samples[i][0]), "label": int(samples[i][1])} for i in indices]

    return write_json(folder / SAMPLES_FILE, {"shots": sample.shots, "seed": sample.seed,
                                              "val_shots": val_shots(sample.shots),
                                              "train": listed(train, sample.train), "val": listed(val, sample.val)})


def read_samples(folder: str | Path) -> dict:
    """A run's `samples.json` (`shots`, `seed`, `train` and `val`: lists of `{"path", "label"}`)."""
    return read_json(Path(folder) / SAMPLES_FILE)


def sample_digest(paths: Sequence[str]) -> str:
    """A short hash of a sample's files, for resume fingerprints (another sample: no resume)."""
    return hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- saved runs


def saved_metrics(results_dir: str | Path, dataset: Dataset | str, methods: Sequence[str] | None = None) -> list[dict]:
    """The metrics.json of every finished few-shot run of a dataset, by method, shots and seed.

    Args:
        results_dir: the results root.
        dataset: the resolved dataset, or its results folder's name.
        methods: only these methods (None: every trained one).

    Returns:
        Each run's metrics, with `method`, `shots` and `seed` as its folder says.
    """
    out = []
    names = [registry.get(m).name for m in methods] if methods else [m.name for m in registry.trained()]
    for name in names:
        base = method_dir(results_dir, dataset, name)
        for file in base.glob("shots_*/seed_*/metrics.json"):
            match = RUN_FOLDER.search(file.parent.relative_to(base).as_posix())
            if match is not None:
                metrics = readable_metrics(file)
                if metrics is not None:
                    out.append(metrics | {"method": name, "shots": int(match[1]), "seed": int(match[2])})
    order = {m.name: i for i, m in enumerate(registry.methods())}
    return sorted(out, key=lambda m: (order[m["method"]], m["shots"], m["seed"]))


def saved_runs(results_dir: str | Path, dataset: Dataset | str, methods: Sequence[str] | None = None) -> list[dict]:
    """One row per finished few-shot run of a dataset (`ROW_COLUMNS`), by method, shots and seed.

    Args:
        results_dir: the results root.
        dataset: the resolved dataset, or its results folder's name.
        methods: only these methods (None: every trained one).
    """
    return [{k: m.get(k) for k in ROW_COLUMNS} | {"dataset": recorded_folder(m, dataset)}
            for m in saved_metrics(results_dir, dataset, methods)]


def _std(values: Sequence[float]) -> float | None:
    # The sample standard deviation over seeds, as the few-shot papers report it; None for one seed.
    return statistics.stdev(values) if len(values) > 1 else None


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """Mean and standard deviation over seeds, one row per dataset, method, shots and model (`SUMMARY_COLUMNS`).

    Args:
        rows: `saved_runs` rows (or any with the same keys).
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:  # another model is another experiment, never averaged in
        groups.setdefault((r["dataset"], r["method"], r["shots"], r.get("model")), []).append(r)
    out = []
    for (dataset, method, shots, model), runs in groups.items():
        entry = {"dataset": dataset, "method": method, "shots": shots, "seeds": len(runs), "model": model}
        for key in AVERAGED:
            values = [r[key] for r in runs if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            entry[key] = statistics.fmean(values) if values else None
            if key != "train_seconds":
                entry[f"{key}_std"] = _std(values)
        out.append(entry)
    return out


def mixed_settings(metrics: Sequence[dict]) -> list[str]:
    """What the seeds of one method and shot count disagree on besides the seed (the model,
    the solver, any training setting): a mean over them would mix different experiments.

    Args:
        metrics: `saved_metrics` entries.

    Returns:
        One message per method and shots whose runs differ; none when every group agrees.
    """
    groups: dict[tuple, list[dict]] = {}
    for m in metrics:
        groups.setdefault((m["method"], m["shots"]), []).append(m)
    messages = []
    for (method, shots), runs in groups.items():
        settings = [_settings(m) for m in runs]
        differ = sorted({k for s in settings for k in s if any(t.get(k) != s.get(k) for t in settings)})
        if differ:
            seeds = ", ".join(str(m["seed"]) for m in runs)
            messages.append(f"the {registry.get(method).label} {shots}-shot runs (seeds {seeds}) differ in "
                            f"{', '.join(differ)}, so their mean over seeds mixes them: train them alike, "
                            f"or keep each setting in its own --results-dir")
    return messages


def _settings(metrics: dict) -> dict:
    # The L-BFGS probe uses none of the training loop's settings (its `epochs` counts the C
    # values it tried, which differs from seed to seed): its model and solver are its settings.
    # the split file too: a run on another version of it saw other images
    own = {"model": metrics.get("model"), "solver": metrics.get("solver"), "split_sha256": metrics.get("split_sha256")}
    if metrics.get("solver") == "lbfgs":
        return own
    return own | {k: v for k, v in (metrics.get("config") or {}).items() if k != "seed"}
