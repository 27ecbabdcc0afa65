"""Datasets: every registered benchmark and your own folders, resolved once into a `Dataset`.

    from clip_utils.data import load_dataset, resolve
    ds = load_dataset("flowers102", "data", "test", download=True)
    ds = load_dataset("imagefolder:~/mushrooms", "data", "train")    # your own images
    image, label = ds[0]; print(ds.classes[label])
    flowers = resolve("flowers102", "data", split="coop")             # what every stage takes

`DATASETS` is the registry: one `data.images.DatasetSpec` per dataset (how to load its splits,
its class names in label order, its domain phrase and prompt templates). The edges (the
CLI's `--dataset`, `CLIP_DATASETS` in the notebooks, `Lab.resolve` for the API) turn a name
from it, or `imagefolder:PATH`, into a `data.dataset.Dataset` once; a new benchmark is one
declaration and one entry in `DATASETS`. Results of a dataset go to `results/<Dataset.folder>/`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from clip_utils.config import CLASS_NAMING
from clip_utils.data.dataset import (
    DATASETS,
    Dataset,
    dataset_spec,
    resolve,
    results_name,
)
from clip_utils.data.images import (
    SPLITS,
    DatasetNotFoundError,
    DatasetSpec,
    ImageListDataset,
    UnreadableImageError,
    open_rgb,
)

__all__ = ["DATASETS", "SPLITS", "Dataset", "DatasetNotFoundError",
           "DatasetSpec", "ImageListDataset", "UnreadableImageError", "class_names", "dataset_spec", "load_dataset",
           "open_rgb", "resolve", "results_name"]


def load_dataset(
    name: str | Dataset,
    root: str | Path,
    split: str,
    transform: Callable[[Image.Image], Any] | None = None,
    download: bool = False,
) -> ImageListDataset:
    """Load a split of a registered dataset or of your own image folder.

    Args:
        name: a key of `DATASETS` (`flowers102`, `cub200`, `pets`, ...), `imagefolder:PATH`,
            or a resolved `Dataset` (Zhou et al.'s split, a class subset).
        root: dataset root folder (Flowers102 lives in `<root>/flowers-102/`, CUB in
            `<root>/CUB_200_2011/`, the other benchmarks where torchvision puts them: see
            `benchmarks`; an image folder and a resolved `Dataset` ignore it).
        split: `train`, `val` or `test`.
        transform: applied to each RGB PIL image.
        download: fetch the dataset when it is missing (checksums verified, except FGVC
            Aircraft's: torchvision has none for it; Stanford Cars cannot be fetched).

    Raises:
        InvalidValue: unknown dataset or split.
        DatasetNotFoundError: the dataset is missing and `download` is False.
    """
    return resolve(name, root).load(split, transform, download)


def class_names(name: str | Dataset, root: str | Path = "data", naming: str = CLASS_NAMING) -> list[str]:
    """Class names of a dataset in label order, from metadata only (no images, no download).

    Naming the classes of a trained head or of a photo's prediction must not require the
    whole dataset: Flowers102 names come from cat_to_name.json; CUB names from the dataset's
    own classes.txt when it is on disk, else from the official list bundled with the package;
    the other benchmarks' from their metadata files, so they must be on disk (a
    `DatasetNotFoundError` names the folder otherwise).

    Args:
        name: a registered dataset, `imagefolder:PATH` or a resolved `Dataset`.
        root: dataset root folder.
        naming: `curated` (the names prompts use: CLIP's lists, CUB's birds' proper names;
            see `classnames`) or `original` (what the dataset ships, as `.classes`).
    """
    return list(resolve(name, root).with_naming(naming).class_names)
