"""A dataset resolved once, at the edge, into the one object every stage below takes.

    ds = resolve("flowers102", root="data")                     # the official split, curated names
    ds = resolve("flowers102", root="data", split="coop")       # Zhou et al.'s split (CoOp's)
    base, new = ds.subset(range(51), "base"), ds.subset(range(51, 102), "new")
    ds.class_names, ds.folder, ds.load("train").samples          # names, results folder, images

The CLI, the notebooks and the API entry points (`Lab.resolve`) turn a name such as
`flowers102` or `imagefolder:~/mushrooms` into a `Dataset` once; methods, the lab's caches,
the results layout and the figures read what they need from it (declaration, split source,
class names under the chosen naming, class subset, results folder) and never parse a name
again.

Split sources: `official` is the dataset's own split (`DatasetSpec.load`); `coop` is Zhou et
al.'s re-split that CoOp, Tip-Adapter and CLIP-LoRA draw their shots from (`data.splits`),
read from a `split_zhou_*.json` file that is validated and whose SHA-256 results record.
A class subset (the base-to-new protocol's halves) keeps the chosen classes in their label
order, relabelled from 0, and has a results folder of its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from PIL import Image

from clip_utils.config import CLASS_NAMING, OFFICIAL_SPLIT, SPLIT_SOURCES, ZHOU_SPLIT
from clip_utils.data.benchmarks import (
    DTD,
    EUROSAT,
    FGVC_AIRCRAFT,
    FLOWERS102,
    FOOD101,
    PETS,
    STANFORD_CARS,
)
from clip_utils.data.classnames import check_naming
from clip_utils.data.cub import CUB200
from clip_utils.data.imagefolder import PREFIX, imagefolder_spec
from clip_utils.data.images import (
    SPLITS,
    DatasetNotFoundError,
    DatasetSpec,
    ImageListDataset,
    Samples,
)
from clip_utils.data.splits import ZHOU_SPLITS, check_class_order, fetch_split_file, read_split_file
from clip_utils.errors import InvalidValue, MissingFile

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec for spec in (FLOWERS102, CUB200, PETS, FGVC_AIRCRAFT, DTD, FOOD101, EUROSAT, STANFORD_CARS)
}
# Where Zhou et al.'s split is the dataset's official one, the two sources are one dataset.
COOP_IS_OFFICIAL = frozenset({"fgvc_aircraft"})


def dataset_spec(name: str) -> DatasetSpec:
    """The declaration of a registered dataset or of `imagefolder:PATH`.

    Args:
        name: a key of `DATASETS`, or `imagefolder:PATH` (a folder of class folders).

    Raises:
        InvalidValue: an unknown name (the message lists the choices).
        DatasetNotFoundError: an image folder that is missing or malformed.
    """
    if name in DATASETS:
        return DATASETS[name]
    if name.startswith(PREFIX):
        return imagefolder_spec(name[len(PREFIX):])
    raise InvalidValue(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, or {PREFIX}PATH for "
                       f"your own folder of class folders")


def results_name(name: str) -> str:
    """The results folder of a recorded dataset name: the registered name, or the image
    folder's own name (a string operation, for names read back from metrics.json).

    Args:
        name: a registered name or `imagefolder:PATH`.
    """
    if name.startswith(PREFIX):
        return Path(name[len(PREFIX):]).expanduser().name or "imagefolder"
    return name


@dataclass(frozen=True)
class SplitSource:
    """Where train, val and test come from.

    Attributes:
        name: `official` or `coop`.
        file: the split file (`coop`), None for the official split.
        sha256: the split file's SHA-256 (`coop`), recorded in metrics.json.
        samples: the split file's samples per split (`coop`), absolute paths.
        given: the file was given (`--split-file`) rather than the published one.
    """

    name: str = OFFICIAL_SPLIT
    file: Path | None = None
    sha256: str | None = None
    samples: dict[str, Samples] | None = field(default=None, compare=False, repr=False)
    given: bool = False


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset resolved once: its declaration, data root, naming, split source and classes.

    Compared by identity (each is resolved once and then passed on), so the lab's caches can
    key on it.

    Args:
        spec: the dataset's declaration (`DATASETS` or an image folder's).
        root: the data root it loads from.
        naming: `curated` or `original` class names.
        source: where its splits come from (`SplitSource`).
        classes: a subset of the full dataset's labels, kept in this order and relabelled
            from 0 (None: every class).
        part: the subset's name (`base`, `new`), part of its results folder.
        whole: the dataset the subset was taken from (None: this is the whole dataset).
    """

    spec: DatasetSpec
    root: Path
    naming: str = CLASS_NAMING
    source: SplitSource = SplitSource()
    classes: tuple[int, ...] | None = None
    part: str = ""
    whole: Dataset | None = field(default=None, repr=False)
    _subsets: dict[tuple, Dataset] = field(default_factory=dict, init=False, repr=False)

    def __repr__(self) -> str:
        classes = "" if self.classes is None else f", classes={len(self.classes)} of {len(self.full.class_names)}"
        return f"Dataset({self.name!r}, split_source={self.split_source!r}{classes}, folder={self.folder!r})"

    @property
    def name(self) -> str:
        """The name results record (`flowers102`, `imagefolder:/abs/path`)."""
        return self.spec.name

    @property
    def title(self) -> str:
        return self.spec.title

    @property
    def split_source(self) -> str:
        """Where its train/val/test come from: `official` or `coop` (never a split's name)."""
        return self.source.name

    @property
    def folder(self) -> str:
        """Its results folder under `results/`: `flowers102`, `flowers102-coop`, `flowers102-base`,
        an image folder's own name; runs of different splits or classes never share one."""
        folder = results_name(self.name)
        if self.split_source != OFFICIAL_SPLIT:
            folder += f"-{self.split_source}"
            if self.source.given:  # a file of your own: its own folder, never mixed with the published one's
                folder += f"-{self.source.sha256[:8]}"
        return folder + (f"-{self.part}" if self.part else "")

    @property
    def full(self) -> Dataset:
        """The whole dataset (itself unless a class subset)."""
        return self.whole or self

    def _subset_of(self, names: list[str]) -> tuple[str, ...]:
        return tuple(names[c] for c in self.classes) if self.classes is not None else tuple(names)

    @cached_property
    def class_names(self) -> tuple[str, ...]:
        """Class names in label order under `naming` (metadata only: no images, no download)."""
        return self._subset_of(self.spec.names(self.root, self.naming))

    @cached_property
    def original_names(self) -> tuple[str, ...]:
        """The dataset's own class names in label order: what checkpoints are checked against,
        so a head trained under one naming still loads under the other."""
        return self._subset_of(self.spec.names(self.root, "original"))

    @property
    def command_args(self) -> tuple[str, ...]:
        """How a command line names it (`shlex.join` them to show it): `--dataset flowers102`,
        plus `--split coop` and a given `--split-file` (a class subset is made by the `base2new`
        command, which names its whole dataset)."""
        args: tuple[str, ...] = ("--dataset", self.name)
        if self.split_source != OFFICIAL_SPLIT:
            args += ("--split", self.split_source)
            if self.source.given:
                args += ("--split-file", str(self.source.file))
        return args

    @cached_property
    def sizes(self) -> dict[str, int]:
        """Images per split (`train`, `val`, `test`), from the split lists alone (no image
        decoded, nothing downloaded)."""
        return {split: len(self.load(split)) for split in SPLITS}

    def record(self) -> dict[str, Any]:
        """What metrics.json records of the dataset beyond its name (split source, split file
        hash, class subset), so results of different splits or classes are never confused."""
        return {"split_source": self.split_source, "split_sha256": self.source.sha256,
                "class_subset": self.part or None, "dataset_folder": self.folder}

    def subset(self, classes: Iterable[int], part: str) -> Dataset:
        """The dataset reduced to some classes, relabelled from 0 in the given order.

        Args:
            classes: labels of the whole dataset.
            part: the subset's name (`base`, `new`), part of its results folder.
        """
        labels = tuple(int(c) for c in classes)
        n = len(self.full.class_names)
        if not labels or any(not 0 <= c < n for c in labels) or len(set(labels)) != len(labels):
            raise InvalidValue(f"a class subset of {self.name} needs distinct labels in 0..{n - 1}, got {labels}")
        if not re.fullmatch(r"[a-z0-9_]+", part):  # it names a results folder beside the whole dataset's
            raise InvalidValue(f"a class subset's name must be lower-case letters, digits or _, got {part!r}")
        key = (labels, part)
        if key not in self.full._subsets:  # one object per subset: the lab's caches key on it
            self.full._subsets[key] = Dataset(self.spec, self.root, self.naming, self.source, labels, part,
                                              whole=self.full)
        return self.full._subsets[key]

    def with_naming(self, naming: str) -> Dataset:
        """The same dataset under another class naming."""
        return replace(self, naming=check_naming(naming))

    def samples(self, split: str, download: bool = False) -> tuple[Samples, list[str]]:
        """`(samples, original class names)` of a split of the whole dataset, from its split source."""
        if split not in SPLITS:
            raise InvalidValue(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
        if self.source.samples is not None:  # the split file's lists (its images checked when it was read)
            return list(self.source.samples[split]), list(self.original_names)
        return self.spec.load(self.root, split, download)

    def load(self, split: str, transform: Callable[[Image.Image], Any] | None = None,
             download: bool = False) -> ImageListDataset:
        """A split as an `ImageListDataset` (class subset applied, class names as `.classes`).

        Args:
            split: `train`, `val` or `test`.
            transform: applied to each RGB PIL image.
            download: fetch the dataset when it is missing (where it can be downloaded).

        Raises:
            DatasetNotFoundError: the dataset is missing (and `download` is off or impossible),
                or the split is empty.
        """
        samples, classes = self.full.samples(split, download)
        if self.classes is not None:
            relabel = {c: i for i, c in enumerate(self.classes)}
            samples = [(path, relabel[label]) for path, label in samples if label in relabel]
            classes = [classes[c] for c in self.classes]
        if not samples:
            raise DatasetNotFoundError(f"the {split} split of {self.title} is empty: check the dataset files")
        return ImageListDataset(samples, classes, transform, name=self.folder, split=split)


def resolve(name: str | Dataset, root: str | Path = "data", naming: str = CLASS_NAMING, split: str = OFFICIAL_SPLIT,
            split_file: str | Path | None = None, download: bool = False) -> Dataset:
    """Resolve a dataset name, once, into a `Dataset` (a `Dataset` is returned as it is).

    Args:
        name: a key of `DATASETS` (`flowers102`, `cub200`, ...) or `imagefolder:PATH`.
        root: dataset root folder.
        naming: `curated` (the names prompts use) or `original` (the dataset's own).
        split: `official`, or `coop` for Zhou et al.'s split (`data.splits`).
        split_file: a `split_zhou_*.json` file for `coop` (None: the published one, fetched
            into the dataset's folder on first use).
        download: `coop`: fetch the dataset (and the published split file) first when missing,
            so the file can be checked against its images; off, both must be there.

    Raises:
        InvalidValue: an unknown name, naming or split source, a malformed split file, or `coop`
            for a dataset without a Zhou split (CUB, your own folders).
        DatasetNotFoundError: an image folder that is missing or malformed.
    """
    if isinstance(name, Dataset):
        return name
    spec, root = dataset_spec(name), Path(root).expanduser().resolve()
    check_naming(naming)
    if split not in SPLIT_SOURCES:
        raise InvalidValue(f"unknown split source {split!r}: choose one of {', '.join(SPLIT_SOURCES)}")
    if split_file is not None and split != ZHOU_SPLIT:
        raise InvalidValue("a split file is Zhou et al.'s split: give it with --split coop (CLIP_SPLIT=coop)")
    if split == ZHOU_SPLIT and spec.name in COOP_IS_OFFICIAL:
        if split_file is not None:
            raise InvalidValue(f"{spec.name}'s Zhou et al. split is its official one: leave out --split-file")
        split = OFFICIAL_SPLIT  # the same images in the same splits: one dataset, one results folder
    source = SplitSource() if split == OFFICIAL_SPLIT else coop_source(spec, root, split_file, download)
    return Dataset(spec, root, naming, source)


def coop_source(spec: DatasetSpec, root: Path, split_file: str | Path | None, download: bool) -> SplitSource:
    """Zhou et al.'s split of `spec` (`data.splits`), read and validated once.

    Raises:
        InvalidValue: the dataset has no Zhou split, or the file is not its split.
        MissingFile: the file (or the dataset) is not there and `download` is off.
    """
    zhou = ZHOU_SPLITS.get(spec.name)
    if zhou is None:
        have = ", ".join(sorted(ZHOU_SPLITS))
        raise InvalidValue(f"{spec.name} has no Zhou et al. split (CoOp's split_zhou_*.json): use its official split "
                      f"(leave out --split coop / CLIP_SPLIT); the datasets that have one: {have}")
    # the published file is kept in the dataset's own folder (`flowers-102/`), beside its images;
    # its published sizes are checked, a file of your own only by its structure
    folder = root / Path(zhou.image_dir).parts[0]
    if download:  # the images first: the file is checked against them
        spec.load(root, "train", True)
    if split_file is None and not download and not (folder / zhou.file).is_file():
        raise MissingFile(f"Zhou et al.'s split file {folder / zhou.file} is not there and downloads are off "
                          f"(--no-download): put it there, or give one with --split-file")
    path = Path(split_file).expanduser() if split_file is not None else fetch_split_file(zhou, folder)
    names = spec.names(root, "original")
    read = read_split_file(path, root / zhou.image_dir, len(names), sizes=None if split_file else zhou.sizes)
    check_class_order(path, read.names, names)
    return SplitSource(ZHOU_SPLIT, path.resolve(), read.sha256, read.samples, given=split_file is not None)
