"""Prompt sets per dataset, and the zero-shot text classifier built from them.

    sets = prompt_sets("flowers102")          # {"default": [...], "domain": [...], ...}
    names = resolve(["all"], "flowers102")    # every set, plus "auto"
    W = build_text_classifier(model, processor.tokenizer, class_names, sets["domain"], "cuda")
    logits = 100 * image_embeddings @ W       # W: (D, C), one unit column per class

A prompt set is a list of templates with `{}` where the class name goes, or, for sets whose
prompts differ from class to class (`descriptions`), a mapping `{class name: [prompt, ...]}`
in label order (`PromptSet`). A class's weight vector is CLIP's prompt ensembling: embed each
of its prompts, L2-normalise each embedding, average them, and normalise the mean again (as in
the CLIP paper and CLIP_benchmark). metrics.json's `templates` holds the set as it is: the
template list, or the mapping with every class's exact prompts.

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
- `waffle`: WaffleCLIP's random word and character descriptors (`waffle`), seeded, 30 prompts
  a class; no language model and no file.
- `descriptions` (only with a descriptions file, `Lab(descriptions=...)`, `--descriptions`):
  CuPL sentences or DCLIP descriptors per class (`descriptions`).
- `auto` (not a prompt set): every set above scored on the validation split, the best
  one used on test. Choosing on validation is what makes the chosen number honest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from clip_utils.config import WAFFLE_COUNT
from clip_utils.errors import InvalidValue
from clip_utils.prompts.templates import DEFAULT, DIVERSE, domain_template, generic_domain_ensemble
from clip_utils.prompts.waffle import waffle_templates
from clip_utils.runtime.progress import bar

AUTO = "auto"
ALL = "all"
WAFFLE = "waffle"
DESCRIPTIONS = "descriptions"

# Templates with `{}` for the class name, or every class's own prompts by class name.
PromptSet = Sequence[str] | Mapping[str, Sequence[str]]


class PromptSource(Protocol):
    """What a dataset declares for its prompts (`data.DatasetSpec` has these fields)."""

    domain: str | None
    domain_ensemble: tuple[str, ...]
    clip_templates: tuple[str, ...]


def prompt_sets(spec: PromptSource, domain: str | None = None, seed: int = 0) -> dict[str, list[str]]:
    """Every template prompt set of a dataset, by name, in presentation order.

    `default` and `diverse` always; `domain` is the template with the dataset's domain
    phrase (the default template when it has none); `domain_ensemble` when the dataset has a
    domain phrase; `clip` when CLIP published templates for it other than the `domain` set;
    `waffle` always (seeded). The per-class `descriptions` set needs a file and the class
    names: the lab adds it (`Lab.prompt_sets`).

    Args:
        spec: the dataset's declaration (`data.dataset_spec(name)`).
        domain: a domain phrase replacing the dataset's own (`a type of mushroom`).
        seed: the seed of `waffle`'s random descriptors.

    Returns:
        `{name: templates}`; each template holds one `{}` for the class name.
    """
    phrase = domain or spec.domain
    sets = {"default": list(DEFAULT), "domain": [domain_template(phrase)] if phrase else list(DEFAULT),
            "diverse": list(DIVERSE)}
    if phrase:
        written = spec.domain_ensemble if spec.domain_ensemble and not domain else ()
        sets["domain_ensemble"] = list(written or generic_domain_ensemble(phrase))
    # CLIP's single template is usually the `domain` one (Flowers102, Pets): no second copy.
    if spec.clip_templates and list(spec.clip_templates) != sets["domain"]:
        sets["clip"] = list(spec.clip_templates)
    sets[WAFFLE] = waffle_templates(seed, WAFFLE_COUNT, phrase)
    return sets


def resolve(names: Sequence[str] | str, spec: PromptSource, domain: str | None = None,
            descriptions: bool = False) -> list[str]:
    """Expand and check prompt-set names: `all` means every set plus `auto`.

    Args:
        names: set names (a comma-separated string is split), `all` or `auto` among them.
        spec: the declaration of the dataset whose sets are meant.
        domain: its domain phrase override (see `prompt_sets`).
        descriptions: a descriptions file is given, so the `descriptions` set exists.

    Returns:
        The names in order, without duplicates.

    Raises:
        ValueError: an unknown name; the message lists the available ones.
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    known = [*prompt_sets(spec, domain), *([DESCRIPTIONS] if descriptions else []), AUTO]
    out: list[str] = []
    for name in names:
        if name == ALL:
            out += known
        elif name in known:
            out.append(name)
        elif name == DESCRIPTIONS:
            raise InvalidValue(f"the {DESCRIPTIONS} prompt set needs a descriptions file (--descriptions FILE: "
                             f'{{"class name": ["description", ...]}}, as CuPL and DCLIP publish)')
        else:
            raise InvalidValue(f"unknown prompt set {name!r}: choose from {', '.join(known)} or {ALL}")
    if not out:
        raise InvalidValue(f"no prompt set given: choose from {', '.join(known)} or {ALL}")
    return list(dict.fromkeys(out))


