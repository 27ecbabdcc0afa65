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
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from clip_utils.errors import MissingFile, UserError
from clip_utils.runtime.files import regular_file
from clip_utils.runtime.network import reachable

SPLITS = ("train", "val", "test")
Samples = list[tuple[str, int]]


class DatasetNotFoundError(MissingFile):
    """A dataset is missing on disk and downloading was not enabled."""


class UnreadableImageError(UserError, OSError):
    """An image file exists but cannot be decoded; the message names the file."""


def open_rgb(path: str | Path) -> Image.Image:
    """Open a dataset image as RGB with `decode_image`, naming the file in any decoding error.

    Args:
        path: image file.
    """
    return decode_image(path, path)


def decode_image(source: str | Path | BinaryIO, name: str | Path, *, photo: bool = False,
                 draft: int | None = None) -> Image.Image:
    """Decode an image file or binary file object as an upright RGB picture: the one decoder.

    Datasets (`open_rgb`) and your photos (`app.photos.open_photo`) both decode here, so an
    image either works or is refused with the same one-line reasons: not a regular file,
    permission denied, over Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`),
    not an image, truncated or corrupt. EXIF orientation is applied and any mode becomes RGB
    as a viewer shows it (`to_rgb`).

    Args:
        source: an image file, or a binary file-like object (`io.BytesIO(data)`).
        name: how messages name the image (its path, or an uploaded file's name).
        photo: the messages' way out is for a photo (re-export it) rather than a dataset
            image (re-download the dataset or remove the file).
        draft: decode a JPEG at a reduced scale that still leaves this many pixels a side.

    Raises:
        UnreadableImageError: any of the reasons above, naming the image.
    """
    fix = "re-export or re-copy it" if photo else "re-download the dataset or remove the file"
    if isinstance(source, (str, Path)):
        regular_file(source, "image" if not photo else "photo")  # a FIFO or device would block Image.open
    try:
        with Image.open(source) as img:
            if draft is not None and img.format == "JPEG":
                img.draft(None, (draft, draft))  # decode at 1/2..1/8 scale when that is enough
            img.load()
            return to_rgb(_upright(img))
    except PermissionError as err:
        raise UnreadableImageError(f"cannot read {name}: permission denied (check the file's permissions)") from err
    except Image.DecompressionBombError as err:
        raise UnreadableImageError(
            f"{name} is too large to decode safely ({err}). Downscale it first, or raise "
            f"PIL.Image.MAX_IMAGE_PIXELS if you trust the file."
        ) from err
    except UnidentifiedImageError as err:
        if photo:
            raise UnreadableImageError(f"cannot read {name}: not an image file Pillow can open (HEIC/AVIF/RAW need "
                                       f"converting to JPEG or PNG first)") from err
        raise UnreadableImageError(f"cannot read {name}: not an image file Pillow can open; {fix}") from err
    except (OSError, SyntaxError, ValueError) as err:  # truncated data, bad chunks, unreadable file
        raise UnreadableImageError(f"cannot read {name}: the file is truncated or corrupt ({err}); {fix}") from err


def _to_8bit(img: Image.Image) -> Image.Image:
    # 16-bit PNG/TIFF greyscale opens as I;16* or I (32-bit int), float TIFF as F. Scale by
    # the range the mode implies: 0..65535 for 16-bit, 0..1 for float images stored so.
    pixels = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        scale = 255 / 65535
    elif img.mode == "F" and pixels.size and pixels.max() <= 1.0:
        scale = 255.0
    else:  # I or F holding 8- or 16-bit values
        scale = 255 / 65535 if pixels.size and pixels.max() > 255 else 1.0
    return Image.fromarray(np.clip(pixels * scale + 0.5, 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB as a viewer would show it (transparency on white).

    Args:
        img: a loaded Pillow image.
    """
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a damaged EXIF block (many exception types) must not cost the picture itself
        return img


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
