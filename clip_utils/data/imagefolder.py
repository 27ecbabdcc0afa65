"""Your own images in class folders, as a dataset: `--dataset imagefolder:PATH`.

    PATH/train/<class>/*.jpg, PATH/val/<class>/*, PATH/test/<class>/*   (val optional)
    PATH/<class>/*.jpg                                                  (split for you)
    PATH/classes.json   (optional) {"classes": {"<folder>": "<name>"}, "domain": "a type of mushroom"}

With `train/` and `test/` folders those are the splits; a missing `val/` is carved from
train (a stratified, seeded 10%, as for CUB). With class folders alone, each class is split
50/20/30 into train/val/test, stratified and seeded, as CoOp splits datasets without
official splits. Class names are the folder names with underscores and hyphens as spaces,
unless `classes.json` maps folder to name (a plain `{"<folder>": "<name>"}` works too); its
`domain` phrase, or `--domain`, gives the `domain` prompt sets. Results go to
`results/<PATH's folder name>/`. Files that are not images by their extension (a README,
`.DS_Store`) are ignored; an image file that cannot be decoded stops the run naming it.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import partial
from pathlib import Path

from clip_utils.data.classnames import check_naming
from clip_utils.data.images import (
    SPLITS,
    DatasetNotFoundError,
    DatasetSpec,
    Samples,
    stratified_split,
)

PREFIX = "imagefolder:"
CLASSES_FILE = "classes.json"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FLAT_FRACTIONS = (0.5, 0.2, 0.3)  # train, val, test: CoOp's split for datasets without one
VAL_FRACTION = 0.1  # carved from train when val/ is missing
SPLIT_SEED = 0


class ImageFolderError(DatasetNotFoundError):
    """An image folder that cannot be used as a dataset; the message says how to fix it."""


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith("."))


def _read_classes_file(path: Path) -> tuple[dict[str, str], str | None]:
    file = path / CLASSES_FILE
    if not file.is_file():
        return {}, None
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ImageFolderError(f"{file} is not valid JSON ({err}): fix or remove it") from err
    if not isinstance(data, dict):
        raise ImageFolderError(f"{file} must hold a JSON object: {{\"classes\": {{folder: name}}, \"domain\": ...}}")
    structured = isinstance(data.get("classes"), dict) or isinstance(data.get("domain"), str)
    mapping = data.get("classes", {}) if structured else data
    domain = data.get("domain") if structured else None
    return {str(k): str(v) for k, v in mapping.items()}, domain


def _layout(path: Path) -> dict[str, Path] | None:
    """`{split: folder}` when PATH has split folders, else None (class folders alone)."""
    present = {split: path / split for split in SPLITS if (path / split).is_dir()}
    if not present:
        return None
    if "train" not in present or "test" not in present:
        raise ImageFolderError(
            f"{path} has {', '.join(present)}/ but not both train/ and test/: give train/ and test/ "
            f"(val/ is optional), or put the class folders directly in {path}")
    return present


def _check_counts(counts: Counter, needed: int, where: Path, why: str) -> None:
    few = sorted((name, n) for name, n in counts.items() if n < needed)
    if few:
        listed = ", ".join(f"{name!r} ({n})" for name, n in few[:5]) + (" ..." if len(few) > 5 else "")
        raise ImageFolderError(
            f"{where}: {len(few)} class(es) have fewer than {needed} images, which {why}: {listed}. "
            f"Add images, or give the splits yourself as train/, val/ and test/ folders")


def _scan(folder: Path) -> dict[str, list[str]]:
    classes = _class_folders(folder)
    if not classes:
        raise ImageFolderError(
            f"no class folders in {folder}: expected {folder}/<class>/<images>, or train/, val/ and test/ "
            f"folders holding class folders")
    found = {c.name: _images(c) for c in classes}
    empty = [name for name, files in found.items() if not files]
    if empty:
        raise ImageFolderError(f"class folder(s) without images in {folder}: {', '.join(empty[:5])}; "
                               f"add images or remove the folders")
    return found


def split_samples(path: Path) -> tuple[dict[str, Samples], list[str]]:
    """Every split's `(path, label)` samples and the class folders in label order.

    Args:
        path: the image folder.

    Raises:
        ImageFolderError: no class folders, empty classes, classes too small to split,
            splits with different classes.
    """
    layout = _layout(path)
    if layout is None:
        found = _scan(path)
        classes = sorted(found)
        _check_counts(Counter({c: len(f) for c, f in found.items()}), len(FLAT_FRACTIONS), path,
                      "a 50/20/30 train/val/test split needs (one image per split at least)")
        files = [(f, label) for label, c in enumerate(classes) for f in found[c]]
        parts = stratified_split([y for _, y in files], FLAT_FRACTIONS, SPLIT_SEED)
        return {split: [files[i] for i in part] for split, part in zip(SPLITS, parts, strict=True)}, classes
    scanned = {split: _scan(folder) for split, folder in layout.items()}
    classes = sorted(scanned["train"])
    for split, found in scanned.items():
        if sorted(found) != classes:
            extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
            raise ImageFolderError(
                f"{layout[split]} has other classes than {layout['train']} (extra: {extra or 'none'}, "
                f"missing: {missing or 'none'}): every split needs the same class folders")
    samples = {split: [(f, label) for label, c in enumerate(classes) for f in found[c]]
               for split, found in scanned.items()}
    if "val" not in samples:
        train = samples["train"]
        _check_counts(Counter(classes[y] for _, y in train), 2, layout["train"],
                      "carving a validation split out of train needs (no val/ folder)")
        val_part, train_part = stratified_split([y for _, y in train], (VAL_FRACTION, 1 - VAL_FRACTION),
                                                SPLIT_SEED)
        samples["val"], samples["train"] = [train[i] for i in val_part], [train[i] for i in train_part]
    return samples, classes


def folder_class_name(folder: str) -> str:
    """`fly_agaric` or `fly-agaric` -> `fly agaric`."""
    return " ".join(folder.replace("_", " ").replace("-", " ").split())


def _load(path: Path, root: Path, split: str, download: bool) -> tuple[Samples, list[str]]:
    samples, classes = split_samples(path)
    if not samples[split]:
        raise ImageFolderError(f"the {split} split of {path} is empty: add images to it")
    return samples[split], classes


def _names(path: Path, root: Path, naming: str) -> list[str]:
    check_naming(naming)
    layout = _layout(path)
    folders = [c.name for c in _class_folders(layout["train"] if layout else path)]
    if naming == "original":
        return folders
    mapping, _ = _read_classes_file(path)
    return [mapping.get(f) or folder_class_name(f) for f in folders]


def imagefolder_spec(path: str | Path) -> DatasetSpec:
    """The declaration of an image folder (checked to exist; its images are read when loaded).

    Args:
        path: the folder (`~` expanded, relative to the current folder).

    Raises:
        ImageFolderError: the folder does not exist or its classes.json is malformed.
    """
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise ImageFolderError(f"image folder not found: {folder} (from {PREFIX}{path}); check the path")
    _, domain = _read_classes_file(folder)
    return DatasetSpec(
        name=f"{PREFIX}{folder}", title=f"image folder {folder}", load=partial(_load, folder),
        names=partial(_names, folder), domain=domain, downloadable=False,
        splits="train/, val/, test/ folders (val carved from train when missing), or 50/20/30 of each class",
    )
