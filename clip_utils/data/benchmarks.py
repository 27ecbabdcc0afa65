"""The field's standard benchmarks, loaded through torchvision and declared for the registry.

    from clip_utils.data import load_dataset, class_names
    ds = load_dataset("pets", "data", "test", download=True)   # data/oxford-iiit-pet/
    class_names("eurosat", "data")                             # CLIP's names: "annual crop land", ...

Each declaration says where torchvision finds the dataset under the data root, which
splits are used (the official train/val/test where the dataset has them, as the few-shot
literature does; otherwise CoOp's shares, stratified and seeded: see `tvdata`), its domain
phrase and the prompt templates CLIP published for it (data/prompts.md of openai/CLIP).

| name | torchvision | folder under the data root | train / val / test |
|---|---|---|---|
| flowers102 | Flowers102 | flowers-102/ | official setid.mat |
| pets | OxfordIIITPet | oxford-iiit-pet/ | 80/20 of official trainval / official test |
| fgvc_aircraft | FGVCAircraft (variant) | fgvc-aircraft-2013b/ | official |
| dtd | DTD | dtd/dtd/ | official partition 1 |
| food101 | Food101 | food-101/ | 80/20 of official train / official test |
| eurosat | EuroSAT | eurosat/2750/ | 50/20/30 of all (no official split) |
| stanford_cars | StanfordCars | stanford_cars/ | 80/20 of official train / official test |

Every one but Stanford Cars downloads through torchvision (Food-101 is about 5 GB);
Stanford Cars' site is gone, so its files are put in place by hand (the error says how).
"""

from __future__ import annotations

import json
from pathlib import Path

from clip_utils.data.classnames import (
    camel_words,
    check_naming,
    curated_eurosat,
    curated_flowers102,
    curated_pets,
)
from clip_utils.data.images import Samples
from clip_utils.data.torchvision_sets import (
    FULL_CARVE,
    UNSPLIT,
    Source,
    carved_val,
    declare,
)
from clip_utils.errors import InvalidValue
from clip_utils.prompts.templates import DOMAIN_ENSEMBLES

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# Shipped as package data, so an installed package works from any folder. The seed layout's
# top-level cat_to_name.json is kept identical to this copy (a test checks it).
CAT_TO_NAME = ASSETS / "cat_to_name.json"
FLOWERS_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
VGG_URL = "https://www.robots.ox.ac.uk/~vgg/data/"  # Pets, FGVC Aircraft and DTD come from here


def _pairs(paths, labels) -> Samples:
    return [(str(p), int(y)) for p, y in zip(paths, labels, strict=True)]


# The readers: torchvision keeps each parsed split in private attributes; they are read once
# here, so the rest of the package depends only on ImageListDataset's samples and names.

def _read_flowers102(root: Path, split: str | None, download: bool) -> tuple[Samples, list[str]]:
    from torchvision.datasets import Flowers102

    tv = Flowers102(str(root), split=split, download=download)
    return _pairs(tv._image_files, tv._labels), flowers102_class_names()


def _read_pets(root: Path, split: str | None, download: bool) -> tuple[Samples, list[str]]:
    from torchvision.datasets import OxfordIIITPet

    tv = OxfordIIITPet(str(root), split=split, download=download)
    return _pairs(tv._images, tv._labels), list(tv.classes)


def _read_fgvc_aircraft(root: Path, split: str | None, download: bool) -> tuple[Samples, list[str]]:
    from torchvision.datasets import FGVCAircraft

    tv = FGVCAircraft(str(root), split=split, annotation_level="variant", download=download)
    return _pairs(tv._image_files, tv._labels), list(tv.classes)


def _read_dtd(root: Path, split: str | None, download: bool) -> tuple[Samples, list[str]]:
    from torchvision.datasets import DTD

    tv = DTD(str(root), split=split, partition=1, download=download)
    return _pairs(tv._image_files, tv._labels), list(tv.classes)


def _read_food101(root: Path, split: str | None, download: bool) -> tuple[Samples, list[str]]:
    from torchvision.datasets import Food101

    tv = Food101(str(root), split=split, download=download)
    return _pairs(tv._image_files, tv._labels), [c.replace("_", " ") for c in tv.classes]


def _read_eurosat(root: Path, split: str | None, download: bool) -> tuple[Samples, list[str]]:
    from torchvision.datasets import EuroSAT

    tv = EuroSAT(str(root), download=download)  # an ImageFolder: its samples are public
    return _pairs(*zip(*tv.samples, strict=True)), [camel_words(c) for c in tv.classes]


def _eurosat_classes(root: Path) -> list[str]:
    from torchvision.datasets.folder import find_classes

    # The class folders alone: listing all 27,000 files only to name ten classes is waste.
    return [camel_words(c) for c in find_classes(root / "eurosat" / "2750")[0]]


def _read_stanford_cars(root: Path, split: str | None, download: bool) -> tuple[Samples, list[str]]:
    from torchvision.datasets import StanfordCars

    tv = StanfordCars(str(root), split=split)  # download=True only raises: there is no source
    return [(str(p), int(y)) for p, y in tv._samples], [str(c) for c in tv.classes]


