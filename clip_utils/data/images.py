"""What every dataset is made of: a list of labelled image files, and its declaration.

    ds = ImageListDataset([("a.jpg", 0), ("b.jpg", 1)], ["cat", "dog"], name="pets", split="test")
    image, label = ds[0]

Every dataset, whatever its on-disk format, is exposed as the same small `ImageListDataset`
(`(path, label)` samples, the class names, an optional transform), so every later stage
(feature extraction, the GPU decode path, predictions.csv) relies on `.samples` and
`.classes` alone. A `DatasetSpec` declares one dataset: how to load its splits, its class
names, its domain phrase and prompt templates (`data.DATASETS` is the table of them).

Corrupt images: a dataset image that cannot be decoded stops the run with an
`UnreadableImageError` naming the file. Silently skipping it would change `n` and make
results incomparable between runs; the fix (re-download, delete the file) is the user's call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from clip_utils.errors import MissingFile, UserError
from clip_utils.runtime.network import reachable

SPLITS = ("train", "val", "test")
Samples = list[tuple[str, int]]


class DatasetNotFoundError(MissingFile):
    """A dataset is missing on disk and downloading was not enabled."""


class UnreadableImageError(UserError, OSError):
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
        raise unreadable(path, err) from err


def unreadable(path: str | Path, err: Exception) -> UnreadableImageError:
    """The error for a dataset image that cannot be decoded: the file, why, and what to do.

    Args:
        path: the image file.
        err: what the decoder raised.
    """
    # PIL names what it read (`<_io.BytesIO object at 0x...>` when given bytes), not the file.
    why = "not an image file Pillow can identify" if isinstance(err, UnidentifiedImageError) else str(err)
    return UnreadableImageError(f"cannot read image {path} ({why}): re-download the dataset or remove the file")


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


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset's declaration.

    Attributes:
        name: what `--dataset` and `CLIP_DATASETS` call it; also its results folder.
        title: its name in prose.
        load: `(root, split, download) -> (samples, class names in label order)`.
        names: `(root, naming) -> class names in label order` from metadata alone (no
            images): `naming` is `curated` (the names prompts use) or `original`.
        domain: the phrase that says what an image shows (`a type of flower`), for the
            `domain` prompt set; None: that set is the plain default template.
        domain_ensemble: the domain template in many phrasings (empty: none).
        clip_templates: CLIP's own prompt ensemble for this dataset (empty: none).
        splits: how train, val and test are made (documentation).
        downloadable: whether `download=True` can fetch it.
    """

    name: str
    title: str
    load: Callable[[Path, str, bool], tuple[Samples, list[str]]]
    names: Callable[[Path, str], list[str]]
    domain: str | None = None
    domain_ensemble: tuple[str, ...] = ()
    clip_templates: tuple[str, ...] = ()
    splits: str = ""
    downloadable: bool = True


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Indices split into parts of the given fractions, stratified by label and seeded.

    Args:
        labels: one label per sample.
        fractions: the parts' shares (summing to 1), e.g. `(0.5, 0.2, 0.3)`.
        seed: the split's seed (the same seed gives the same split).

    Returns:
        One sorted index list per part.

    Raises:
        ValueError: a class with fewer samples than parts (it could not appear in each).
    """
    from sklearn.model_selection import train_test_split

    rest, parts = list(range(len(labels))), []
    left = 1.0
    for fraction in fractions[:-1]:
        rest_labels = [labels[i] for i in rest]
        n_classes = len(set(rest_labels))
        take = max(round(len(rest) * fraction / left), n_classes)
        part, rest = train_test_split(rest, train_size=take, stratify=rest_labels, random_state=seed)
        parts.append(sorted(part))
        left -= fraction
    return [*parts, sorted(rest)]


def require_network(url: str, what: str, folder: Path) -> None:
    ok, why = reachable(url)
    if not ok:
        raise DatasetNotFoundError(
            f"{what} is not in {folder} and cannot be downloaded: {url} is unreachable ({why}). "
            f"Connect to the network, or copy the dataset there by hand; for an offline "
            f"try-out of the whole pipeline use `make demo`."
        )
