"""Synthetic cached-feature data for the few-shot adapter tests.

`make_data` draws C random unit class prototypes in D dimensions, a text classifier whose
rows are the prototypes plus noise (zero-shot informative but imperfect: about 40-70 %
accuracy at the defaults with C=10, D=32), and image features that are the prototypes plus
larger noise, all L2-normalised. Labels cycle through the classes, so every split is balanced
(to within one sample). Deterministic for a seed; no global RNG is touched.
"""

from __future__ import annotations

import torch

from clip_utils.model.feature_fit import FeatureData


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def make_data(
    n_classes: int,
    dim: int,
    shots: int,
    n_val: int,
    n_test: int,
    seed: int,
    *,
    text_noise: float = 1.5,
    image_noise: float = 1.75,
    n_views: int = 0,
    view_noise: float = 0.5,
    logit_scale: float = 100.0,
) -> tuple[FeatureData, torch.Tensor, torch.Tensor]:
    """A synthetic `FeatureData` and a held-out test split.

    Args:
        n_classes: C.
        dim: D.
        shots: support images per class (N = C * shots).
        n_val: validation images in all (labels `arange(n_val) % C`).
        n_test: test images in all (labels `arange(n_test) % C`).
        seed: the seed of a private `torch.Generator`.
        text_noise: norm of the (isotropic) noise added to each prototype to make its text row.
        image_noise: norm of the noise added to the class prototype to make an image feature.
        n_views: if > 0, also `views` of shape `(n_views, N, D)`: each support image's
            un-normalised feature plus noise of norm `view_noise`, re-normalised.
        view_noise: see `n_views`.
        logit_scale: the `FeatureData.logit_scale`.

    Returns:
        `(data, test_features, test_labels)`, float32 / int64.
    """
    g = torch.Generator().manual_seed(seed)
    protos = _unit(torch.randn(n_classes, dim, generator=g))
    text = _unit(protos + text_noise * torch.randn(n_classes, dim, generator=g) / dim**0.5)

    def images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % n_classes
        raw = protos[labels] + image_noise * torch.randn(n, dim, generator=g) / dim**0.5
        return raw, labels

    support_raw, support_labels = images(n_classes * shots)
    val_raw, val_labels = images(n_val)
    test_raw, test_labels = images(n_test)
    views = None
    if n_views > 0:
        noise = torch.randn(n_views, *support_raw.shape, generator=g) / dim**0.5
        views = _unit(support_raw.unsqueeze(0) + view_noise * noise).contiguous()
    data = FeatureData(
        support=_unit(support_raw).contiguous(),
        support_labels=support_labels,
        val=_unit(val_raw).contiguous(),
        val_labels=val_labels,
        text=text.contiguous(),
        logit_scale=float(logit_scale),
        views=views,
    )
    return data, _unit(test_raw).contiguous(), test_labels
