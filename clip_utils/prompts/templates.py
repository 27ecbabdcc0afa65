"""Prompt templates as data: `{}` is where the class name goes.

    from clip_utils.prompts.templates import DEFAULT, DIVERSE, domain_template, generic_domain_ensemble
    domain_template("a type of mushroom")        # "a photo of a {}, a type of mushroom."

Datasets declare their own (`data.images.DatasetSpec`); `prompts.prompt_sets` assembles a
dataset's sets from these.
"""

from __future__ import annotations

DEFAULT = ("a photo of a {}.",)

# CLIP's ImageNet templates (Radford et al. 2021, notebooks/Prompt_Engineering), a subset that
# spans style, size, quality and medium.
DIVERSE = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a low resolution photo of a {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a blurry photo of a {}.",
    "a good photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a photo of my {}.",
    "itap of a {}.",
    "art of the {}.",
    "a drawing of a {}.",
    "a painting of the {}.",
    "a jpeg corrupted photo of a {}.",
    "a rendition of a {}.",
)

# The domain template in many phrasings, written for the kind of thing a dataset shows.
DOMAIN_ENSEMBLES = {
    "flower": (
        "a photo of a {}, a type of flower.",
        "a close-up photo of a {}, a type of flower.",
        "a cropped photo of a {}, a type of flower.",
        "a bright photo of a {}, a type of flower.",
        "a good photo of a {}, a type of flower.",
        "a low resolution photo of a {}, a type of flower.",
        "a photo of the {} flower.",
        "a photo of a {} flower in bloom.",
        "a photo of {} flowers in the garden.",
        "a close-up photo of the petals of a {} flower.",
        "a botanical photo of a {}, a flowering plant.",
        "{}, a type of flower.",
    ),
    "bird": (
        "a photo of a {}, a type of bird.",
        "a close-up photo of a {}, a type of bird.",
        "a cropped photo of a {}, a type of bird.",
        "a bright photo of a {}, a type of bird.",
        "a good photo of a {}, a type of bird.",
        "a low resolution photo of a {}, a type of bird.",
        "a photo of the {}, a bird species.",
        "a photo of a {}, a wild bird.",
        "a photo of a {} bird perched on a branch.",
        "a bird watching photo of a {}.",
        "a field guide photo of the {}, a bird.",
        "{}, a type of bird.",
    ),
}


def domain_template(phrase: str) -> str:
    """`a photo of a {}, <phrase>.`: CLIP's single template with what the image shows.

    Args:
        phrase: e.g. `a type of flower`.
    """
    return f"a photo of a {{}}, {phrase.strip().rstrip('.')}."


def generic_domain_ensemble(phrase: str) -> tuple[str, ...]:
    """The domain template in a dozen phrasings, for a dataset without a written ensemble.

    Args:
        phrase: e.g. `a type of mushroom`.
    """
    phrase = phrase.strip().rstrip(".")
    styles = ("a photo of a", "a close-up photo of a", "a cropped photo of a", "a bright photo of a",
              "a good photo of a", "a low resolution photo of a", "a photo of the", "a blurry photo of a",
              "a dark photo of a", "a photo of my", "a photo of one", "itap of a")
    return (*(f"{style} {{}}, {phrase}." for style in styles),)
