"""The contrastive image-text families clip-lab adapts: CLIP, SigLIP (and SigLIP 2), MetaCLIP 2.

    backbone = checkpoint_backbone("google/siglip2-base-patch16-224")   # reads config.json only
    backbone.name, backbone.model_class, backbone.probabilities         # "siglip", "SiglipModel", "sigmoid"
    tokens = tokenizer(prompts, **backbone.text_kwargs(model))           # padded as its model card pads
    vision, projection = backbone.image_parts(model)                     # projection None for SigLIP

A family is read from the checkpoint's `config.json` (`model_type`), never guessed from its
name, and before any weight is read: a checkpoint of another kind is refused in one line.

| family | `model_type` | model class | text | logits | probabilities |
|---|---|---|---|---|---|
| `clip` (OpenAI CLIP, MetaCLIP 1, OpenCLIP in HF format) | `clip` | `CLIPModel` | padded to the longest prompt, pooled at the end token | `scale * cos` | softmax |
| `siglip` (SigLIP, SigLIP 2 fixed resolution) | `siglip` | `SiglipModel` | padded to 64 tokens (`padding="max_length"`), pooled at the last position | `scale * cos + bias` | sigmoid, per class |
| `metaclip_2` (MetaCLIP 2, XLM-R tokenizer) | `metaclip_2` | `MetaClip2Model` | as CLIP | `scale * cos` | softmax |

What differs in practice:

- SigLIP's image embedding is its vision tower's `pooler_output` (an attention-pooling head
  inside the tower): there is no `visual_projection`, so `image_parts` gives None there.
  Its text tower's `pooler_output` is already projected (`text_model.head`).
- SigLIP's text tower reads its last position, padding included: padding to the longest
  prompt instead of to 64 tokens changes every text embedding. `text_kwargs` gives the
  tokenizer arguments its model card uses.
- SigLIP was trained with a sigmoid per image-text pair: its zero-shot probabilities are
  `sigmoid(scale * cos + bias)` per class, not a softmax over classes (`logit_bias`).
- The encoder layers of every family name their linears `q_proj`, `k_proj`, `v_proj`,
  `out_proj`, `fc1`, `fc2`; SigLIP's attention-pooling head also holds an `out_proj`
  (inside `nn.MultiheadAttention`, whose forward never calls it) and an `fc1`/`fc2` MLP,
  so LoRA targets are a pattern over the encoder layers alone (`lora_targets`).
- SigLIP 2's NaFlex checkpoints (`model_type` `siglip2`: variable resolution, patch
  masks) are refused, naming a fixed-resolution SigLIP 2 checkpoint, which loads as SigLIP.

`text_from_embeddings` is the hook prompt learning needs (context vectors in place of word
embeddings): the family's text tower run from token embeddings, pooled where the family
pools (`pool_positions`), projected. None would mean a family that cannot take them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clip_utils.errors import InvalidValue
from clip_utils.model.heads import visual_projection

# The text length SigLIP's model cards pad to (`padding="max_length", max_length=64`).
SIGLIP_TEXT_LENGTH = 64
NAFLEX_ALTERNATIVE = "google/siglip2-base-patch16-224"


class UnsupportedModel(InvalidValue):
    """A checkpoint whose `model_type` is no family clip-lab supports (said before weights load)."""


def _causal_text_from_embeddings(model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                                 positions: torch.Tensor) -> torch.Tensor:
    """CLIP and MetaCLIP 2: position embeddings added, causal encoder, final norm, pooled at
    `positions` (the end token), projected."""
    from transformers.masking_utils import create_causal_mask

    text = model.text_model
    hidden = text.embeddings(inputs_embeds=inputs_embeds)
    mask = create_causal_mask(config=text.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None)
    out = text.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True)
    states = text.final_layer_norm(out.last_hidden_state)
    pooled = states[torch.arange(states.shape[0], device=states.device), positions.to(states.device)]
    return model.text_projection(pooled)


def _bidirectional_text_from_embeddings(model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                                        positions: torch.Tensor) -> torch.Tensor:
    """SigLIP: position embeddings added, bidirectional encoder, final norm, pooled at
    `positions` (the last one), through the text head."""
    from transformers.masking_utils import create_bidirectional_mask

    text = model.text_model
    hidden = text.embeddings(inputs_embeds=inputs_embeds)
    mask = create_bidirectional_mask(config=text.config, inputs_embeds=hidden, attention_mask=attention_mask)
    out = text.encoder(inputs_embeds=hidden, attention_mask=mask)
    states = text.final_layer_norm(out.last_hidden_state)
    pooled = states[torch.arange(states.shape[0], device=states.device), positions.to(states.device)]
    return text.head(pooled)


@dataclass(frozen=True)
class Backbone:
    """What clip-lab needs to know about one family of contrastive checkpoints.

    Attributes:
        name: the family (`clip`, `siglip`, `metaclip_2`), recorded on `Clip.backbone` and
            in the feature cache key.
        label: its name in messages and the README.
        model_types: the `config.json` `model_type` values it covers.
        model_class: the transformers class that loads and exports it.
        processor_class: its processor class (image processor and tokenizer).
        image_processor_class: its image processor class (preprocessing without weights).
        probabilities: how its zero-shot logits become probabilities: `softmax` over
            classes, or `sigmoid` per class (SigLIP).
        padding: the tokenizer's `padding` as the model card calls it: True (the longest
            prompt) or `"max_length"`.
        text_length: the fixed text length with `"max_length"` padding; None: the text
            tower's context (`max_position_embeddings`), a truncation limit only.
        pooling: where the text tower reads a prompt: `eos` (its end token) or `last` (the
            last position, padding included).
        example: a hub id of the family, for messages and the README.
        text_from_embeddings: the text tower from token embeddings (see the module doc), or
            None where the family cannot take them.
    """

    name: str
    label: str
    model_types: tuple[str, ...]
    model_class: str
    processor_class: str
    image_processor_class: str
    probabilities: str
    padding: bool | str
    text_length: int | None
    pooling: str
    example: str
    text_from_embeddings: Callable[[Any, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor] | None

    def load_model_class(self):
        """The transformers model class (`CLIPModel`, `SiglipModel`, `MetaClip2Model`)."""
        import transformers

        return getattr(transformers, self.model_class)

    def load_processor_class(self):
        import transformers

        return getattr(transformers, self.processor_class)

    def load_image_processor_class(self):
        import transformers

        return getattr(transformers, self.image_processor_class)

    def text_kwargs(self, model) -> dict[str, Any]:
        """The tokenizer arguments for class prompts, as the family's model card tokenises them.

        Args:
            model: the loaded model (its text context length).
        """
        context = int(model.config.text_config.max_position_embeddings)
        length = min(self.text_length, context) if self.text_length else context
        return {"padding": self.padding, "truncation": True, "max_length": length}

    @staticmethod
    def image_parts(model) -> tuple[nn.Module, nn.Module | None]:
        """`(vision tower, image projection or None)`: the embedding is the projection of the
        tower's `pooler_output` (SigLIP: the `pooler_output` itself)."""
        return model.vision_model, visual_projection(model)

    @staticmethod
    def text_parts(model) -> tuple[nn.Module, nn.Module | None]:
        """`(text tower, text projection or None)`, as `image_parts` (SigLIP's text tower
        projects inside, `text_model.head`)."""
        return model.text_model, getattr(model, "text_projection", None)

    @staticmethod
    def token_embedding(model) -> nn.Embedding:
        """The text tower's word embeddings (what prompt learning feeds `text_from_embeddings`)."""
        return model.text_model.embeddings.token_embedding

    @staticmethod
    def embed_dim(model) -> int:
        """The size of the image embedding heads take."""
        projection = visual_projection(model)
        if projection is not None:
            return int(projection.out_features)
        return int(model.config.vision_config.hidden_size)

    @staticmethod
    def lora_targets(names: Sequence[str]) -> str:
        """A peft `target_modules` pattern for the linears `names` of the encoder layers alone.

        peft matches a string by `re.fullmatch` against each module's full name, so nothing
        outside `encoder.layers.N` is adapted: not SigLIP's attention-pooling head (its
        `nn.MultiheadAttention.out_proj` is never called by MHA's forward, and its MLP is not
        an encoder layer), not its text head.

        Args:
            names: any of q_proj, k_proj, v_proj, out_proj, fc1, fc2.
        """
        alternatives = "|".join(re.escape(n) for n in names)
        return rf"(.*\.)?encoder\.layers\.\d+\.(self_attn|mlp)\.({alternatives})"

    def pool_positions(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """Where the text tower reads each tokenised prompt, `(B,)`: the end token (CLIP,
        MetaCLIP 2, as their text models find it) or the last position (SigLIP)."""
        if self.pooling == "last":
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long,
                              device=input_ids.device)
        eos = model.text_model.config.eos_token_id
        if self.name == "clip" and eos == 2:  # CLIP configs from before transformers' PR 24773: the largest id
            return input_ids.to(torch.int).argmax(dim=-1)
        return (input_ids.to(torch.int) == eos).int().argmax(dim=-1)


