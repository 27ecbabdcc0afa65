"""Datasets: Oxford Flowers102 and CUB-200-2011, with class names in label order.

    from clip_utils.data import load_dataset
    ds = load_dataset("flowers102", "data", "test", download=True)
    image, label = ds[0]; print(ds.classes[label])

Both datasets are exposed as the same small `ImageListDataset` (a list of `(path, label)`
samples, the class names and an optional transform), so every later stage (feature
extraction, the GPU decode path, predictions.csv) can rely on `.samples` and `.classes`
whatever the source. Flowers102 is parsed and downloaded by torchvision; CUB-200-2011 has
no torchvision loader, so its official archive layout is parsed here.

Corrupt images: a dataset image that cannot be decoded stops the run with an
`UnreadableImageError` naming the file. Silently skipping it would change `n` and make
results incomparable between runs; the fix (re-download, delete the file) is the user's call.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .classnames import check_naming, cub_proper_name, curated_flowers102
from .net import reachable

DATASETS = ("flowers102", "cub200")
SPLITS = ("train", "val", "test")

# Shipped as package data, so an installed package works from any folder. The seed layout's
# top-level cat_to_name.json is kept identical to this copy (a test checks it).
ASSETS = Path(__file__).resolve().parent / "assets"
CAT_TO_NAME = ASSETS / "cat_to_name.json"
BUNDLED_CUB_CLASSES = ASSETS / "classes.txt"

CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
CUB_DIR = "CUB_200_2011"
FLOWERS_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
# Share of the official CUB training images held out (stratified) for validation.
CUB_VAL_FRACTION = 0.1
CUB_VAL_SEED = 0


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is missing on disk and downloading was not enabled."""


class UnreadableImageError(OSError):
    """An image file exists but cannot be decoded; the message names the file."""


def open_rgb(path: str | Path) -> Image.Image:
    """Open an image file as RGB, naming the file in any decoding error.

    Args:
        path: image file.
    """
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UnreadableImageError(f"cannot read image {path}: {err}") from err


class ImageListDataset(Dataset):
    """`(image, label)` pairs from a list of files, with class names in label order.

    Args:
        samples: `(path, label)` pairs, labels 0-based.
        classes: class names, `classes[label]` is the name of `label`.
        transform: applied to the RGB PIL image; None returns the PIL image.
        name: dataset name, recorded in results and feature-cache keys.
        split: split name.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        classes: list[str],
        transform: Callable[[Image.Image], Any] | None = None,
        name: str = "",
        split: str = "",
    ) -> None:
        self.samples = samples
        self.classes = classes
        self.transform = transform
        self.name = name
        self.split = split

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = open_rgb(path)
        return (self.transform(image) if self.transform else image), label

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __repr__(self) -> str:
        return (
            f"ImageListDataset(name={self.name!r}, split={self.split!r}, "
            f"n={len(self)}, classes={len(self.classes)})"
        )


def load_dataset(
    name: str,
    root: str | Path,
    split: str,
    transform: Callable[[Image.Image], Any] | None = None,
    download: bool = False,
) -> ImageListDataset:
    """Load a split of Flowers102 or CUB-200-2011.

    Args:
        name: `flowers102` or `cub200`.
        root: dataset root folder (Flowers102 lives in `<root>/flowers-102/`, CUB in
            `<root>/CUB_200_2011/`).
        split: `train`, `val` or `test`.
        transform: applied to each RGB PIL image.
        download: fetch the dataset when it is missing (checksums verified).

    Raises:
        ValueError: unknown dataset or split.
        DatasetNotFoundError: the dataset is missing and `download` is False.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    loader = _load_flowers102 if name == "flowers102" else _load_cub200
    samples, classes = loader(Path(root), split, download)
    return ImageListDataset(samples, classes, transform, name=name, split=split)


