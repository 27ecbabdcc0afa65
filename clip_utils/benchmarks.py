"""The field's standard benchmarks, loaded through torchvision and declared for the registry.

    from clip_utils.data import load_dataset
    ds = load_dataset("flowers102", "data", "test", download=True)

Each declaration says where torchvision finds the dataset under the data root, which
splits are used (the official train/val/test where the dataset has them, as the few-shot
literature does) and the prompt templates CLIP published for it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .classnames import check_naming, curated_flowers102
from .templates import DOMAIN_ENSEMBLES
from .imagelist import DatasetNotFoundError, DatasetSpec, Samples, require_network

ASSETS = Path(__file__).resolve().parent / "assets"
# Shipped as package data, so an installed package works from any folder. The seed layout's
# top-level cat_to_name.json is kept identical to this copy (a test checks it).
CAT_TO_NAME = ASSETS / "cat_to_name.json"
FLOWERS_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"




def flowers102_class_names(path: str | Path = CAT_TO_NAME) -> list[str]:
    """Flowers102 names in label order: label k is key `str(k + 1)` of cat_to_name.json.

    Args:
        path: the cat_to_name.json file.
    """
    mapping = json.loads(Path(path).read_text())
    try:
        return [mapping[str(k + 1)] for k in range(102)]
    except KeyError as err:
        raise ValueError(f"{path} has no name for Flowers102 class id {err}") from err


def _load_flowers102(root: Path, split: str, download: bool) -> tuple[Samples, list[str]]:
    from torchvision.datasets import Flowers102

    folder = root / "flowers-102"
    how = (
        "Any command downloads it unless given --no-download (e.g. `python -m clip_utils "
        "zeroshot --dataset flowers102`), as do load_dataset(..., download=True) and `make run`; "
        "for an offline try-out use `make demo`."
    )
    if download and not (folder / "jpg").is_dir():
        require_network(FLOWERS_URL, "Flowers102", folder)
    try:
        tv = Flowers102(str(root), split=split, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise DatasetNotFoundError(
            f"Flowers102 not found or incomplete in {folder} (expected jpg/, imagelabels.mat "
            f"and setid.mat there). {how}"
        ) from err
    except OSError as err:  # network failure mid-download
        raise DatasetNotFoundError(f"could not download Flowers102 into {folder}: {err}. {how}") from err
    # torchvision keeps the parsed split in private attributes; read them once here so the
    # rest of the package depends only on ImageListDataset.
    samples = [(str(p), int(y)) for p, y in zip(tv._image_files, tv._labels, strict=True)]
    return samples, flowers102_class_names()


def flowers102_names(root: Path, naming: str) -> list[str]:
    """Flowers102 names in label order: cat_to_name.json's, or CLIP's list (`curated`)."""
    names = flowers102_class_names()
    return curated_flowers102(names) if check_naming(naming) == "curated" else names


FLOWERS102 = DatasetSpec(
    name="flowers102", title="Oxford Flowers102", load=_load_flowers102, names=flowers102_names,
    domain="a type of flower", domain_ensemble=DOMAIN_ENSEMBLES["flower"],
    clip_templates=("a photo of a {}, a type of flower.",),
    splits="official setid.mat: 1020 train, 1020 val, 6149 test",
)