def fill(templates: Sequence[str], class_name: str) -> list[str]:
    """The prompts of one class: every template with `{}` replaced by the name."""
    return [t.replace("{}", class_name) for t in templates]


def class_prompts(class_names: Sequence[str], prompt_set: PromptSet) -> list[list[str]]:
    """Every class's prompts, in label order, from templates or from per-class prompts.

    Args:
        class_names: names in label order.
        prompt_set: templates with one `{}` each, or `{class name: [prompt, ...]}` covering
            every name.

    Raises:
        ValueError: no template, a template without exactly one `{}`, or a class without prompts.
    """
    if isinstance(prompt_set, Mapping):
        missing = [name for name in class_names if not prompt_set.get(name)]
        if missing:
            raise InvalidValue(f"the prompt set has no prompts for {len(missing)} classes: {', '.join(missing[:10])}")
        return [list(prompt_set[name]) for name in class_names]
    if not prompt_set:
        raise InvalidValue("a prompt set needs at least one template")
    bad = [t for t in prompt_set if t.count("{}") != 1]
    if bad:
        raise InvalidValue(f"every template needs exactly one '{{}}' for the class name; not so: {bad}")
    return [fill(prompt_set, name) for name in class_names]


def prompts_per_class(prompt_set: PromptSet) -> float:
    """How many prompts a class has: the templates, or the mean over classes of a per-class set.

    Args:
        prompt_set: as metrics.json's `templates` holds it.
    """
    if isinstance(prompt_set, Mapping):
        return sum(len(v) for v in prompt_set.values()) / max(1, len(prompt_set))
    return len(prompt_set)


def clip_text_kwargs(model) -> dict[str, Any]:
    """CLIP's tokenizer arguments: padded to the longest prompt, cut at the text context.

    Args:
        model: the model (its text context length).
    """
    return {"padding": True, "truncation": True, "max_length": model.config.text_config.max_position_embeddings}


