"""LoRA adapters on a CLIP encoder with peft, and the exact count of what they train.

    vision = add_lora(model.vision_model, LoraSettings(rank=8, targets=("q_proj", "v_proj")))
    lora_trainable_params(model.config.vision_config, LoraSettings(), n_classes=102, embed_dim=768)

Pure model code: no datasets, no files. The LoRA method (`methods.lora`) trains with these.
"""

from __future__ import annotations

import contextlib
import warnings

from torch import nn

from clip_utils.config import LoraSettings
from clip_utils.model.backbones import Backbone


@contextlib.contextmanager
def quiet_peft():
    """Silence a FutureWarning peft triggers on every adapter it builds or loads.

    peft 0.21 probes `model.is_gradient_checkpointing`, which transformers 5 deprecates;
    the warning is about peft's code, not the user's, and there is nothing to act on.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def linear_shapes(tower_config) -> dict[str, tuple[int, int]]:
    """`(d_in, d_out)` of each linear layer name in one encoder layer (either tower, any family).

    Args:
        tower_config: a `CLIPVisionConfig`, `CLIPTextConfig` (or SigLIP's, MetaCLIP 2's):
            hidden_size, intermediate_size.
    """
    hidden, mlp = tower_config.hidden_size, tower_config.intermediate_size
    return {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
            "out_proj": (hidden, hidden), "fc1": (hidden, mlp), "fc2": (mlp, hidden)}


def adapter_params(tower_config, settings: LoraSettings) -> int:
    """LoRA parameters in one tower: `r * (d_in + d_out)` per target, per layer.

    Args:
        tower_config: the tower's `CLIPVisionConfig` or `CLIPTextConfig`.
        settings: rank and targets.
    """
    shapes = linear_shapes(tower_config)
    return tower_config.num_hidden_layers * sum(settings.rank * sum(shapes[t]) for t in settings.targets)


def lora_trainable_params(vision_config, settings: LoraSettings, n_classes: int, embed_dim: int,
                          text_config=None) -> int:
    """Exact trainable parameter count of a LoRA run: adapters of each adapted tower, plus the
    linear head when only the vision tower is adapted (otherwise the text tower is the classifier).

    Each adapted layer gains `A` (r x d_in) and `B` (d_out x r): `r * (d_in + d_out)`.

    Args:
        vision_config: the `CLIPVisionConfig`.
        settings: rank, targets and encoders.
        n_classes: head outputs.
        embed_dim: head inputs (CLIP's projection dimension).
        text_config: the `CLIPTextConfig` (needed when `settings` adapts the text tower).
    """
    count = adapter_params(vision_config, settings) if settings.adapts_vision else 0
    if settings.adapts_text:
        if text_config is None:
            raise ValueError(f"LoRA on the {settings.encoders} encoders: the text config is needed to count")
        count += adapter_params(text_config, settings)
    else:
        count += embed_dim * n_classes + n_classes
    return count


def add_lora(vision: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap a CLIP encoder with peft LoRA adapters (base weights frozen), in its encoder layers only.

    The targets go to peft as a pattern over `encoder.layers.N` (`Backbone.lora_targets`),
    never as bare names: SigLIP's vision tower ends in an attention-pooling head whose
    `nn.MultiheadAttention` holds an `out_proj` that peft would wrap but MHA's forward never
    calls (an adapter that trains nothing, yet counted), and an MLP with `fc1`/`fc2`. Every
    family's encoder layers use the same names, so one pattern serves CLIP, SigLIP and MetaCLIP 2.

    Args:
        vision: the model's `vision_model` or `text_model` (every family, either tower: the
            same layer names).
        settings: rank, alpha, dropout, targets, gradient checkpointing.
    """
    from peft import LoraConfig, get_peft_model

    if settings.grad_checkpointing:
        # Non-reentrant checkpointing lets gradients reach the adapters even though the frozen
        # embeddings' outputs do not require grad (the reentrant variant would drop them).
        enable = getattr(vision, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            vision.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=Backbone.lora_targets(settings.targets), bias="none")
    with quiet_peft():
        return get_peft_model(vision, config)
