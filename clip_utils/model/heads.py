"""Head algebra and the classifier every method ends in: pure building blocks, no I/O.

    head = zeroshot_head(text_classifier, logit_scale(model), logit_bias(model))  # zero-shot, a linear layer
    classifier = ClipClassifier(model.vision_model, visual_projection(model), head)
    probs = probabilities(classifier(pixels), classifier.probabilities)

Zero-shot, the linear probe and LoRA all predict through `ClipClassifier` (vision tower,
projection, linear head on the normalised embedding), so prediction code never cares which
method made it. The probe and LoRA train their heads in head units (`head_units`: standard
units scaled to the embedding size; `standardized_head`, `StandardizedHead`) and save the
equivalent head on raw embeddings (`unstandardized_head`).

SigLIP has no projection (its vision tower's pooled output is the embedding: the projection
is None), and its zero-shot logits carry a bias and become probabilities by a sigmoid per
class (`ClipClassifier.probabilities`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


PROBABILITIES = ("softmax", "sigmoid")


def logit_scale(model) -> float:
    """CLIP's learned temperature, `exp(model.logit_scale)` (100 for OpenAI CLIP)."""
    return float(model.logit_scale.detach().float().exp().item())


def logit_bias(model) -> float:
    """SigLIP's learned logit bias (`logits = scale * cos + bias`); 0 for a model without one."""
    bias = getattr(model, "logit_bias", None)
    return 0.0 if bias is None else float(bias.detach().float().item())


def visual_projection(model) -> nn.Module | None:
    """The image projection after the vision tower's pooled output, or None (SigLIP has none)."""
    return getattr(model, "visual_projection", None)


