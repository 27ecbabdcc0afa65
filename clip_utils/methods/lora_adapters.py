"""LoRA beyond the vision tower: CLIP's own classifier with a trainable text tower, and saved adapters.

    tokens = class_tokens(tokenizer, class_names, ["a photo of a {}, a type of flower."], max_length=77)
    classifier = TextTowerClassifier(vision, model.visual_projection, text, model.text_projection,
                                     tokens, logit_scale=100.0)
    logits = classifier(pixels)          # 100 * cos(image, class prompt), prompts re-encoded
    head = classifier.frozen_head()      # the same logits as a linear head, for ClipClassifier

CLIP-LoRA (Zanella & Ben Ayed, 2024) adapts both encoders and classifies as zero-shot CLIP
does: the logits are the logit scale times the cosine similarity of the image embedding with
each class prompt's text embedding. With LoRA in the text tower those text embeddings change
at every step, so in training mode they are recomputed at every forward pass (the class
prompts are a few hundred short sequences, much less work than the images' backward pass).
The logit scale stays fixed, as in CLIP-LoRA: every base weight is frozen.

Once training stops the text side no longer changes: in eval mode the class embeddings are
computed once and kept until the module is put back in training mode (`train()` drops them),
and `frozen_head` turns them into the linear head (`heads.zeroshot_head`) that `ClipClassifier`
applies, so a text-adapted run is saved, reloaded, predicted with and exported exactly like a
vision LoRA run: vision tower, projection, linear head.

`attach_adapter` puts a saved adapter (either tower's) back on a fresh tower, checked against
the head it was saved with; `quiet_peft` hides a warning peft raises about its own code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clip_utils.model.heads import image_embeddings, zeroshot_head
from clip_utils.model.lora import quiet_peft
from clip_utils.prompts import class_prompts
from clip_utils.results.checkpoints import CheckpointError, HeadInfo, check_adapter


def attach_adapter(tower: nn.Module, folder: Path, info: HeadInfo, device: str | torch.device) -> nn.Module:
    """A saved peft adapter on `tower` (in place), after checking it belongs to the head `info`.

    Args:
        tower: a fresh `vision_model` or `text_model` of the run's base CLIP.
        folder: the adapter folder (`adapter/`, `text_adapter/`).
        info: the metadata of the head saved beside it.
        device: where the adapted tower goes.

    Raises:
        CheckpointError: from another run or epoch, or damaged.
    """
    from peft import PeftModel

    check_adapter(folder, info)
    try:
        with quiet_peft():
            return PeftModel.from_pretrained(tower, str(folder)).to(device)
    except Exception as err:  # a cut-short or edited adapter file: peft and safetensors raise many types
        raise CheckpointError(
            f"the LoRA adapter in {folder} is damaged ({str(err).splitlines()[0]}): delete it and retrain "
            f"with `python -m clip_utils lora --dataset {info.dataset}`"
        ) from err


@dataclass(frozen=True)
class ClassTokens:
    """Tokenised class prompts: `per_class` consecutive rows per class, in label order.

    Attributes:
        input_ids: `(C * per_class, L)` token ids.
        attention_mask: `(C * per_class, L)` mask.
        per_class: prompts per class (their embeddings are averaged, CLIP's ensembling).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    per_class: int = 1


def class_tokens(tokenizer, class_names: Sequence[str], templates: Sequence[str], max_length: int,
                 text_kwargs: dict | None = None) -> ClassTokens:
    """Tokenised class prompts, every template filled with every name, class by class.

    Args:
        tokenizer: CLIP's tokenizer.
        class_names: names in label order.
        templates: prompt templates with `{}` (LoRA uses the `domain` set: one template, as
            CLIP-LoRA does).
        max_length: the text tower's context length (CLIP's padding).
        text_kwargs: the family's tokenizer arguments (`Backbone.text_kwargs`: SigLIP pads to
            64 tokens), over CLIP's padding to the longest prompt.
    """
    prompts = [p for per_class in class_prompts(class_names, templates) for p in per_class]
    kwargs = text_kwargs or {"padding": True, "truncation": True, "max_length": max_length}
    tokens = tokenizer(prompts, return_tensors="pt", **kwargs)
    mask = tokens.get("attention_mask")
    return ClassTokens(tokens["input_ids"], mask if mask is not None else torch.ones_like(tokens["input_ids"]),
                       len(templates))


class TextTowerClassifier(nn.Module):
    """Logits = logit scale x cosine(image embedding, class prompt embedding) (+ SigLIP's bias), both towers live.

    Args:
        vision_model: CLIP's vision transformer (peft-wrapped when adapted).
        visual_projection: CLIP's image projection (None: SigLIP, whose tower's pooled output
            is the embedding).
        text_model: CLIP's text transformer (peft-wrapped).
        text_projection: CLIP's text projection (None: SigLIP, whose text tower projects
            inside, `text_model.head`).
        tokens: the class prompts (`class_tokens`, padded as the family pads them).
        logit_scale: CLIP's temperature, `exp(model.logit_scale)` (fixed).
        logit_bias: SigLIP's logit bias (fixed; 0 for CLIP). A constant on every class, it
            changes no prediction and no cross-entropy, only what a sigmoid would read.
    """

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module | None, text_model: nn.Module,
                 text_projection: nn.Module | None, tokens: ClassTokens, logit_scale: float,
                 logit_bias: float = 0.0) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.text_model = text_model
        self.text_projection = text_projection
        device = next(vision_model.parameters()).device
        # Buffers, not parameters; not persistent: the prompts are rebuilt from the class names.
        self.register_buffer("input_ids", tokens.input_ids.to(device), persistent=False)
        self.register_buffer("attention_mask", tokens.attention_mask.to(device), persistent=False)
        self.per_class = tokens.per_class
        self.logit_scale = float(logit_scale)
        self.logit_bias = float(logit_bias)
        self._frozen: torch.Tensor | None = None

    def class_embeddings(self) -> torch.Tensor:
        """`(C, D)` unit-norm class embeddings from the current text tower (cached in eval mode)."""
        if not self.training and self._frozen is not None:
            return self._frozen
        pooled = self.text_model(input_ids=self.input_ids, attention_mask=self.attention_mask).pooler_output
        projected = pooled if self.text_projection is None else self.text_projection(pooled)
        emb = F.normalize(projected.float(), dim=-1)
        emb = F.normalize(emb.view(-1, self.per_class, emb.shape[-1]).mean(dim=1), dim=-1)
        if not self.training:
            self._frozen = emb.detach()
        return emb

    def train(self, mode: bool = True) -> TextTowerClassifier:
        super().train(mode)
        self._frozen = None  # the text tower may change from here on (or just has)
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        images = image_embeddings(self, pixel_values)
        classes = self.class_embeddings()
        # In fp32 outside autocast, as `ClipClassifier` runs its head: bf16 logits would flip
        # close calls between classes.
        with torch.autocast(images.device.type, enabled=False):
            return self.logit_scale * images.float() @ classes.float().T + self.logit_bias

    @torch.no_grad()
    def frozen_head(self) -> nn.Linear:
        """The current classifier as a float32 linear head on the normalised image embedding.

        In eval mode, after a validation pass, these are the very class embeddings that pass
        scored (kept since); in training mode they are computed now, with dropout.
        """
        head = zeroshot_head(self.class_embeddings().T, self.logit_scale, self.logit_bias)
        return head.to(self.input_ids.device)
