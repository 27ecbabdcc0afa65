"""Zhou et al.'s published train/val/test splits (CoOp's `split_zhou_*.json`), read and checked.

    split = ZHOU_SPLITS["flowers102"]
    path = fetch_split_file(split, data_root / "flowers-102")
    zhou = read_split_file(path, data_root / split.image_dir, n_classes=102, sizes=split.sizes)
    zhou.samples["train"][0]    # ("/data/flowers-102/jpg/image_04467.jpg", 0)

CoOp, Tip-Adapter and CLIP-LoRA draw their K-shot samples from these files rather than from
the datasets' official splits, so comparing with their tables needs the same files. A file is
`{"train": [[path, label, class name], ...], "val": [...], "test": [...]}` with 0-based labels
and paths relative to the dataset's image folder; `ZhouSplit.image_dir` names that folder in
torchvision's layout under our data root (the file's paths are the same in both layouts).
Every check of `read_split_file` fails in one line naming the file, so a damaged or wrong
file is never used quietly, and `sha256` lets a run record exactly which file it used.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from clip_utils.data.images import SPLITS
from clip_utils.errors import InvalidValue, MissingFile
from clip_utils.runtime.files import atomic_path, regular_file, write_text
from clip_utils.runtime.network import reachable

DOWNLOAD_TIMEOUT_S = 60.0
# The largest published file (Food-101, ~100k entries) is a few MB; anything far larger is
# not a split file, and reading it whole would only waste memory.
MAX_DOWNLOAD_BYTES = 64 * 2**20
_FIX = "give the split file of CoOp's DATASETS.md (github.com/KaiyangZhou/CoOp) with --split-file PATH"


def _drive(file_id: str) -> str:
    return f"https://drive.google.com/uc?export=download&id={file_id}"


@dataclass(frozen=True)
class ZhouSplit:
    """Where one dataset's published split file comes from and what it refers to.

    Attributes:
        file: the file's published name, e.g. `split_zhou_OxfordFlowers.json`.
        image_dir: the folder under the data root that the file's image paths are relative
            to, in torchvision's layout (e.g. `flowers-102/jpg`).
        url: direct download address of the published file; empty if none is known.
        sizes: published `(train, val, test)` sizes, checked on reading; None if unknown.
    """

    file: str
    image_dir: str
    url: str = ""
    sizes: tuple[int, int, int] | None = None


# File names and Google Drive ids from CoOp's DATASETS.md; image folders from CoOp's dataset
# classes (datasets/*.py: the folder each joins the file's paths to), mapped to torchvision's
# layout. Sizes are those of CoOp's dataset table; they follow from CoOp's per-class rounding
# (50/20/30 of each class, or 20% of the official train as val).
ZHOU_SPLITS: dict[str, ZhouSplit] = {
    "flowers102": ZhouSplit("split_zhou_OxfordFlowers.json", "flowers-102/jpg",  # image_00001.jpg
                            _drive("1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT"), (4093, 1633, 2463)),
    "pets": ZhouSplit("split_zhou_OxfordPets.json", "oxford-iiit-pet/images",  # Abyssinian_1.jpg
                      _drive("1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs"), (2944, 736, 3669)),
    "dtd": ZhouSplit("split_zhou_DescribableTextures.json", "dtd/dtd/images",  # banded/banded_0002.jpg
                     _drive("1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x"), (2820, 1128, 1692)),
    "food101": ZhouSplit("split_zhou_Food101.json", "food-101/images",  # apple_pie/1005649.jpg
                         _drive("1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl"), (50500, 20200, 30300)),
    "eurosat": ZhouSplit("split_zhou_EuroSAT.json", "eurosat/2750",  # AnnualCrop/AnnualCrop_1.jpg
                         _drive("1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o"), (13500, 5400, 8100)),
    "stanford_cars": ZhouSplit("split_zhou_StanfordCars.json", "stanford_cars",  # cars_train/00001.jpg
                               _drive("1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT"), (6509, 1635, 8041)),
}


@dataclass(frozen=True)
class SplitFile:
    """A split file that passed every check of `read_split_file`.

    Attributes:
        path: the file.
        sha256: hex digest of its bytes (what a run records to name the split it used).
        samples: `{"train"|"val"|"test": [(absolute image path, label), ...]}` in file order.
        names: the class name of each label, as the file gives it.
    """

    path: Path
    sha256: str
    samples: dict[str, list[tuple[str, int]]]
    names: tuple[str, ...]

    def sizes(self) -> tuple[int, int, int]:
        """`(train, val, test)` sizes."""
        train, val, test = (len(self.samples[s]) for s in SPLITS)
        return train, val, test


def _short(value: object, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bad(path: Path, what: str) -> InvalidValue:
    return InvalidValue(f"split file {path}: {what}; {_FIX}")


def _parse(path: Path, data: bytes) -> dict[str, list]:
    try:
        content = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _bad(path, f"not valid JSON ({err})") from None
    if not isinstance(content, dict) or set(content) != set(SPLITS):
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise _bad(path, f"expected a JSON object with exactly the keys train, val, test, found {found}")
    for split in SPLITS:
        if not isinstance(content[split], list):
            raise _bad(path, f"{split} is {type(content[split]).__name__}, not a list of entries")
    return content


def _entries(path: Path, content: dict[str, list], n_classes: int) -> dict[str, list[tuple[str, int, str]]]:
    """Each entry checked for shape, label range and a safe relative path."""
    out: dict[str, list[tuple[str, int, str]]] = {}
    for split in SPLITS:
        rows = []
        for i, entry in enumerate(content[split]):
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and isinstance(entry[1], int) and not isinstance(entry[1], bool) and isinstance(entry[2], str)):
                raise _bad(path, f"{split} entry {i} is {_short(entry)}, not [image path, label, class name]")
            rel, label, name = entry
            if not 0 <= label < n_classes:
                raise _bad(path, f"{split} entry {i} ({rel}) has label {label}, outside 0..{n_classes - 1}")
            pure = PurePosixPath(rel)
            # A path outside the image folder would read files the dataset does not hold.
            if not rel or pure.is_absolute() or ".." in pure.parts:
                raise _bad(path, f"{split} entry {i} has path {rel!r}, not a path inside the image folder")
            rows.append((str(pure), label, name))
        out[split] = rows
    return out


def _names(path: Path, entries: dict[str, list[tuple[str, int, str]]], n_classes: int) -> tuple[str, ...]:
    names: dict[int, str] = {}
    for split in SPLITS:
        for rel, label, name in entries[split]:
            known = names.setdefault(label, name)
            if known != name:
                raise _bad(path, f"label {label} is called both {known!r} and {name!r} ({rel})")
    trained = {label for _, label, _ in entries["train"]}
    untrained = [k for k in range(n_classes) if k not in trained]
    if untrained:
        shown = ", ".join(map(str, untrained[:5])) + (", ..." if len(untrained) > 5 else "")
        raise _bad(path, f"{len(untrained)} of {n_classes} classes have no training image (labels {shown}): "
                         f"it is not a split of a {n_classes}-class dataset")
    return tuple(names[k] for k in range(n_classes))


def _no_duplicates(path: Path, entries: dict[str, list[tuple[str, int, str]]]) -> None:
    seen: dict[str, str] = {}
    for split in SPLITS:
        for rel, _, _ in entries[split]:
            if rel in seen:
                where = f"twice in {split}" if seen[rel] == split else f"in both {seen[rel]} and {split}"
                raise _bad(path, f"image {rel} is listed {where}")
            seen[rel] = split


def read_split_file(
    path: str | Path,
    image_root: Path,
    n_classes: int,
    sizes: Sequence[int] | None = None,
    check_files: bool = True,
) -> SplitFile:
    """Read a split file in Zhou et al.'s format and check it against the dataset.

    Args:
        path: the split file (`split_zhou_*.json`, or one in the same format).
        image_root: the folder the file's image paths are relative to
            (`data_root / ZhouSplit.image_dir`).
        n_classes: the dataset's number of classes; labels must lie in `0..n_classes-1` and
            every class must have a training image.
        sizes: expected `(train, val, test)` sizes (the published ones); None: not checked.
        check_files: require every listed image to exist under `image_root`.

    Returns:
        The checked file: its samples with absolute image paths, class names, and sha256.

    Raises:
        MissingFile: the split file is not there, or (with `check_files`) images it lists
            are not under `image_root`.
        InvalidValue: the file is not a regular file, not valid JSON, not the format, has a
            label out of range, two names for one label, a class without training images,
            other sizes than `sizes`, or an image listed twice.
    """
    path = Path(path)
    try:
        regular_file(path, "split file")
    except MissingFile:
        raise MissingFile(f"split file not found: {path}; {_FIX}") from None
    data = path.read_bytes()
    entries = _entries(path, _parse(path, data), n_classes)
    names = _names(path, entries, n_classes)
    found = tuple(len(entries[s]) for s in SPLITS)
    if sizes is not None and found != tuple(sizes):
        raise _bad(path, f"it has {'/'.join(map(str, found))} train/val/test images, not the published "
                         f"{'/'.join(map(str, sizes))}: it is another split")
    _no_duplicates(path, entries)
    root = Path(os.path.abspath(Path(image_root).expanduser()))  # absolute, symlinks kept as given
    if check_files:
        listed = [rel for s in SPLITS for rel, _, _ in entries[s]]
        missing = [rel for rel in listed if not (root / rel).is_file()]
        if missing:
            raise MissingFile(
                f"{len(missing):,} of the {len(listed):,} images listed in {path} are not in {root} (first: "
                f"{missing[0]}): the dataset must be in that folder; put it there or give the right --data-root")
    samples = {s: [(str(root / rel), label) for rel, label, _ in entries[s]] for s in SPLITS}
    return SplitFile(path=path, sha256=hashlib.sha256(data).hexdigest(), samples=samples, names=names)


def _cannot(url: str, why: str, folder: Path) -> MissingFile:
    return MissingFile(f"cannot download {url} ({why}): download it by hand into {folder} or give --split-file PATH")


def fetch_split_file(split: ZhouSplit, folder: Path) -> Path:
    """The published split file in `folder`, downloaded there first if it is missing.

    Args:
        split: the dataset's entry of `ZHOU_SPLITS`.
        folder: where the file is kept (`folder / split.file`).

    Returns:
        The file's path. Its content is checked only as JSON here; `read_split_file` checks it.

    Raises:
        MissingFile: it is not there and cannot be downloaded (no known address, offline, the
            server refused, or what came back is not a JSON object).
        InvalidValue: something other than a regular file is at its path.
    """
    folder = Path(folder)
    target = folder / split.file
    if target.exists():
        return regular_file(target, "split file")
    if not split.url:
        raise MissingFile(f"{split.file} is not in {folder} and no published address of it is known here: "
                          f"download it by hand into {folder} or give --split-file PATH")
    ok, why = reachable(split.url)  # fails in seconds offline, where urlopen could hang
    if not ok:
        raise _cannot(split.url, why, folder)
    try:
        with urllib.request.urlopen(split.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except urllib.error.HTTPError as err:
        raise _cannot(split.url, f"HTTP {err.code} {err.reason}", folder) from None
    except (urllib.error.URLError, OSError) as err:
        raise _cannot(split.url, str(getattr(err, "reason", err)), folder) from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise _cannot(split.url, f"more than {MAX_DOWNLOAD_BYTES:,} bytes, not a split file", folder)
    # Google Drive answers a quota or confirmation page with status 200: keep only JSON, so a
    # saved HTML page is never taken for the split file on the next run.
    try:
        content = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        content = None
    if not isinstance(content, dict):
        raise _cannot(split.url, "the server sent no JSON object, e.g. a quota or confirmation page", folder)
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return target


def write_split_file(path: str | Path, samples_by_split: Mapping[str, Sequence[tuple[str, int, str]]]) -> Path:
    """Write a split file in Zhou et al.'s format, atomically.

    Args:
        path: output file.
        samples_by_split: `{"train"|"val"|"test": [(relative image path, label, class name), ...]}`.

    Returns:
        `path`.

    Raises:
        InvalidValue: the keys are not exactly train, val and test.
    """
    if set(samples_by_split) != set(SPLITS):
        raise InvalidValue(f"a split file has exactly the splits train, val, test, not {sorted(samples_by_split)}")
    content = {s: [[str(rel), int(label), str(name)] for rel, label, name in samples_by_split[s]] for s in SPLITS}
    return write_text(path, json.dumps(content) + "\n")


def _words(name: str) -> set[str]:
    return set(name.lower().replace("_", " ").replace("-", " ").split())


def check_class_order(path: Path, file_names: Sequence[str], names: Sequence[str]) -> None:
    """Refuse a split file whose labels do not follow the dataset's class order.

    Zhou et al.'s files spell some classes their own way (`Annual Crop Land` for EuroSAT's
    `AnnualCrop`, `Highway or Road` for `Highway`), so a label agrees when the words of one
    of its two names are all among the other's (case, `_` and `-` aside).

    Args:
        path: the split file (for messages).
        file_names: the file's class name per label.
        names: the dataset's own class names in label order.

    Raises:
        InvalidValue: a label whose two names do not agree.
    """
    wrong = [(k, a, b) for k, (a, b) in enumerate(zip(file_names, names, strict=False))
             if not (_words(a) <= _words(b) or _words(b) <= _words(a))]
    if wrong:
        k, a, b = wrong[0]
        raise InvalidValue(f"split file {path}: its labels do not follow the dataset's class order ({len(wrong)} "
                           f"differ; label {k} is {a!r} there, {b!r} here): give the split file made for this "
                           f"dataset with --split-file")
