"""A torchvision dataset class as a registry entry: its folder, its splits, its errors.

    source = Source(title="Oxford-IIIT Pets", folder="oxford-iiit-pet", expects="images/, annotations/",
                    read=_read_pets, splits=carved_val("trainval"), url="https://www.robots.ox.ac.uk/")
    PETS = declare(source, name="pets", curate=curated_pets, domain="a type of pet")

A `Source` says where torchvision finds a dataset under the data root, what must be there,
how to read one of torchvision's splits (`read`: the only code that touches torchvision's
private attributes) and how our train/val/test come from torchvision's splits: the official
ones where the dataset has them, else a stratified, seeded part (`carve`). `declare` turns
it into the `data.images.DatasetSpec` the registry holds, with the same messages for every
dataset: a missing dataset names its folder and how to get it, a partial one says what is
missing, and a download first probes the server so an offline machine fails in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from clip_utils.data.classnames import check_naming
from clip_utils.data.images import (
    SPLITS,
    DatasetNotFoundError,
    DatasetSpec,
    Samples,
    require_network,
    stratified_split,
)

# The seed of every carved split: the same split on every call, machine and run.
CARVE_SEED = 0
# CoOp's shares: val is 20% of the training images where a dataset has no official val;
# a dataset without any official split is cut 50/20/30 into train/val/test. The shares, not
# CoOp's split files (split_zhou_*.json): which images fall where differs from CoOp's.
VAL_CARVE = (0.8, 0.2)
FULL_CARVE = (0.5, 0.2, 0.3)

Part = tuple[str | None, int | None]


@dataclass(frozen=True)
class SplitPlan:
    """Where each of our splits comes from: `(torchvision's split, part)`.

    Part None is torchvision's split as it is; an int is that part of the dataset's `carve`
    cut from it. Torchvision's split None: a dataset without splits (the whole of it).
    """

    train: Part
    val: Part
    test: Part

    def of(self, split: str) -> Part:
        """The source of `split` (`train`, `val` or `test`)."""
        return getattr(self, split)


OFFICIAL = SplitPlan(*((split, None) for split in SPLITS))
UNSPLIT = SplitPlan(*((None, part) for part in range(len(SPLITS))))


def carved_val(train: str) -> SplitPlan:
    """Official test; train and val a stratified, seeded 80/20 cut of torchvision's `train`.

    Args:
        train: torchvision's name of the official training split (`train`, `trainval`).
    """
    return SplitPlan(train=(train, 0), val=(train, 1), test=("test", None))


@dataclass(frozen=True)
class Source:
    """Where torchvision finds one dataset, how to read it and how its splits are made.

    Attributes:
        title: its name in prose, for messages.
        folder: its folder under the data root, as torchvision expects it.
        expects: what must be in `folder`, in words (the not-found message says it).
        read: `(root, torchvision split or None, download) -> (samples, original class names
            in label order)`, through the torchvision class.
        splits: how train, val and test come from torchvision's splits (`OFFICIAL`, `UNSPLIT`,
            `carved_val(...)`).
        carve: the shares of the carved parts, in part order.
        url: an address on the download server (probed before downloading); empty: the
            dataset cannot be downloaded.
        present: the path under the data root that holds it once downloaded (so a download
            is tried only without it); default `folder`.
        manual: how to get it by hand, for a dataset without `url`.
        size: the download's size in words, for messages (`about 5 GB`).
        classes: `root -> original class names`, where that is cheaper than `read` (which
            lists every sample); None: `read` of the training split.
    """

    title: str
    folder: str
    expects: str
    read: Callable[[Path, str | None, bool], tuple[Samples, list[str]]]
    splits: SplitPlan = OFFICIAL
    carve: tuple[float, ...] = VAL_CARVE
    url: str = ""
    present: str = ""
    manual: str = ""
    size: str = ""
    classes: Callable[[Path], list[str]] | None = None


def _how(source: Source, name: str, folder: Path) -> str:
    if not source.url:
        return source.manual.format(folder=folder)
    size = f" ({source.size})" if source.size else ""
    return (f"Any command downloads it{size} unless given --no-download (e.g. `python -m clip_utils zeroshot "
            f"--dataset {name}`), as does load_dataset(..., download=True); for an offline try-out of the "
            f"pipeline use `make demo`.")


def _not_found(source: Source, name: str, root: Path) -> str:
    folder = root / source.folder
    return f"{source.title} not found in {folder} (expected {source.expects} there). {_how(source, name, folder)}"


def _open(source: Source, name: str, root: Path, split: str | None, download: bool) -> tuple[Samples, list[str]]:
    """`source.read`, with torchvision's and the network's failures as `DatasetNotFoundError`s."""
    folder = root / source.folder
    download = download and bool(source.url)  # torchvision refuses to download what has no source
    if download and not (root / (source.present or source.folder)).exists():
        require_network(source.url, source.title, folder)
    try:
        return source.read(root, split, download)
    except RuntimeError as err:  # torchvision: "Dataset not found" (or a corrupt download)
        raise DatasetNotFoundError(_not_found(source, name, root)) from err
    except FileNotFoundError as err:  # the folder is there, a file torchvision reads is not
        missing = err.filename or err
        redo = (f"remove {folder} and run again to download it afresh" if source.url
                else "put the missing files there by hand")
        raise DatasetNotFoundError(
            f"{source.title} in {folder} is incomplete: {missing} is missing (expected {source.expects}); "
            f"{redo}.") from err
    except OSError as err:  # network failure mid-download
        if not download:
            raise
        raise DatasetNotFoundError(
            f"could not download {source.title} into {folder}: {err}. {_how(source, name, folder)}") from err


def load_split(source: Source, name: str, root: Path, split: str, download: bool) -> tuple[Samples, list[str]]:
    """One of our splits of `source`: `(samples, original class names in label order)`.

    Args:
        source: the dataset's source.
        name: its registry name (for messages).
        root: the data root.
        split: `train`, `val` or `test`.
        download: fetch the dataset when it is missing (where it can be downloaded).
    """
    tv_split, part = source.splits.of(split)
    samples, classes = _open(source, name, root, tv_split, download)
    if part is None:
        return samples, classes
    parts = stratified_split([label for _, label in samples], source.carve, CARVE_SEED)
    return [samples[i] for i in parts[part]], classes


def source_names(source: Source, name: str, curate: Callable[[list[str]], list[str]], root: Path,
                 naming: str) -> list[str]:
    """Class names in label order from the dataset's metadata (no image is decoded).

    Args:
        source: the dataset's source.
        name: its registry name (for messages).
        curate: original names -> curated names (the names prompts use).
        root: the data root.
        naming: `curated` or `original`.

    Raises:
        DatasetNotFoundError: the dataset is not on disk (its names come from its own files).
    """
    curated = check_naming(naming) == "curated"
    if not (root / (source.present or source.folder)).exists():
        raise DatasetNotFoundError(f"the class names of {source.title} are read from its own files, which are "
                                   f"not on disk: {_not_found(source, name, root)}")
    try:
        original = (source.classes(root) if source.classes
                    else _open(source, name, root, source.splits.train[0], download=False)[1])
    except FileNotFoundError as err:  # `classes` reads without `_open`'s translation
        raise DatasetNotFoundError(f"{source.title} in {root / source.folder} is incomplete: {err}") from err
    return curate(original) if curated else original


def _same(names: list[str]) -> list[str]:
    return names


def declare(source: Source, name: str, curate: Callable[[list[str]], list[str]] = _same,
            names: Callable[[Path, str], list[str]] | None = None, **fields: Any) -> DatasetSpec:
    """The registry's declaration of a torchvision dataset.

    Args:
        source: where and how torchvision reads it.
        name: its registry name (`--dataset`).
        curate: original names -> the names prompts use (default: the same).
        names: `(root, naming) -> class names` replacing `source_names` (for a dataset whose
            names ship with the package).
        fields: the rest of `DatasetSpec` (`domain`, `clip_templates`, `splits`, ...).
    """
    return DatasetSpec(name=name, title=source.title, load=partial(load_split, source, name),
                       names=names or partial(source_names, source, name, curate), downloadable=bool(source.url),
                       **fields)
