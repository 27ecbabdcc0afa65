"""The results folder's layout: where each dataset's and method's results live.

    results/<dataset folder>/zeroshot/<prompt_set>/metrics.json, predictions.csv
    results/<dataset folder>/linear_probe/...      results/<dataset folder>/lora/...
    results/summary.csv, results/figures/*.png

A dataset's folder is `data.Dataset.folder` (`flowers102`, `flowers102-coop`, an image
folder's own name); functions here take the resolved `Dataset`, or a folder's name as read
back from disk by the reports. Writing is `runtime.files` (atomic); this module only says where.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from clip_utils import registry
from clip_utils.data import Dataset, results_name
from clip_utils.data.imagefolder import PREFIX
from clip_utils.errors import InvalidValue, Refused
from clip_utils.runtime.files import read_json


def folder_name(dataset: Dataset | str) -> str:
    """A dataset's results folder name: a resolved dataset's `folder`, or a folder's name as is
    (as the reports read it from disk; never a dataset's name, which `Lab.resolve` takes)."""
    if isinstance(dataset, Dataset):
        return dataset.folder
    if ":" in dataset or "/" in dataset:  # a bug of ours: a name or path where a folder name belongs
        raise ValueError(f"{dataset!r} is not a results folder's name: pass the resolved Dataset")
    return dataset


def recorded_folder(metrics: dict, dataset: Dataset | str = "") -> str:
    """The results folder a run's metrics.json names (`dataset_folder`; for files that predate
    it, the recorded dataset name's folder), else `dataset`'s."""
    if isinstance(metrics.get("dataset_folder"), str):
        return metrics["dataset_folder"]
    if isinstance(metrics.get("dataset"), str):
        return results_name(metrics["dataset"])
    return folder_name(dataset)


def method_dir(results_dir: str | Path, dataset: Dataset | str, method: str, prompt_set: str | None = None) -> Path:
    """The folder of one method's results for one dataset.

    Args:
        results_dir: the results root.
        dataset: the resolved dataset, or its results folder's name.
        method: a registered method (name, command or alias).
        prompt_set: the prompt set (zero-shot only).
    """
    m = registry.get(method)
    folder = Path(results_dir) / folder_name(dataset) / m.folder
    return folder / prompt_set if m.reference and prompt_set else folder


def dataset_folders(results_dir: str | Path) -> list[Path]:
    """The folders under `results_dir` that hold some method's results, one per dataset, sorted.

    Reports read what is there rather than a list of known datasets, so a user's own image
    folder is reported like any benchmark.

    Args:
        results_dir: the results root.
    """
    root = Path(results_dir)
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir()
                  if d.is_dir() and any((d / m.folder).is_dir() for m in registry.methods()))


def figures_dir(results_dir: str | Path) -> Path:
    """`<results>/figures`, created."""
    folder = Path(results_dir) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def check_results_folder(results_dir: str | Path, dataset: Dataset) -> None:
    """Refuse an image folder whose results folder holds another image folder's results.

    Image folders are filed under their own folder name (`Dataset.folder`), so `v1/mushrooms`
    and `v2/mushrooms` would share `results/mushrooms/` and overwrite or mix each other's
    runs; registered datasets have names of their own.

    Args:
        results_dir: the results root.
        dataset: the resolved dataset.

    Raises:
        Refused: the folder's saved results are another image folder's (the message says what to do).
    """
    if not dataset.name.startswith(PREFIX):
        return
    folder = Path(results_dir) / dataset.folder
    saved = next(folder.rglob("metrics.json"), None) if folder.is_dir() else None
    if saved is None:
        return
    try:
        owner = read_json(saved).get("dataset")
    except (OSError, ValueError, AttributeError):
        return  # an unreadable file is reported where it is read
    if isinstance(owner, str) and owner.startswith(PREFIX) and owner != dataset.name:
        raise Refused(f"{folder} holds the results of {owner}, another folder with the same name as "
                      f"{dataset.name}: use another --results-dir, or rename one of the folders")


# What every metrics.json holds (DESIGN.md, Results), and the type each must have.
METRICS_FIELDS: dict[str, type | tuple[type, ...]] = {
    "dataset": str, "method": str, "model": str, "n": int, "top1": (int, float), "top5": (int, float),
    "mean_per_class": (int, float),
}


def read_metrics(path: str | Path) -> dict:
    """A run's metrics.json, checked for the fields and types every reader relies on.

    Args:
        path: the file.

    Raises:
        InvalidValue: not JSON, or JSON of another shape (a list, a string `top1`, a
            missing field); the message names the file and the way out.
    """
    metrics = read_json(path)
    problem = None
    if not isinstance(metrics, dict):
        problem = f"a JSON {type(metrics).__name__}, not an object"
    else:
        missing = [k for k in METRICS_FIELDS if k not in metrics]
        wrong = [k for k, t in METRICS_FIELDS.items() if k in metrics and
                 (not isinstance(metrics[k], t) or isinstance(metrics[k], bool))]
        if missing or wrong:
            problem = "; ".join(filter(None, (f"no {', '.join(missing)}" if missing else "",
                                              f"{', '.join(wrong)} of the wrong type" if wrong else "")))
    if problem:
        raise InvalidValue(f"{path} is not a clip-lab metrics file ({problem}): delete it, or rerun that run")
    return metrics


def readable_metrics(path: str | Path) -> dict | None:
    """`read_metrics`, or None with one `warning:` line naming the file when it cannot be used:
    readers of many runs (report, tables) skip a damaged one and go on with the rest."""
    try:
        return read_metrics(path)
    except InvalidValue as err:
        warnings.warn(str(err), stacklevel=2)
        return None