def image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings (vision tower, then projection where there is one).

    Args:
        model: a `CLIPModel`, `SiglipModel`, `MetaClip2Model` (or anything with
            `vision_model` and, unless it is None or absent, `visual_projection`).
        pixel_values: `(B, 3, H, W)` preprocessed images.
    """
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    projection = visual_projection(model)
    return F.normalize(pooled if projection is None else projection(pooled), dim=-1)


def encoder_dtype(model) -> torch.dtype:
    """The dtype images go into the encoder in: the projection's, else the vision tower's."""
    projection = visual_projection(model)
    if projection is not None:
        return projection.weight.dtype
    return next(model.vision_model.parameters()).dtype


def probabilities(logits: torch.Tensor, kind: str = "softmax") -> torch.Tensor:
    """Class probabilities from logits: `softmax` over classes, or `sigmoid` per class (SigLIP's
    zero-shot: each class scored on its own, so they need not sum to 1).

    Args:
        logits: `(..., C)` logits.
        kind: one of `PROBABILITIES`.
    """
    if kind == "sigmoid":
        return logits.float().sigmoid()
    if kind != "softmax":
        raise ValueError(f"unknown probability kind {kind!r}: {', '.join(PROBABILITIES)}")
    return logits.float().softmax(dim=-1)


class ClipClassifier(nn.Module):
    """CLIP's vision tower and projection with a head on the normalised embedding.

    The same head serves the linear probe (trained on cached embeddings) and LoRA (trained
    through the adapted tower), so a probe and a LoRA model are scored identically; the
    methods fitted on cached features put their own module there (a cache model, an MLP).

    Args:
        vision_model: CLIP vision transformer (possibly wrapped by peft).
        visual_projection: CLIP's image projection; None where the family has none (SigLIP:
            the tower's pooled output is the embedding).
        head: a module from the normalised embedding to class logits (a linear layer for most
            methods); float32 even beside an fp16 encoder (the embedding is cast to its dtype).
        probabilities: how the logits become the probabilities shown to users: `softmax`
            (heads trained with cross-entropy, CLIP's zero-shot) or `sigmoid` (SigLIP's
            zero-shot, whose head carries the model's own scale and bias).
    """

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module | None, head: nn.Module,
                 probabilities: str = "softmax") -> None:
        super().__init__()
        if probabilities not in PROBABILITIES:
            raise ValueError(f"unknown probability kind {probabilities!r}: {', '.join(PROBABILITIES)}")
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.head = head
        self.probabilities = probabilities

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return image_embeddings(self, pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeddings = self.embed(pixel_values)
        # The head runs in its own dtype even under autocast: bf16 logits (8-bit mantissa)
        # would flip close calls between classes, and this matmul is too small to gain.
        with torch.autocast(embeddings.device.type, enabled=False):
            return self.head(embeddings.to(self.head_dtype))

    @property
    def head_dtype(self) -> torch.dtype:
        """The head's dtype (its first parameter's or buffer's)."""
        return next(iter([*self.head.parameters(), *self.head.buffers()])).dtype

    @property
    def encoder_dtype(self) -> torch.dtype:
        """The dtype images go in with (the encoder's: fp16 on CUDA)."""
        return encoder_dtype(self)


def zeroshot_head(text_classifier: torch.Tensor, logit_scale: float, logit_bias: float = 0.0) -> nn.Linear:
    """A linear head initialised to the zero-shot classifier.

    Starting from the text embeddings (times CLIP's logit scale) means training begins at
    zero-shot accuracy instead of chance, which converges faster and generalises better on
    the few examples per class these datasets have.

    Args:
        text_classifier: `(D, C)` normalised class embeddings.
        logit_scale: CLIP's learned temperature (exp of `model.logit_scale`).
        logit_bias: SigLIP's logit bias, in every class's bias (0: CLIP), so the head's
            logits are the model's own (`sigmoid` of them is SigLIP's probability).
    """
    dim, n_classes = text_classifier.shape
    head = nn.Linear(dim, n_classes)
    with torch.no_grad():
        head.weight.copy_(text_classifier.T.float() * logit_scale)
        head.bias.fill_(float(logit_bias))
    return head


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def image_encoder_parameters(model) -> int:
    """Parameters of the image side: the vision tower and its projection (where there is one)."""
    projection = visual_projection(model)
    return count_parameters(model.vision_model)[1] + (0 if projection is None else count_parameters(projection)[1])


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


# The embedding size at which head units are plain standard units (ViT-L/14's projection).
UNIT_DIM = 768


def head_units(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """`(mean, scale)` of the units heads train in: `(x - mean) / scale` is standard units times `UNIT_DIM / D`.

    In standard units an Adam step of size lr on every weight moves a logit by about
    lr * D (one term per dimension), so the same learning rate would be 48 times gentler on
    a 16-dimensional model than on ViT-L/14's 768 dimensions. Scaling the standardised
    features by `UNIT_DIM / D` makes a learning rate mean the same step for any CLIP (for
    ViT-L/14 these are exactly standard units); the tiny test model then trains with the
    defaults the real one uses.

    Args:
        x: `(N, D)` training features.
        eps: floor on the std, for constant dimensions.
    """
    mean, std = feature_scaling(x, eps)
    return mean, std * (x.shape[1] / UNIT_DIM)


class StandardizedHead(nn.Module):
    """A linear head that trains on `(x - mean) / scale` but stands where a raw-unit head does.

    `ClipClassifier` feeds it raw embeddings; `folded()` is the equivalent `nn.Linear` on them,
    what checkpoints hold.

    Args:
        head: the head on raw embeddings to start from.
        mean: per-dimension mean of the training embeddings.
        scale: per-dimension scale (`head_units`).
    """

    def __init__(self, head: nn.Linear, mean: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float().to(head.weight.device))
        self.register_buffer("scale", scale.float().to(head.weight.device))
        self.linear = standardized_head(head.float(), self.mean, self.scale)

    @property
    def weight(self) -> torch.Tensor:
        # ClipClassifier reads the head's dtype from its weight.
        return self.linear.weight

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.scale)

    def folded(self) -> nn.Linear:
        """The equivalent head on raw embeddings."""
        return unstandardized_head(self.linear, self.mean, self.scale)


class FrozenEncoderProbe(nn.Module):
    """A linear head trained on a frozen CLIP encoder's embeddings of images seen on the fly.

    The encoder runs under `no_grad` (no activations kept for backward), in eval mode and
    outside autocast, in its own dtype: it computes exactly what encoded the cached features
    the head is validated and tested on, instead of a bf16 approximation of them.

    Args:
        clip: anything `image_embeddings` accepts (`vision_model`, `visual_projection` or none).
        head: the trained linear layer, on embeddings in head units (see `head_units`).
        mean: per-dimension mean of the training embeddings.
        std: their per-dimension scale (`head_units`).
    """

    def __init__(self, clip: nn.Module, head: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.vision_model = clip.vision_model
        self.visual_projection = visual_projection(clip)
        self.head = head
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())
        self.requires_grad_(False)
        head.requires_grad_(True)

    def train(self, mode: bool = True) -> FrozenEncoderProbe:
        super().train(mode)
        self.vision_model.eval()
        if self.visual_projection is not None:
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
