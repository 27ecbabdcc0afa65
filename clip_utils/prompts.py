"""Prompt sets per dataset, and the zero-shot text classifier built from them.

    sets = prompt_sets("flowers102")          # {"default": [...], "domain": [...], ...}
    names = resolve(["all"], "flowers102")    # every set, plus "auto"
    W = build_text_classifier(model, processor.tokenizer, class_names, sets["domain"], "cuda")
    logits = 100 * image_embeddings @ W       # W: (D, C), one unit column per class

A prompt set is a list of templates with `{}` where the class name goes. A class's
weight vector is CLIP's prompt ensembling: embed every template filled with the name,
L2-normalise each embedding, average them, and normalise the mean again (as in the CLIP
paper and CLIP_benchmark).

The templates themselves are data (`templates`, and each dataset's declaration). The sets:

- `default`: `a photo of a {}.`, CLIP's plain prompt.
- `domain`: `a photo of a {}, a type of flower.` / `... a type of bird.`: the dataset's
  domain phrase in CLIP's single template (79.17% top-1 on Flowers102 test with ViT-L/14 in
  CLIP_benchmark); the default template for a dataset without a phrase.
- `diverse`: generic templates that vary the wording, framing and image quality, taken
  from CLIP's ImageNet ensemble; they add no knowledge about the domain.
- `domain_ensemble`: the domain template in many phrasings (close-up, in the garden or
  the wild, cropped, field-guide style): the ensemble gains of `diverse`, each prompt
  still saying what kind of thing the class is (datasets with a domain phrase).
- `clip`: CLIP's own templates for the dataset, where they are not already the `domain`
  set (several templates, as for DTD or Stanford Cars, or one in another form, as Food-101's
  `a photo of {}, a type of food.`).
- `auto` (not a template list): every set above scored on the validation split, the best
  one used on test. Choosing on validation is what makes the chosen number honest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .data import dataset_spec
from .progress import bar
from .templates import DEFAULT, DIVERSE, domain_template, generic_domain_ensemble

AUTO = "auto"
ALL = "all"

def prompt_sets(dataset: str, domain: str | None = None) -> dict[str, list[str]]:
    """Every prompt set for `dataset`, by name, in presentation order.

    `default` and `diverse` always; `domain` is the template with the dataset's domain
    phrase (the default template when it has none); `domain_ensemble` when the dataset has a
    domain phrase; `clip` when CLIP published templates for it other than the `domain` set.

    Args:
        dataset: a registered dataset or `imagefolder:PATH`.
        domain: a domain phrase replacing the dataset's own (`a type of mushroom`).

    Returns:
        `{name: templates}`; each template holds one `{}` for the class name.
    """
    spec = dataset_spec(dataset)
    phrase = domain or spec.domain
    sets = {"default": list(DEFAULT), "domain": [domain_template(phrase)] if phrase else list(DEFAULT),
            "diverse": list(DIVERSE)}
    if phrase:
        written = spec.domain_ensemble if spec.domain_ensemble and not domain else ()
        sets["domain_ensemble"] = list(written or generic_domain_ensemble(phrase))
    # CLIP's single template is usually the `domain` one (Flowers102, Pets): no second copy.
    if spec.clip_templates and list(spec.clip_templates) != sets["domain"]:
        sets["clip"] = list(spec.clip_templates)
    return sets


def resolve(names: Sequence[str] | str, dataset: str, domain: str | None = None) -> list[str]:
    """Expand and check prompt-set names: `all` means every set plus `auto`.

    Args:
        names: set names (a comma-separated string is split), `all` or `auto` among them.
        dataset: the dataset whose sets are meant.
        domain: its domain phrase override (see `prompt_sets`).

    Returns:
        The names in order, without duplicates.

    Raises:
        ValueError: an unknown name; the message lists the available ones.
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    known = [*prompt_sets(dataset, domain), AUTO]
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
