"""The results folder's layout: where each dataset's and method's results live.

    results/<dataset>/zeroshot/<prompt_set>/metrics.json, predictions.csv
    results/<dataset>/linear_probe/...      results/<dataset>/lora/...
    results/summary.csv, results/figures/*.png

Writing is `runtime.files` (atomic); this module only says where.
"""

from __future__ import annotations

from pathlib import Path

from clip_utils import registry
from clip_utils.data import canonical_name, results_name
from clip_utils.data.imagefolder import PREFIX
from clip_utils.errors import Refused
from clip_utils.runtime.files import read_json


def method_dir(results_dir: str | Path, dataset: str, method: str, prompt_set: str | None = None) -> Path:
    """The folder of one method's results for one dataset.

    Args:
        results_dir: the results root.
        dataset: a registered dataset or `imagefolder:PATH` (its folder is `data.results_name`).
        method: a registered method (name, command or alias).
        prompt_set: the prompt set (zero-shot only).
    """
    m = registry.get(method)
    folder = Path(results_dir) / results_name(dataset) / m.folder
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


def check_results_folder(results_dir: str | Path, name: str) -> None:
    """Refuse an image folder whose results folder holds another image folder's results.

    Image folders are filed under their own folder name (`data.results_name`), so `v1/mushrooms`
    and `v2/mushrooms` would share `results/mushrooms/` and overwrite or mix each other's
    runs; registered datasets have names of their own.

    Args:
        results_dir: the results root.
        name: a registered name or `imagefolder:PATH`.

    Raises:
        ValueError: the folder's saved results are another image folder's (the message says what to do).
    """
    if not name.startswith(PREFIX):
        return
    folder = Path(results_dir) / results_name(name)
    saved = next(folder.rglob("metrics.json"), None) if folder.is_dir() else None
    if saved is None:
        return
    try:
        owner = read_json(saved).get("dataset")
    except (OSError, ValueError, AttributeError):
        return  # an unreadable file is reported where it is read
    if isinstance(owner, str) and owner.startswith(PREFIX) and owner != canonical_name(name):
        raise Refused(f"{folder} holds the results of {owner}, another folder with the same name as "
                         f"{canonical_name(name)}: use another --results-dir, or rename one of the folders")
