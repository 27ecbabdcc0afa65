"""Tip-Adapter's key-value cache model, and the exact search of its two hyper-parameters.

    module = build(data, keys, alpha=1.0, beta=5.5)          # s f T' + alpha exp(-beta (1 - f K')) L
    (alpha, beta), table = search_alpha_beta(data, keys, DEFAULT_ALPHA_GRID, DEFAULT_BETA_GRID)

Shared by the training-free Tip-Adapter and Tip-Adapter-F (`methods.tip_adapter`,
`methods.tip_adapter_f`), which trains the keys; the formulas, the published grids and where
the defaults depart from them are in `methods.tip_adapter`'s docstring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from clip_utils.model.feature_fit import FeatureData, zeroshot_logits


def published_grid(scale: float, step: int) -> list[float]:
    """The published `search_hp` grid: `[0.1 + i * (scale - 0.1) / step for i in range(step)]`."""
    return [i * (scale - 0.1) / step + 0.1 for i in range(step)]


DEFAULT_BETA_GRID: list[float] = published_grid(12.0, 50)
"""Default beta grid: 0.1 ... 11.76 in 50 steps (published form, median published scale)."""

DEFAULT_ALPHA_GRID: list[float] = published_grid(10.0, 20)
"""Default alpha grid: 0.1 ... 9.505 in 20 steps (published form and step, median published scale)."""


class TipAdapter(nn.Module):
    """`s * f T' + alpha * exp(-beta * (1 - f K')) V` with keys `K` (a Parameter) and values `V`.

    Args:
        n_classes: C.
        n_keys: N, the number of cached support images.
        dim: D.
        logit_scale: s.
        alpha: residual ratio.
        beta: sharpness.
    """

    def __init__(
        self,
        n_classes: int,
        n_keys: int,
        dim: int,
        logit_scale: float = 100.0,
        alpha: float = 1.0,
        beta: float = 1.0,
    ):
        super().__init__()
        self.logit_scale = float(logit_scale)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.keys = nn.Parameter(torch.zeros(n_keys, dim))
        self.register_buffer("values", torch.zeros(n_keys, n_classes))
        self.register_buffer("text", torch.zeros(n_classes, dim))

    def cache_logits(self, x: torch.Tensor) -> torch.Tensor:
        affinity = x @ self.keys.t()
        return torch.exp(self.beta * (affinity - 1.0)) @ self.values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.keys.dtype)
        return (
            self.logit_scale * x @ self.text.t() + self.alpha * self.cache_logits(x)
        ).float()


def cache_keys(data: FeatureData) -> tuple[torch.Tensor, str]:
    """The `(N, D)` cache keys and how they were made: the support features, or the
    re-normalised mean over `data.views` of each support image."""
    if data.views is None:
        return data.support.float().clone(), "support features"
    keys = data.views.float().mean(0)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    return keys, f"mean of {data.views.shape[0]} views, re-normalised"


def interval_counts(
    zs: torch.Tensor, extra: torch.Tensor, labels: torch.Tensor, alphas: torch.Tensor
) -> torch.Tensor:
    """Number of rows whose label wins `argmax(zs + alpha * extra)`, for every alpha at once.

    For image m with label y, the label wins iff `(zs_y - zs_c) + alpha (extra_y - extra_c) >= 0`
    for every c: an interval `[lo, hi]` of alpha (empty if some c with `extra_c == extra_y` has
    `zs_c > zs_y`). Ties count as correct.

    Args:
        zs: `(M, C)` logits that do not depend on alpha.
        extra: `(M, C)` logits multiplied by alpha.
        labels: `(M,)`.
        alphas: `(A,)`.

    Returns:
        `(A,)` int64 counts.
    """
    idx = labels.unsqueeze(1)
    dz = zs.gather(1, idx) - zs
    dk = extra.gather(1, idx) - extra
    ratio = -dz / dk
    lo = torch.where(dk > 0, ratio, -math.inf).amax(1)
    hi = torch.where(dk < 0, ratio, math.inf).amin(1)
    never = ((dk == 0) & (dz < 0)).any(1)
    a = alphas.to(zs.dtype).unsqueeze(0)
    ok = (a >= lo.unsqueeze(1)) & (a <= hi.unsqueeze(1)) & ~never.unsqueeze(1)
    return ok.sum(0)


def search_table(
    zs: torch.Tensor,
    affinity: torch.Tensor,
    key_labels: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    betas: Sequence[float],
    alphas: Sequence[float],
) -> torch.Tensor:
    """Correct-prediction counts `(len(betas), len(alphas))` of `zs + alpha * exp(-beta (1 - A)) L`.

    Args:
        zs: `(M, C)` zero-shot logits of the scored features.
        affinity: `(M, N)` their cosine similarity to the N keys.
        key_labels: `(N,)` the keys' labels (L is their one-hot matrix).
        labels: `(M,)` the scored features' labels.
    """
    order = torch.argsort(key_labels, stable=True)
    lengths = torch.bincount(key_labels, minlength=n_classes)
    shifted = (
        (affinity[:, order] - 1.0).t().contiguous()
    )  # (N, M), keys grouped by class
    buf = torch.empty_like(shifted)
    alpha_t = torch.tensor(list(alphas), dtype=zs.dtype)
    table = torch.empty(len(betas), len(alpha_t), dtype=torch.int64)
    for i, beta in enumerate(betas):
        torch.mul(shifted, float(beta), out=buf).exp_()
        cache = torch.segment_reduce(
            buf, "sum", lengths=lengths, axis=0, unsafe=True
        ).t()  # (M, C)
        table[i] = interval_counts(zs, cache, labels, alpha_t)
    return table


def pick(
    table: torch.Tensor, betas: Sequence[float], alphas: Sequence[float]
) -> tuple[float, float, int]:
    """The first (beta-major) best point of a `search_table`: `(beta, alpha, count)`."""
    flat = int(torch.argmax(table.flatten()))
    i, j = divmod(flat, table.shape[1])
    return float(betas[i]), float(alphas[j]), int(table[i, j])


def search_alpha_beta(
    data: FeatureData,
    keys: torch.Tensor,
    alpha: float | None,
    beta: float | None,
    alpha_grid: Sequence[float],
    beta_grid: Sequence[float],
) -> tuple[float, float, dict]:
    """Fix or search (alpha, beta) on `data.val` for the given keys; returns them and search info."""
    if alpha is not None and beta is not None:
        return float(alpha), float(beta), {"searched": []}
    betas = [float(beta)] if beta is not None else [float(b) for b in beta_grid]
    alphas = [float(alpha)] if alpha is not None else [float(a) for a in alpha_grid]
    val = data.val.float()
    with torch.no_grad():
        table = search_table(
            zeroshot_logits(val, data).float(),
            val @ keys.detach().t(),
            data.support_labels,
            data.val_labels,
            data.n_classes,
            betas,
            alphas,
        )
    b, a, count = pick(table, betas, alphas)
    searched = [n for n, v in (("beta", beta), ("alpha", alpha)) if v is None]
    info = {
        "searched": searched,
        "grid_size": [len(betas), len(alphas)],
        "beta_range": [min(betas), max(betas)],
        "alpha_range": [min(alphas), max(alphas)],
        "search_val_acc": count / len(data.val_labels),
    }
    return a, b, info


def build(
    data: FeatureData, keys: torch.Tensor, alpha: float, beta: float
) -> tuple[TipAdapter, dict]:
    """A `TipAdapter` with the given keys and the support labels as values, and its config."""
    config = {
        "n_classes": data.n_classes,
        "n_keys": int(keys.shape[0]),
        "dim": data.dim,
        "logit_scale": float(data.logit_scale),
        "alpha": float(alpha),
        "beta": float(beta),
    }
    module = TipAdapter(**config)
    with torch.no_grad():
        module.keys.copy_(keys)
        module.values.copy_(data.one_hot())
        module.text.copy_(data.text.float())
    module.keys.requires_grad_(False)
    return module.eval(), config
