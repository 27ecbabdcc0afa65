"""Prompt sets as data, and the zero-shot text classifier built from them.

    sets = prompt_sets("flowers102")          # {"default": [...], "domain": [...], ...}
    names = resolve(["all"], "flowers102")    # every set, plus "auto"
    W = build_text_classifier(model, processor.tokenizer, class_names, sets["domain"], "cuda")
    logits = 100 * image_embeddings @ W       # W: (D, C), one unit column per class

A prompt set is a list of templates with `{}` where the class name goes. A class's
weight vector is CLIP's prompt ensembling: embed every template filled with the name,
L2-normalise each embedding, average them, and normalise the mean again (as in the CLIP
paper and CLIP_benchmark).

The sets:

- `default`: `a photo of a {}.`, CLIP's plain prompt.
- `domain`: `a photo of a {}, a type of flower.` / `... a type of bird.`, CLIP's published
  single template for each dataset (79.17% top-1 on Flowers102 test with ViT-L/14 in
  CLIP_benchmark).
- `diverse`: generic templates that vary the wording, framing and image quality, taken
  from CLIP's ImageNet ensemble; they add no knowledge about the domain.
- `domain_ensemble`: the domain template in many phrasings (close-up, in the garden or
  the wild, cropped, field-guide style): the ensemble gains of `diverse`, each prompt
  still saying what kind of thing the class is.
- `auto` (not a template list): every set above scored on the validation split, the best
  one used on test. Choosing on validation is what makes the chosen number honest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .progress import bar

AUTO = "auto"
ALL = "all"

DEFAULT = ["a photo of a {}."]

# CLIP's ImageNet templates (Radford et al. 2021, notebooks/Prompt_Engineering), a subset that
# spans style, size, quality and medium.
DIVERSE = [
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
]

# What a Flowers102 or CUB image is, in words CLIP saw in captions during pre-training.
DOMAIN = {
    "flowers102": ["a photo of a {}, a type of flower."],
    "cub200": ["a photo of a {}, a type of bird."],
}

DOMAIN_ENSEMBLE = {
    "flowers102": [
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
    ],
    "cub200": [
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
    ],
}


def prompt_sets(dataset: str) -> dict[str, list[str]]:
    """Every prompt set for `dataset`, by name, in presentation order.

    Args:
        dataset: `flowers102` or `cub200`.

    Returns:
        `{name: templates}`; each template holds one `{}` for the class name.
    """
    if dataset not in DOMAIN:
        raise ValueError(f"no prompt sets for dataset {dataset!r}: choose one of {', '.join(DOMAIN)}")
    return {
        "default": list(DEFAULT),
        "domain": list(DOMAIN[dataset]),
        "diverse": list(DIVERSE),
        "domain_ensemble": list(DOMAIN_ENSEMBLE[dataset]),
    }


def resolve(names: Sequence[str] | str, dataset: str) -> list[str]:
    """Expand and check prompt-set names: `all` means every set plus `auto`.

    Args:
        names: set names (a comma-separated string is split), `all` or `auto` among them.
        dataset: the dataset whose sets are meant.

    Returns:
        The names in order, without duplicates.

    Raises:
        ValueError: an unknown name; the message lists the available ones.
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    known = [*prompt_sets(dataset), AUTO]
    out: list[str] = []
    for name in names:
        if name == ALL:
            out += known
        elif name in known:
            out.append(name)
        else:
            raise ValueError(f"unknown prompt set {name!r}: choose from {', '.join(known)} or {ALL}")
    if not out:
        raise ValueError(f"no prompt set given: choose from {', '.join(known)} or {ALL}")
    return list(dict.fromkeys(out))


def fill(templates: Sequence[str], class_name: str) -> list[str]:
    """The prompts of one class: every template with `{}` replaced by the name."""
    return [t.replace("{}", class_name) for t in templates]


def text_embeddings(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Projected (not yet normalised) CLIP text embeddings of tokenised prompts.

    transformers 5 returns a `BaseModelOutputWithPooling` from `get_text_features` (the
    projected embedding in `pooler_output`); transformers 4 returned the tensor itself.
    Both are accepted.

    Args:
        model: a `CLIPModel`.
        input_ids: `(B, L)` token ids.
        attention_mask: `(B, L)` mask.
    """
    out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.inference_mode()
def build_text_classifier(
    model,
    tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    device: str | torch.device,
    batch_size: int = 256,
    *,
    progress: bool = True,
    desc: str = "encoding prompts",
) -> torch.Tensor:
    """Zero-shot classifier weights: one ensembled, normalised text embedding per class.

    Args:
        model: a `CLIPModel` on `device`.
        tokenizer: its tokenizer (`processor.tokenizer`).
        class_names: names in label order.
        templates: prompt templates with `{}` where the name goes.
        device: where the text encoder runs.
        batch_size: prompts per forward pass (whole classes are kept together).
        progress: show a progress bar.
        desc: its label.

    Returns:
        `(D, C)` float32 tensor on CPU; column `c` is the unit-norm mean of the unit-norm
        embeddings of `templates` filled with `class_names[c]`.
    """
    if not templates:
        raise ValueError("a prompt set needs at least one template")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"every template needs exactly one '{{}}' for the class name; not so: {bad}")
    if not class_names:
        raise ValueError("no class names to build a classifier for")
    max_length = model.config.text_config.max_position_embeddings
    per_batch = max(1, batch_size // len(templates))
    columns = []
    with bar(total=len(class_names), desc=desc, unit="class", enabled=progress) as classes:
        for start in range(0, len(class_names), per_batch):
            names = class_names[start : start + per_batch]
            prompts = [p for name in names for p in fill(templates, name)]
            tokens = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            emb = text_embeddings(model, tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
            emb = F.normalize(emb.float(), dim=-1).view(len(names), len(templates), -1)
            columns.append(F.normalize(emb.mean(dim=1), dim=-1).cpu())
            classes.update(len(names))
    return torch.cat(columns).T.contiguous()