def text_embeddings(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Projected (not yet normalised) text embeddings of tokenised prompts.

    transformers 5 returns a `BaseModelOutputWithPooling` from `get_text_features` (the
    projected embedding in `pooler_output`; SigLIP's text head is its projection);
    transformers 4 returned the tensor itself. Both are accepted.

    Args:
        model: a `CLIPModel`, `SiglipModel` or `MetaClip2Model`.
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
    templates: PromptSet,
    device: str | torch.device,
    batch_size: int = 256,
    *,
    progress: bool = True,
    desc: str = "encoding prompts",
    text_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Zero-shot classifier weights: one ensembled, normalised text embedding per class.

    Args:
        model: a `CLIPModel` (or `SiglipModel`, `MetaClip2Model`) on `device`.
        tokenizer: its tokenizer (`processor.tokenizer`).
        class_names: names in label order.
        templates: prompt templates with `{}` where the name goes, or every class's own
            prompts, `{class name: [prompt, ...]}` (`PromptSet`).
        device: where the text encoder runs.
        batch_size: prompts per forward pass (whole classes are kept together; a class with
            more prompts than that is one pass of its own).
        progress: show a progress bar.
        desc: its label.
        text_kwargs: the tokenizer's arguments as the family's model card gives them
            (`Backbone.text_kwargs`: SigLIP pads every prompt to 64 tokens, and its text
            embedding changes with the padding); None: CLIP's (`clip_text_kwargs`).

    Returns:
        `(D, C)` float32 tensor on CPU; column `c` is the unit-norm mean of the unit-norm
        embeddings of class `c`'s prompts (`class_prompts`).
    """
    per_class = class_prompts(class_names, templates)
    if not class_names:
        raise ValueError("no class names to build a classifier for")
    text_kwargs = dict(clip_text_kwargs(model) if text_kwargs is None else text_kwargs)
    columns = []
    with bar(total=len(class_names), desc=desc, unit="class", enabled=progress) as classes:
        start = 0
        while start < len(per_class):
            end, n = start + 1, len(per_class[start])
            while end < len(per_class) and n + len(per_class[end]) <= batch_size:
                n, end = n + len(per_class[end]), end + 1
            group = per_class[start:end]
            prompts = [p for class_ in group for p in class_]
            tokens = tokenizer(prompts, return_tensors="pt", **text_kwargs)
            mask = tokens.get("attention_mask")  # passed on exactly when the tokenizer gives one, as the cards do
            emb = text_embeddings(model, tokens["input_ids"].to(device), None if mask is None else mask.to(device))
            emb = F.normalize(emb.float(), dim=-1).split([len(c) for c in group])
            columns.append(F.normalize(torch.stack([e.mean(dim=0) for e in emb]), dim=-1).cpu())
            classes.update(len(group))
            start = end
    return torch.cat(columns).T.contiguous()


def zeroshot_logits(features: torch.Tensor, classifier: torch.Tensor, logit_scale: float,
                    logit_bias: float = 0.0) -> torch.Tensor:
    """Zero-shot logits: scaled cosine similarity of image and class embeddings (plus SigLIP's bias).

    Args:
        features: `(N, D)` L2-normalised image embeddings.
        classifier: `(D, C)` L2-normalised class embeddings (`build_text_classifier`).
        logit_scale: CLIP's temperature, `model.logit_scale.exp()` (100 for OpenAI CLIP).
        logit_bias: SigLIP's logit bias (0 for CLIP; it moves no prediction).

    Returns:
        `(N, C)` float32 logits; their softmax is CLIP's class probability, their sigmoid
        SigLIP's (per class).
    """
    if features.shape[1] != classifier.shape[0]:
        raise InvalidValue(f"image embeddings of size {features.shape[1]} do not match text embeddings "
                         f"of size {classifier.shape[0]}: were they made by the same model?")
    return logit_scale * (features.float() @ classifier.float()) + logit_bias


def select_prompt_set(
    features: torch.Tensor, labels: torch.Tensor, classifiers: Mapping[str, torch.Tensor], scale: float
) -> tuple[str, dict[str, float]]:
    """The prompt set with the best top-1 on a (validation) split.

    Args:
        features: `(N, D)` image embeddings of the selection split.
        labels: `(N,)` their labels.
        classifiers: `{set name: (D, C) classifier}`, in preference order for ties.
        scale: the logit scale.

    Returns:
        `(best name, {name: top-1 accuracy})`.
    """
    if not classifiers:
        raise ValueError("no prompt sets to choose from")
    scores = {name: float((zeroshot_logits(features, w, scale).argmax(1) == labels).float().mean())
              for name, w in classifiers.items()}
    return max(scores, key=scores.get), scores  # max keeps the first of equal scores