def flowers102_class_names(path: str | Path = CAT_TO_NAME) -> list[str]:
    """Flowers102 names in label order: label k is key `str(k + 1)` of cat_to_name.json.

    Args:
        path: the cat_to_name.json file.
    """
    mapping = json.loads(Path(path).read_text())
    try:
        return [mapping[str(k + 1)] for k in range(102)]
    except KeyError as err:
        raise InvalidValue(f"{path} has no name for Flowers102 class id {err}") from err


def flowers102_names(root: Path, naming: str) -> list[str]:
    """Flowers102 names in label order: cat_to_name.json's, or CLIP's list (`curated`)."""
    names = flowers102_class_names()
    return curated_flowers102(names) if check_naming(naming) == "curated" else names


FLOWERS102 = declare(
    Source(title="Oxford Flowers102", folder="flowers-102", expects="jpg/, imagelabels.mat and setid.mat",
           read=_read_flowers102, url=FLOWERS_URL, present="flowers-102/jpg", size="330 MB"),
    name="flowers102", names=flowers102_names,
    domain="a type of flower", domain_ensemble=DOMAIN_ENSEMBLES["flower"],
    clip_templates=("a photo of a {}, a type of flower.",),
    splits="official setid.mat: 1020 train, 1020 val, 6149 test",
)

PETS = declare(
    Source(title="Oxford-IIIT Pets", folder="oxford-iiit-pet",
           expects="images/*.jpg and annotations/trainval.txt, annotations/test.txt", read=_read_pets,
           splits=carved_val("trainval"), url=VGG_URL, present="oxford-iiit-pet/images", size="about 800 MB"),
    name="pets", curate=curated_pets, domain="a type of pet",
    clip_templates=("a photo of a {}, a type of pet.",),
    splits="official test (3669); val: a stratified, seeded 20% of the official trainval (3680), the rest train",
)

FGVC_AIRCRAFT = declare(
    Source(title="FGVC Aircraft", folder="fgvc-aircraft-2013b",
           expects="data/images/, data/variants.txt and data/images_variant_{train,val,test}.txt",
           read=_read_fgvc_aircraft, url=VGG_URL, size="about 2.7 GB"),
    name="fgvc_aircraft", domain="a type of aircraft",
    clip_templates=("a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."),
    splits="official, 100 variants: 3334 train, 3333 val, 3333 test",
)

# Texture names are adjectives (`banded`, `polka-dotted`): `a photo of a banded, a type of
# texture.` is not English, so DTD has no domain phrase; CLIP's eight templates (the `clip`
# set) are its texture phrasings.
DTD = declare(
    Source(title="DTD (Describable Textures)", folder="dtd",
           expects="dtd/images/<class>/ and dtd/labels/{train,val,test}1.txt", read=_read_dtd,
           url=VGG_URL, present="dtd/dtd", size="about 600 MB"),
    name="dtd", domain=None,
    clip_templates=("a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.",
                    "a photo of a {} object.", "a photo of the {} texture.", "a photo of the {} pattern.",
                    "a photo of the {} thing.", "a photo of the {} object."),
    splits="official partition 1: 1880 train, 1880 val, 1880 test (47 classes x 40)",
)

# CLIP's Food-101 template has no article (`a photo of pizza, ...`); it stays exact in the
# `clip` set, while `domain` is the common form with the same phrase.
FOOD101 = declare(
    Source(title="Food-101", folder="food-101", expects="images/<class>/ and meta/train.json, meta/test.json",
           read=_read_food101, splits=carved_val("train"), url="http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
           present="food-101/images", size="about 5 GB"),
    name="food101", domain="a type of food", clip_templates=("a photo of {}, a type of food.",),
    splits="official test (25250); val: a stratified, seeded 20% of the official train (75750), the rest train",
)

# `a centered satellite photo of {}` is not `a photo of a {}, <phrase>.`: no domain phrase
# fits that form, so EuroSAT has none; CLIP's three templates are the `clip` set.
EUROSAT = declare(
    Source(title="EuroSAT (RGB)", folder="eurosat", expects="2750/<class>/*.jpg", read=_read_eurosat,
           splits=UNSPLIT, carve=FULL_CARVE, url="https://huggingface.co/datasets/torchgeo/eurosat",
           present="eurosat/2750", size="about 90 MB", classes=_eurosat_classes),
    name="eurosat", curate=curated_eurosat, domain=None,
    clip_templates=("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                    "a centered satellite photo of the {}."),
    splits="no official split: 27000 images cut 50/20/30 into train/val/test, stratified and seeded (as CoOp)",
)

STANFORD_CARS = declare(
    Source(title="Stanford Cars", folder="stanford_cars",
           expects="devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/, "
                   "cars_test_annos_withlabels.mat and cars_test/",
           read=_read_stanford_cars, splits=carved_val("train"),
           manual=("It cannot be downloaded any more (its Stanford site is gone, and torchvision's download "
                   "refuses): put the original files in {folder} by hand: car_devkit.tgz's devkit/ folder "
                   "(cars_meta.mat, cars_train_annos.mat), the images of cars_train.tgz directly in cars_train/ "
                   "and those of cars_test.tgz in cars_test/, and cars_test_annos_withlabels.mat beside them; "
                   "https://github.com/pytorch/vision/issues/7545 points to copies of these files.")),
    name="stanford_cars", domain="a type of car",
    clip_templates=("a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
                    "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.",
                    "a photo of my old {}."),
    splits="official test (8041); val: a stratified, seeded 20% of the official train (8144), the rest train",
)
