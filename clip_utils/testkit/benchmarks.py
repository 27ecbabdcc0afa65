"""Synthetic copies of the torchvision benchmarks in their real on-disk layouts, for tests.

    python -m clip_utils.testkit.benchmarks demo_kit/data     # all six under demo_kit/data/
    from clip_utils.testkit.benchmarks import make_benchmarks, make_pets
    make_benchmarks(root)                 # {"pets": root/"oxford-iiit-pet", ...}

Each generator writes the files torchvision's class reads (annotation lists, JSON, .mat
files, class folders) with a few of the real class names and a handful of tiny class-coded
images (`testkit.class_image`) per class and split, so torchvision parses them exactly as
it parses the real datasets, in seconds. Not part of `testkit.make_kit` (built once per
test session and by `make demo`, kept fast): the tests that need these build them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from clip_utils.data.classnames import PETS_CLIP
from clip_utils.testkit import class_colours, class_image

SIZE = (20, 16)  # (width, height): tiny, since only the colours carry the class
# A few real class names per dataset, chosen to exercise the parsers: a name with a space
# and one with a slash (FGVC), a hyphen (DTD), underscores (Food-101), CamelCase folders
# that CLIP renamed (EuroSAT), a slash in a car's name.
AIRCRAFT_VARIANTS = ("707-320", "A300B4", "Boeing 717", "F-16A/B")
DTD_CLASSES = ("banded", "blotchy", "polka-dotted", "zigzagged")
FOOD_CLASSES = ("apple_pie", "baby_back_ribs", "hot_and_sour_soup", "pho")
EUROSAT_CLASSES = ("AnnualCrop", "HerbaceousVegetation", "Highway", "SeaLake")
CAR_CLASSES = ("AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Ram C/V Cargo Van Minivan 2012")


def _save(path: Path, label: int, index: int, colours: np.ndarray, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    class_image(label, index, size, colours).save(path, quality=90)


def make_pets(root: str | Path, n_classes: int = 5, trainval_per_class: int = 5, test_per_class: int = 3,
              size: tuple[int, int] = SIZE, seed: int = 11) -> Path:
    """Oxford-IIIT Pets under `<root>/oxford-iiit-pet/`: images/ and annotations/{trainval,test}.txt.

    Args:
        root: dataset root (what `load_dataset` takes).
        n_classes: how many of the 37 breeds, the first in label order (labels 1..n, as
            torchvision indexes its class list by label).
        trainval_per_class: images per breed in trainval.txt.
        test_per_class: images per breed in test.txt.
        size: `(width, height)` of every image.
        seed: seed of the class colours.
    """
    base = Path(root) / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    colours = class_colours(n_classes, seed)
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    per_species = {1: 0, 2: 0}
    index = 0
    for label, name in enumerate(PETS_CLIP[:n_classes]):
        breed = name.replace(" ", "_")  # the file-name form: cat breeds capitalised, dog breeds not
        species = 1 if breed[0].isupper() else 2
        per_species[species] += 1
        for k in range(trainval_per_class + test_per_class):
            index += 1
            image_id = f"{breed}_{k + 1}"
            _save(base / "images" / f"{image_id}.jpg", label, index, colours, size)
            split = "trainval" if k < trainval_per_class else "test"
            lines[split].append(f"{image_id} {label + 1} {species} {per_species[species]}")
    for split, rows in lines.items():
        (base / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return base


def make_fgvc_aircraft(root: str | Path, variants: tuple[str, ...] = AIRCRAFT_VARIANTS, per_split: int = 3,
                       size: tuple[int, int] = SIZE, seed: int = 12) -> Path:
    """FGVC Aircraft under `<root>/fgvc-aircraft-2013b/data/`: images/, variants.txt and
    images_variant_{train,val,test}.txt (`<image id> <variant>` lines).

    Args:
        root: dataset root.
        variants: the variant names, in label order (variants.txt).
        per_split: images per variant in each split.
        size: `(width, height)` of every image.
        seed: seed of the class colours.
    """
    base = Path(root) / "fgvc-aircraft-2013b" / "data"
    (base / "images").mkdir(parents=True, exist_ok=True)
    (base / "variants.txt").write_text("".join(f"{v}\n" for v in variants))
    colours = class_colours(len(variants), seed)
    index = 0
    for split in ("train", "val", "test"):
        rows = []
        for label, variant in enumerate(variants):
            for _ in range(per_split):
                index += 1
                image_id = f"{1000000 + index}"
                _save(base / "images" / f"{image_id}.jpg", label, index, colours, size)
                rows.append(f"{image_id} {variant}")
        (base / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
    return base.parent


def make_dtd(root: str | Path, classes: tuple[str, ...] = DTD_CLASSES, per_split: int = 3,
             size: tuple[int, int] = SIZE, seed: int = 13) -> Path:
    """DTD under `<root>/dtd/dtd/`: images/<class>/ and labels/{train,val,test}1.txt (partition 1).

    Args:
        root: dataset root.
        classes: texture names (torchvision sorts them for the label order).
        per_split: images per class in each split.
        size: `(width, height)` of every image.
        seed: seed of the class colours.
    """
    base = Path(root) / "dtd" / "dtd"
    (base / "labels").mkdir(parents=True, exist_ok=True)
    colours = class_colours(len(classes), seed)
    index = 0
    for split in ("train", "val", "test"):
        rows = []
        for label, name in enumerate(sorted(classes)):
            for _ in range(per_split):
                index += 1
                rel = f"{name}/{name}_{index:04d}.jpg"
                _save(base / "images" / rel, label, index, colours, size)
                rows.append(rel)
        (base / "labels" / f"{split}1.txt").write_text("\n".join(rows) + "\n")
    return base.parent


def make_food101(root: str | Path, classes: tuple[str, ...] = FOOD_CLASSES, train_per_class: int = 5,
                 test_per_class: int = 2, size: tuple[int, int] = SIZE, seed: int = 14) -> Path:
    """Food-101 under `<root>/food-101/`: images/<class>/<id>.jpg, meta/{train,test}.json and classes.txt.

    Args:
        root: dataset root.
        classes: folder names (torchvision sorts them for the label order).
        train_per_class: images per class in train.json.
        test_per_class: images per class in test.json.
        size: `(width, height)` of every image.
        seed: seed of the class colours.
    """
    base = Path(root) / "food-101"
    (base / "meta").mkdir(parents=True, exist_ok=True)
    colours = class_colours(len(classes), seed)
    meta: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    index = 0
    for label, name in enumerate(sorted(classes)):
        for k in range(train_per_class + test_per_class):
            index += 1
            rel = f"{name}/{100000 + index}"
            _save(base / "images" / f"{rel}.jpg", label, index, colours, size)
            meta["train" if k < train_per_class else "test"].setdefault(name, []).append(rel)
    for split, entries in meta.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(entries))
    (base / "meta" / "classes.txt").write_text("".join(f"{c}\n" for c in sorted(classes)))
    return base


def make_eurosat(root: str | Path, classes: tuple[str, ...] = EUROSAT_CLASSES, per_class: int = 10,
                 size: tuple[int, int] = (16, 16), seed: int = 15) -> Path:
    """EuroSAT (RGB) under `<root>/eurosat/2750/<class>/<class>_<n>.jpg`: class folders, no split.

    Args:
        root: dataset root.
        classes: class folders (torchvision sorts them for the label order).
        per_class: images per class (at least 3, for the 50/20/30 cut).
        size: `(width, height)` of every image (the real ones are 64 x 64).
        seed: seed of the class colours.
    """
    base = Path(root) / "eurosat"
    colours = class_colours(len(classes), seed)
    index = 0
    for label, name in enumerate(sorted(classes)):
        for k in range(per_class):
            index += 1
            _save(base / "2750" / name / f"{name}_{k + 1}.jpg", label, index, colours, size)
    return base


def _car_annotations(fnames: list[str], labels: list[int], size: tuple[int, int]) -> np.ndarray:
    # The struct array of the devkit's .mat files (1 x N, one field per column), which
    # scipy's savemat writes from a structured numpy array of objects.
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    annos = np.empty((1, len(fnames)), dtype=[(f, "O") for f in fields])
    for i, (fname, label) in enumerate(zip(fnames, labels, strict=True)):
        annos[0, i] = (np.uint8(1), np.uint8(1), np.uint16(size[0]), np.uint16(size[1]), np.uint8(label + 1), fname)
    return annos


def make_stanford_cars(root: str | Path, classes: tuple[str, ...] = CAR_CLASSES, train_per_class: int = 5,
                       test_per_class: int = 3, size: tuple[int, int] = SIZE, seed: int = 16) -> Path:
    """Stanford Cars under `<root>/stanford_cars/` as torchvision expects it: devkit/cars_meta.mat,
    devkit/cars_train_annos.mat, cars_train/, cars_test_annos_withlabels.mat, cars_test/.

    Images are numbered across classes (`00001.jpg`, ...) with the classes interleaved, as
    in the real archives.

    Args:
        root: dataset root.
        classes: class names in label order (cars_meta.mat; at least two).
        train_per_class: images per class in cars_train/.
        test_per_class: images per class in cars_test/.
        size: `(width, height)` of every image.
        seed: seed of the class colours.
    """
    from scipy.io import savemat

    base = Path(root) / "stanford_cars"
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([list(classes)], dtype=object)})
    colours = class_colours(len(classes), seed)
    index = 0
    for split, per_class, annos in (("train", train_per_class, base / "devkit" / "cars_train_annos.mat"),
                                    ("test", test_per_class, base / "cars_test_annos_withlabels.mat")):
        labels = [i % len(classes) for i in range(per_class * len(classes))]
        fnames = [f"{i + 1:05d}.jpg" for i in range(len(labels))]
        for fname, label in zip(fnames, labels, strict=True):
            index += 1
            _save(base / f"cars_{split}" / fname, label, index, colours, size)
        savemat(annos, {"annotations": _car_annotations(fnames, labels, size)})
    return base


def make_benchmarks(root: str | Path) -> dict[str, Path]:
    """All six synthetic benchmarks under `root`: `{registry name: the folder written}`.

    Args:
        root: dataset root (what `load_dataset` takes).
    """
    makers = {"pets": make_pets, "fgvc_aircraft": make_fgvc_aircraft, "dtd": make_dtd, "food101": make_food101,
              "eurosat": make_eurosat, "stanford_cars": make_stanford_cars}
    return {name: make(root) for name, make in makers.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="dataset root to write the six benchmarks into")
    args = parser.parse_args(argv)
    for name, folder in make_benchmarks(args.root).items():
        print(f"{name:<14} {folder}")


if __name__ == "__main__":
    main()
