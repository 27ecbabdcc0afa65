"""Curated class names for prompts: the names CLIP's published numbers were measured with.

    curated_flowers102(original_names)   # CLIP's Flowers102 list (CLIP_benchmark's anchor: 79.2%)
    cub_proper_name("022.Chuck_will_Widow")  # "Chuck-will's-widow"
    curated_pets(["American Bulldog"])   # ["american bulldog"]: CLIP's Oxford-IIIT Pets list
    curated_eurosat(["Sea Lake"])        # ["lake or sea"]: CLIP's EuroSAT names

The label maps stay what the datasets ship (`cat_to_name.json` for Flowers102, `classes.txt`
for CUB); only the words put into prompts, tables and figures change, and `--class-names
original` puts the shipped names back. Why it matters: `lotus lotus` and `ball moss` are
not how people caption photos, and the ViT-L/14 anchors in DESIGN.md were measured with
CLIP's own list; CUB's folder names lose the apostrophes and hyphens of the birds' names
(`Chuck will Widow`, `Brewer Blackbird`).

The other benchmarks (`benchmarks`): CLIP's lists for FGVC Aircraft, DTD, Food-101 and
Stanford Cars are the names torchvision parses (Food-101's with spaces for underscores), so
curated = original there. CLIP's Pets list differs from torchvision's only in case (cats
capitalised, dogs lower-case, as the dataset's file names are); CLIP's tokenizer lower-cases
text, so both namings give CLIP the same tokens. CLIP renamed EuroSAT's ten classes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from clip_utils.errors import InvalidValue

NAMINGS = ("curated", "original")

# Where CLIP's prompt-engineering list (used by CLIP_benchmark for the published anchors)
# departs from cat_to_name.json; every other name is the same.
FLOWERS102_CLIP = {
    "globe-flower": "globe flower",
    "pink-yellow dahlia": "pink and yellow dahlia",
    "lotus lotus": "lotus",
    "ball moss": "air plant",
}

# CUB folder names (after the number) whose bird name is not the folder's words with
# hyphens restored: possessives, the two nightjars' names, and a typo.
CUB_EXCEPTIONS = {
    "Brewer_Blackbird": "Brewer's Blackbird",
    "Chuck_will_Widow": "Chuck-will's-widow",
    "Brandt_Cormorant": "Brandt's Cormorant",
    "Heermann_Gull": "Heermann's Gull",
    "Anna_Hummingbird": "Anna's Hummingbird",
    "Clark_Nutcracker": "Clark's Nutcracker",
    "Scott_Oriole": "Scott's Oriole",
    "Western_Wood_Pewee": "Western Wood-Pewee",
    "Whip_poor_Will": "Whip-poor-will",
    "Baird_Sparrow": "Baird's Sparrow",
    "Brewer_Sparrow": "Brewer's Sparrow",
    "Harris_Sparrow": "Harris's Sparrow",
    "Henslow_Sparrow": "Henslow's Sparrow",
    "Le_Conte_Sparrow": "Le Conte's Sparrow",
    "Lincoln_Sparrow": "Lincoln's Sparrow",
    "Nelson_Sharp_tailed_Sparrow": "Nelson's Sharp-tailed Sparrow",
    "Artic_Tern": "Arctic Tern",
    "Forsters_Tern": "Forster's Tern",
    "Swainson_Warbler": "Swainson's Warbler",
    "Wilson_Warbler": "Wilson's Warbler",
    "Bewick_Wren": "Bewick's Wren",
}


# CLIP's Oxford-IIIT Pets names (data/prompts.md), in the dataset's label order (list.txt:
# breeds sorted ignoring case). torchvision title-cases every word (`American Bulldog`).
PETS_CLIP = (
    "Abyssinian", "american bulldog", "american pit bull terrier", "basset hound", "beagle", "Bengal", "Birman",
    "Bombay", "boxer", "British Shorthair", "chihuahua", "Egyptian Mau", "english cocker spaniel",
    "english setter", "german shorthaired", "great pyrenees", "havanese", "japanese chin", "keeshond",
    "leonberger", "Maine Coon", "miniature pinscher", "newfoundland", "Persian", "pomeranian", "pug", "Ragdoll",
    "Russian Blue", "saint bernard", "samoyed", "scottish terrier", "shiba inu", "Siamese", "Sphynx",
    "staffordshire bull terrier", "wheaten terrier", "yorkshire terrier",
)

# CLIP's EuroSAT names (data/prompts.md) for torchvision's class folders, in label order.
EUROSAT_CLIP = {
    "AnnualCrop": "annual crop land",
    "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments",
    "River": "river",
    "SeaLake": "lake or sea",
}


def check_naming(naming: str) -> str:
    """`naming` if it is one of `NAMINGS`, else a `ValueError` naming the choices."""
    if naming not in NAMINGS:
        raise InvalidValue(f"unknown class naming {naming!r}: choose {' or '.join(NAMINGS)}")
    return naming


def curated_flowers102(original: Sequence[str]) -> list[str]:
    """CLIP's Flowers102 class names, in the label order of `original` (cat_to_name.json's).

    Args:
        original: the names of cat_to_name.json in label order.
    """
    return [FLOWERS102_CLIP.get(name, name) for name in original]


def cub_proper_name(folder: str) -> str:
    """A CUB class folder as the bird's name: `001.Black_footed_Albatross` -> `Black-footed Albatross`.

    An underscore before a lower-case word is a hyphen (`Black_footed`, `Black_and_white`),
    any other underscore a space; `CUB_EXCEPTIONS` covers the rest.

    Args:
        folder: a class folder name from classes.txt, with or without its number prefix.
    """
    words = folder.split(".", 1)[-1]
    if words in CUB_EXCEPTIONS:
        return CUB_EXCEPTIONS[words]
    return re.sub(r"_(?=[a-z])", "-", words).replace("_", " ")


def curated_pets(original: Sequence[str]) -> list[str]:
    """CLIP's Oxford-IIIT Pets names for torchvision's (`American Bulldog` -> `american bulldog`).

    Args:
        original: torchvision's class names in label order; a name CLIP's list lacks is kept.
    """
    clip = {name.lower(): name for name in PETS_CLIP}
    return [clip.get(name.lower(), name) for name in original]


def camel_words(folder: str) -> str:
    """A CamelCase folder name as words: `HerbaceousVegetation` -> `Herbaceous Vegetation`."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", folder)


def curated_eurosat(original: Sequence[str]) -> list[str]:
    """CLIP's EuroSAT names for the spaced folder names (`Sea Lake` -> `lake or sea`).

    Args:
        original: the class folders as words (`camel_words`) in label order; a name CLIP's
            list lacks is kept.
    """
    clip = {camel_words(folder): name for folder, name in EUROSAT_CLIP.items()}
    return [clip.get(name, name) for name in original]
