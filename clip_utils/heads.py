"""Head algebra and the classifier every method ends in: pure building blocks, no I/O.

    head = zeroshot_head(text_classifier, logit_scale(model))      # zero-shot as a linear layer
    classifier = ClipClassifier(model.vision_model, model.visual_projection, head)
    probs = classifier(pixels).softmax(-1)

Zero-shot, the linear probe and LoRA all predict through `ClipClassifier` (vision tower,
projection, linear head on the normalised embedding), so prediction code never cares which
method made it. The probe trains its head in standardised feature units
(`feature_scaling`, `standardized_head`) and saves the equivalent head on raw embeddings
(`unstandardized_head`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def logit_scale(model) -> float:
    """CLIP's learned temperature, `exp(model.logit_scale)` (100 for OpenAI CLIP)."""
    return float(model.logit_scale.detach().float().exp().item())


def image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised CLIP image embeddings (vision tower, then projection).

    Args:
        model: a `CLIPModel` (or anything with `vision_model` and `visual_projection`).
        pixel_values: `(B, 3, H, W)` preprocessed images.
    """
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    return F.normalize(model.visual_projection(pooled), dim=-1)


class ClipClassifier(nn.Module):
    """CLIP's vision tower and projection with a linear head on the normalised embedding.

    The same head serves the linear probe (trained on cached embeddings) and LoRA (trained
    through the adapted tower), so a probe and a LoRA model are scored identically.

    Args:
        vision_model: CLIP vision transformer (possibly wrapped by peft).
        visual_projection: CLIP's image projection.
        head: linear layer from the projection dimension to the classes; float32 even beside
            an fp16 encoder (the embedding is cast to the head's dtype).
    """

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.head = head

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return image_embeddings(self, pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeddings = self.embed(pixel_values)
        # The head runs in its own dtype even under autocast: bf16 logits (8-bit mantissa)
        # would flip close calls between classes, and this matmul is too small to gain.
        with torch.autocast(embeddings.device.type, enabled=False):
            return self.head(embeddings.to(self.head.weight.dtype))


def zeroshot_head(text_classifier: torch.Tensor, logit_scale: float) -> nn.Linear:
    """A linear head initialised to the zero-shot classifier.

    Starting from the text embeddings (times CLIP's logit scale) means training begins at
    zero-shot accuracy instead of chance, which converges faster and generalises better on
    the few examples per class these datasets have.

    Args:
        text_classifier: `(D, C)` normalised class embeddings.
        logit_scale: CLIP's learned temperature (exp of `model.logit_scale`).
    """
    dim, n_classes = text_classifier.shape
    head = nn.Linear(dim, n_classes)
    with torch.no_grad():
        head.weight.copy_(text_classifier.T.float() * logit_scale)
        head.bias.zero_()
    return head


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def feature_scaling(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of training features, for training the probe in standard units.

    CLIP embeddings are anisotropic (every image shares a large common component, and the
    per-dimension spread is a few hundredths), so plain gradient steps on a head over raw
    embeddings barely move its decisions. In standardised coordinates the same optimiser
    learns in a few epochs; the head is folded back afterwards (`unstandardized_head`).

    Args:
        x: `(N, D)` training features.
        eps: floor on the std, for constant dimensions.
    """
    return x.mean(0), x.std(0).clamp_min(eps)


class FrozenEncoderProbe(nn.Module):
    """A linear head trained on a frozen CLIP encoder's embeddings of images seen on the fly.

    The encoder runs under `no_grad` (no activations kept for backward), in eval mode and
    outside autocast, in its own dtype: it computes exactly what encoded the cached features
    the head is validated and tested on, instead of a bf16 approximation of them.

    Args:
        clip: anything `image_embeddings` accepts (`vision_model`, `visual_projection`).
        head: the trained linear layer, on embeddings in standard units (see `feature_scaling`).
        mean: per-dimension mean of the training embeddings.
        std: their per-dimension standard deviation.
    """

    def __init__(self, clip: nn.Module, head: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection
        self.head = head
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())
        self.requires_grad_(False)
        head.requires_grad_(True)

    def train(self, mode: bool = True) -> FrozenEncoderProbe:
        super().train(mode)
        self.vision_model.eval()
        self.visual_projection.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(pixel_values.device.type, enabled=False):
            embeddings = image_embeddings(self, pixel_values)
        return self.head((embeddings.float() - self.mean) / self.std)


@torch.no_grad()
def standardized_head(head: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> nn.Linear:
    """The head on `(x - mean) / std` that computes exactly what `head` computes on `x`."""
    out = nn.Linear(head.in_features, head.out_features).to(head.weight.device)
    out.weight.copy_(head.weight * std)
    out.bias.copy_(head.bias + head.weight @ mean)
    return out


@torch.no_grad()
def unstandardized_head(head: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> nn.Linear:
    """The head on raw `x` that computes what `head` computes on `(x - mean) / std`."""
    out = nn.Linear(head.in_features, head.out_features).to(head.weight.device)
    out.weight.copy_(head.weight / std)
    out.bias.copy_(head.bias - (head.weight / std) @ mean)
    return out