CLIP = Backbone(
    name="clip", label="CLIP", model_types=("clip",), model_class="CLIPModel", processor_class="CLIPProcessor",
    image_processor_class="CLIPImageProcessor", probabilities="softmax", padding=True, text_length=None,
    pooling="eos", example="openai/clip-vit-base-patch16", text_from_embeddings=_causal_text_from_embeddings,
)
SIGLIP = Backbone(
    name="siglip", label="SigLIP", model_types=("siglip",), model_class="SiglipModel",
    processor_class="SiglipProcessor", image_processor_class="SiglipImageProcessor", probabilities="sigmoid",
    padding="max_length", text_length=SIGLIP_TEXT_LENGTH, pooling="last", example="google/siglip-so400m-patch14-384",
    text_from_embeddings=_bidirectional_text_from_embeddings,
)
METACLIP_2 = Backbone(
    name="metaclip_2", label="MetaCLIP 2", model_types=("metaclip_2",), model_class="MetaClip2Model",
    processor_class="CLIPProcessor", image_processor_class="CLIPImageProcessor", probabilities="softmax",
    padding=True, text_length=None, pooling="eos", example="facebook/metaclip-2-worldwide-huge-quickgelu",
    text_from_embeddings=_causal_text_from_embeddings,
)
BACKBONES: dict[str, Backbone] = {b.name: b for b in (CLIP, SIGLIP, METACLIP_2)}


