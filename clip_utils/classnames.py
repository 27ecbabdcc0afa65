"""Curated class names for prompts: the names CLIP's published numbers were measured with.

    curated_flowers102(original_names)   # CLIP's Flowers102 list (CLIP_benchmark's anchor: 79.2%)
    cub_proper_name("022.Chuck_will_Widow")  # "Chuck-will's-widow"

The label maps stay what the datasets ship (`cat_to_name.json` for Flowers102, `classes.txt`
for CUB); only the words put into prompts, tables and figures change, and `--class-names
original` puts the shipped names back. Why it matters: `lotus lotus` and `ball moss` are
not how people caption photos, and the ViT-L/14 anchors in DESIGN.md were measured with
CLIP's own list; CUB's folder names lose the apostrophes and hyphens of the birds' names
(`Chuck will Widow`, `Brewer Blackbird`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

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


def check_naming(naming: str) -> str:
    """`naming` if it is one of `NAMINGS`, else a `ValueError` naming the choices."""
    if naming not in NAMINGS:
        raise ValueError(f"unknown class naming {naming!r}: choose {' or '.join(NAMINGS)}")
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