def class_names(name: str, root: str | Path = "data", naming: str = "curated") -> list[str]:
    """Class names of a dataset in label order, from metadata only (no images, no download).

    Naming the classes of a trained head or of a photo's prediction must not require the
    1 GB dataset: Flowers102 names come from cat_to_name.json; CUB names from the dataset's
    own classes.txt when it is on disk, else from the official list bundled with the package.

    Args:
        name: `flowers102` or `cub200`.
        root: dataset root folder (only CUB reads it, for a local classes.txt).
        naming: `curated` (the names prompts use: CLIP's Flowers102 list, CUB's birds' proper
            names; see `classnames`) or `original` (what the dataset ships, as `.classes`).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    curated = check_naming(naming) == "curated"
    if name == "flowers102":
        names = flowers102_class_names()
        return curated_flowers102(names) if curated else names
    local = Path(root) / CUB_DIR / "classes.txt"
    table = local if local.is_file() else BUNDLED_CUB_CLASSES
    folders = [row[1] for row in _read_table(table)]
    return [cub_proper_name(f) if curated else cub_class_name(f) for f in folders]


# --------------------------------------------------------------------------- Flowers102


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


def _load_flowers102(root: Path, split: str, download: bool) -> tuple[list[tuple[str, int]], list[str]]:
    from torchvision.datasets import Flowers102

    folder = root / "flowers-102"
    how = (
        "Any command downloads it unless given --no-download (e.g. `python -m clip_utils "
        "zeroshot --dataset flowers102`), as do load_dataset(..., download=True) and `make run`; "
        "for an offline try-out use `make demo`."
    )
    if download and not (folder / "jpg").is_dir():
        _require_network(FLOWERS_URL, "Flowers102", folder)
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


def _require_network(url: str, what: str, folder: Path) -> None:
    ok, why = reachable(url)
    if not ok:
        raise DatasetNotFoundError(
            f"{what} is not in {folder} and cannot be downloaded: {url} is unreachable ({why}). "
            f"Connect to the network, or copy the dataset there by hand; for an offline "
            f"try-out of the whole pipeline use `make demo`."
        )


# --------------------------------------------------------------------------- CUB-200-2011


def _read_table(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise DatasetNotFoundError(f"CUB-200-2011 file missing: {path}")
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def cub_class_name(folder_name: str) -> str:
    """`001.Black_footed_Albatross` -> `Black footed Albatross`."""
    return folder_name.split(".", 1)[-1].replace("_", " ")


def download_cub200(root: str | Path, url: str = CUB_URL, md5: str = CUB_MD5) -> Path:
    """Download and extract the official CUB-200-2011 archive into `root`.

    The archive is verified against its MD5 before extraction; a mismatching (partial or
    corrupt) archive is deleted so that the next attempt starts clean.

    Args:
        root: dataset root; the archive extracts to `<root>/CUB_200_2011/`.
        url: archive address.
        md5: expected MD5 of the archive.
    """
    from torchvision.datasets.utils import check_integrity, download_url

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "CUB_200_2011.tgz"
    if not check_integrity(str(archive), md5):
        archive.unlink(missing_ok=True)
        _require_network(url, "CUB-200-2011", root / CUB_DIR)
        try:
            download_url(url, str(root), filename=archive.name)
        except Exception as err:  # urllib / socket errors come in many types
            archive.unlink(missing_ok=True)
            raise DatasetNotFoundError(
                f"could not download CUB-200-2011 from {url} ({err}). Check the network, or "
                f"download the archive by hand and extract it so that {root / CUB_DIR} exists."
            ) from err
    verify_archive(archive, md5)
    target = root / CUB_DIR
    if target.exists():
        raise DatasetNotFoundError(
            f"{target} exists but is incomplete (no images.txt): remove it and run again to extract "
            f"the verified archive {archive}."
        )
    # Extract beside the target and rename at the end: an interrupted extraction must never
    # look like a complete dataset (images.txt comes early in the archive).
    with tempfile.TemporaryDirectory(prefix=".extracting-", dir=root) as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(Path(tmp) / CUB_DIR, target)
    return target


def verify_archive(archive: Path, md5: str) -> None:
    """Raise when `archive` does not match `md5`, deleting it so it is never reused.

    Args:
        archive: the downloaded file.
        md5: expected MD5.
    """
    from torchvision.datasets.utils import check_integrity

    if not check_integrity(str(archive), md5):
        archive.unlink(missing_ok=True)
        raise OSError(
            f"checksum mismatch for {archive} (expected MD5 {md5}): the partial or corrupt "
            f"file was removed; run the download again."
        )


def _cub_val_indices(labels: list[int], fraction: float, seed: int) -> set[int]:
    from sklearn.model_selection import train_test_split

    indices = list(range(len(labels)))
    n_val = max(round(len(labels) * fraction), len(set(labels)))
    _, val = train_test_split(indices, test_size=n_val, stratify=labels, random_state=seed)
    return set(val)


def _load_cub200(root: Path, split: str, download: bool) -> tuple[list[tuple[str, int]], list[str]]:
    base = root / CUB_DIR
    if not (base / "images.txt").is_file():
        if not download:
            raise DatasetNotFoundError(
                f"CUB-200-2011 not found: expected {base}/images.txt (the official "
                f"CUB_200_2011.tgz extracted into {root}). Any command downloads it unless given "
                f"--no-download (e.g. `python -m clip_utils zeroshot --dataset cub200`), as do "
                f"load_dataset(..., download=True) and `make run`; for an offline try-out use `make demo`."
            )
        download_cub200(root)
    classes = [cub_class_name(row[1]) for row in _read_table(base / "classes.txt")]
    paths = {row[0]: row[1] for row in _read_table(base / "images.txt")}
    labels = {row[0]: int(row[1]) - 1 for row in _read_table(base / "image_class_labels.txt")}
    is_train = {row[0]: row[1] == "1" for row in _read_table(base / "train_test_split.txt")}
    ids = sorted(paths, key=int)

    def sample(i: str) -> tuple[str, int]:
        return str(base / "images" / paths[i]), labels[i]

    if split == "test":
        return [sample(i) for i in ids if not is_train[i]], classes
    train_ids = [i for i in ids if is_train[i]]
    val = _cub_val_indices([labels[i] for i in train_ids], CUB_VAL_FRACTION, CUB_VAL_SEED)
    keep = (lambda k: k in val) if split == "val" else (lambda k: k not in val)
    return [sample(i) for k, i in enumerate(train_ids) if keep(k)], classes