def supported() -> str:
    """The supported families in words, for messages."""
    return ", ".join(f"{b.label} (model_type {', '.join(b.model_types)}, e.g. {b.example})"
                     for b in BACKBONES.values())


def backbone_for(model_type: str | None, name: str = "the checkpoint") -> Backbone:
    """The family of a `config.json` `model_type`.

    Args:
        model_type: the checkpoint's `model_type`.
        name: how messages name the checkpoint.

    Raises:
        UnsupportedModel: a SigLIP 2 NaFlex checkpoint (`siglip2`), or any other kind; one line.
    """
    if model_type == "siglip2":
        raise UnsupportedModel(
            f"{name} is a SigLIP 2 NaFlex checkpoint (model_type 'siglip2', variable resolution), which clip-lab "
            f"does not support: use a fixed-resolution SigLIP 2 checkpoint such as {NAFLEX_ALTERNATIVE}")
    for backbone in BACKBONES.values():
        if model_type in backbone.model_types:
            return backbone
    raise UnsupportedModel(f"{name} is a {model_type or 'untyped'} model (config.json model_type {model_type!r}), "
                           f"not a contrastive image-text model clip-lab supports: use {supported()}")


def backbone_of(model) -> Backbone:
    """The family of a loaded model (its `config.model_type`)."""
    return backbone_for(getattr(model.config, "model_type", None), type(model).__name__)


def config_backbone(config_file: str | Path, name: str) -> Backbone:
    """The family a `config.json` names, read without transformers.

    Args:
        config_file: the checkpoint's `config.json`.
        name: how messages name the checkpoint.

    Raises:
        UnsupportedModel: see `backbone_for`; also a config.json that is not a JSON object.
    """
    try:
        config = json.loads(Path(config_file).read_text())
    except (OSError, ValueError) as err:
        raise UnsupportedModel(f"{name}: its config.json cannot be read ({err})") from err
    if not isinstance(config, dict):
        raise UnsupportedModel(f"{name}: its config.json is not a JSON object")
    return backbone_for(config.get("model_type"), name)
