"""Datasets: every registered benchmark and your own folders, behind one `load_dataset`.

    from clip_utils.data import load_dataset
    ds = load_dataset("flowers102", "data", "test", download=True)
    ds = load_dataset("imagefolder:~/mushrooms", "data", "train")    # your own images
    image, label = ds[0]; print(ds.classes[label])

`DATASETS` is the registry: one `data.images.DatasetSpec` per dataset (how to load its splits,
its class names in label order, its domain phrase and prompt templates). Every stage (the
CLI's `--dataset`, `CLIP_DATASETS` in the notebooks, the feature cache, the probe, LoRA,
report, photos) takes a name from it or `imagefolder:PATH`, with nothing else to edit: a new
benchmark is one declaration and one entry here. Results of a dataset go to
`results/<results_name(dataset)>/`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from clip_utils.data.benchmarks import DTD, EUROSAT, FGVC_AIRCRAFT, FLOWERS102, FOOD101, PETS, STANFORD_CARS
from clip_utils.data.cub import CUB200
from clip_utils.data.imagefolder import PREFIX, imagefolder_spec
from clip_utils.data.images import (
    SPLITS,
    DatasetNotFoundError,
    DatasetSpec,
    ImageListDataset,
    UnreadableImageError,
    open_rgb,
)
from clip_utils.errors import InvalidValue

# The notebooks' two datasets first, then the field's other fine-grained benchmarks.
# The package's dataset types are importable from here too.
__all__ = ["DATASETS", "SPLITS", "DatasetNotFoundError", "DatasetSpec", "ImageListDataset", "UnreadableImageError",
           "canonical_name", "class_names", "dataset_spec", "load_dataset", "open_rgb", "results_name"]

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec for spec in (FLOWERS102, CUB200, PETS, FGVC_AIRCRAFT, DTD, FOOD101, EUROSAT, STANFORD_CARS)
}


def dataset_spec(name: str) -> DatasetSpec:
    """The declaration of a registered dataset or of `imagefolder:PATH`.

    Args:
        name: a key of `DATASETS`, or `imagefolder:PATH` (a folder of class folders).

    Raises:
        ValueError: an unknown name (the message lists the choices).
        DatasetNotFoundError: an image folder that is missing or malformed.
    """
    if name in DATASETS:
        return DATASETS[name]
    if name.startswith(PREFIX):
        return imagefolder_spec(name[len(PREFIX):])
    raise InvalidValue(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, or {PREFIX}PATH for "
                     f"your own folder of class folders")


def canonical_name(name: str) -> str:
    """The name results and checkpoints record: registered names as they are, an image folder
    as `imagefolder:` plus its absolute path (so `./x` and `/home/me/x` are one dataset)."""
    return dataset_spec(name).name


def results_name(name: str) -> str:
    """The dataset's results folder under `results/`: its registered name, or the image
    folder's own name (no file access: a string operation).

    Args:
        name: a registered name or `imagefolder:PATH`.
    """
    if name.startswith(PREFIX):
        return Path(name[len(PREFIX):]).expanduser().name or "imagefolder"
    return name


def load_dataset(
    name: str,
    root: str | Path,
    split: str,
    transform: Callable[[Image.Image], Any] | None = None,
    download: bool = False,
) -> ImageListDataset:
    """Load a split of a registered dataset or of your own image folder.

    Args:
        name: a key of `DATASETS` (`flowers102`, `cub200`, `pets`, ...) or `imagefolder:PATH`.
        root: dataset root folder (Flowers102 lives in `<root>/flowers-102/`, CUB in
            `<root>/CUB_200_2011/`, the other benchmarks where torchvision puts them: see
            `benchmarks`; an image folder ignores it).
        split: `train`, `val` or `test`.
        transform: applied to each RGB PIL image.
        download: fetch the dataset when it is missing (checksums verified, except FGVC
            Aircraft's: torchvision has none for it; Stanford Cars cannot be fetched).

    Raises:
        ValueError: unknown dataset or split.
        DatasetNotFoundError: the dataset is missing and `download` is False.
    """
    spec = dataset_spec(name)
    if split not in SPLITS:
        raise InvalidValue(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    samples, classes = spec.load(Path(root), split, download)
    if not samples:
        raise DatasetNotFoundError(f"the {split} split of {spec.title} is empty: check the dataset files")
    return ImageListDataset(samples, classes, transform, name=results_name(spec.name), split=split)


def class_names(name: str, root: str | Path = "data", naming: str = "curated") -> list[str]:
    """Class names of a dataset in label order, from metadata only (no images, no download).

    Naming the classes of a trained head or of a photo's prediction must not require the
    whole dataset: Flowers102 names come from cat_to_name.json; CUB names from the dataset's
    own classes.txt when it is on disk, else from the official list bundled with the package;
    the other benchmarks' from their metadata files, so they must be on disk (a
    `DatasetNotFoundError` names the folder otherwise).

    Args:
        name: a registered dataset or `imagefolder:PATH`.
        root: dataset root folder.
        naming: `curated` (the names prompts use: CLIP's lists, CUB's birds' proper names;
            see `classnames`) or `original` (what the dataset ships, as `.classes`).
    """
    return dataset_spec(name).names(Path(root), naming)
