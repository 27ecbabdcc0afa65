"""GDA: Gaussian discriminant analysis on CLIP image features, added to zero-shot CLIP.

Paper: Zhengbo Wang, Jian Liang, Lijun Sheng, Ran He, Zilei Wang, Tieniu Tan, "A Hard-to-Beat
Baseline for Training-free CLIP-based Adaptation", ICLR 2024. Published code:
https://github.com/mrflogs/ICLR24 (`main_few_shots.py`, `run`).

Formula. With the class means `mu_k` of the support features and the class-centred features
`Z` (n rows: every support feature minus its class mean), the published shrinkage ("KS")
estimate of the shared precision matrix is

    Sigma^-1 = D * pinv((n - 1) * cov(Z) + tr(cov(Z)) * I)

where `cov` is `torch.cov` (rows are samples; it subtracts the mean of Z, which is zero up to
rounding, and divides by n - 1). With a uniform prior p_k = 1/C:

    W = mu Sigma^-1                          (C, D)
    b_k = log(1/C) - mu_k Sigma^-1 mu_k' / 2
    logits(f) = s * f T' + alpha * (f W' + b)

`s` is `data.logit_scale`. `alpha` is fixed, or searched on val over `DEFAULT_ALPHA_GRID`
= [1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100], the published list (first best on ties, as the published
strict `>` loop).

With `data.views` (V, N, D), the statistics use all V * N view features (the published code
pools its `augment_epoch` = 10 augmented passes; it does not add the un-augmented image). With
one shot per class and no views every centred feature is zero, `cov = 0` and `pinv(0) = 0`, so
W = 0, b is a constant and GDA's predictions are exactly zero-shot CLIP's: `info["note"]` says
so.

Departures from the published code:

* means, centring and scatter in float32 as published; the shrinkage, inverse, W and b in float64;
* the inverse: Cholesky in float64 (`cholesky_inverse`) instead of `pinv` (SVD) in float32; the
  matrix is symmetric positive definite whenever `tr(cov) > 0`, so both give the same inverse up
  to rounding, and Cholesky is ~10x faster (falls back to `pinv` if Cholesky fails; the exact
  zero matrix of the one-shot case gives zero, as `pinv` does);
* `s = data.logit_scale` (published: the constant 100);
* views are the caller's L2-normalised augmented features (published: 10 random-resized-crop /
  flip passes through the image encoder, each L2-normalised);
* the val split is whatever `data.val` is (published: the dataset's val split, except ImageNet
  where the published code uses the TEST split as val).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from clip_utils.methods.cached import Option, cached_method
from clip_utils.model.feature_fit import FeatureData, Fitted, accuracy, zeroshot_logits
from clip_utils.registry import register
from clip_utils.runtime.options import positive_float

METHOD = "gda"

DEFAULT_ALPHA_GRID: list[float] = [0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0]
"""The published alpha list (`main_few_shots.py`)."""

ONE_SHOT_NOTE = (
    "every class has a single support feature and there are no views: the class-centred features "
    "are all zero, cov = 0, pinv(0) = 0, so W = 0 and b is constant: GDA equals zero-shot CLIP"
)


class GDA(nn.Module):
    """`s * f T' + alpha * (f W' + b)`.

    Args:
        n_classes: C.
        dim: D.
        logit_scale: s.
        alpha: weight of the GDA logits.
    """

    def __init__(
        self, n_classes: int, dim: int, logit_scale: float = 100.0, alpha: float = 1.0
    ):
        super().__init__()
        self.logit_scale = float(logit_scale)
        self.alpha = float(alpha)
        self.register_buffer("text", torch.zeros(n_classes, dim))
        self.register_buffer("weight", torch.zeros(n_classes, dim))
        self.register_buffer("bias", torch.zeros(n_classes))

    def linear_head(self) -> nn.Linear:
        """The same logits as one linear layer: `f (s T + alpha W)' + alpha b`."""
        head = nn.Linear(self.weight.shape[1], self.weight.shape[0])
        with torch.no_grad():
            head.weight.copy_(self.logit_scale * self.text + self.alpha * self.weight)
            head.bias.copy_(self.alpha * self.bias)
        return head

    def gda_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        return (
            self.logit_scale * x @ self.text.t() + self.alpha * self.gda_logits(x)
        ).float()


def statistics_features(data: FeatureData) -> tuple[torch.Tensor, torch.Tensor]:
    """The features the class statistics use: every view if `data.views`, else the support."""
    if data.views is None:
        return data.support.float(), data.support_labels
    v, n, d = data.views.shape
    return data.views.float().reshape(v * n, d), data.support_labels.repeat(v)


def gda_parameters(
    feats: torch.Tensor, labels: torch.Tensor, n_classes: int
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """`(W, b, info)` of the published estimator, from `(n, D)` features and labels."""
    n, d = feats.shape
    counts = torch.bincount(labels, minlength=n_classes)
    if bool((counts == 0).any()):
        raise ValueError(
            f"GDA needs at least one support feature per class; missing {torch.nonzero(counts == 0).flatten().tolist()}"
        )
    x = feats.float()
    mus = (
        torch.zeros(n_classes, d).index_add_(0, labels, x) / counts.unsqueeze(1).float()
    )  # (C, D)
    z = x - mus.index_select(0, labels)
    z -= z.mean(0, keepdim=True)  # torch.cov's centring (zero up to rounding)
    scatter = (z.t() @ z).double()  # (n - 1) * cov, float32 products as published
    mus = mus.double()
    trace = float(torch.diagonal(scatter).sum()) / (n - 1)
    info: dict = {"n_stat_features": n, "cov_trace": trace}
    if trace == 0.0:
        precision = torch.zeros(d, d, dtype=torch.float64)  # pinv(0) = 0
        info["inverse"] = "zero matrix (pinv of 0)"
    else:
        mat = scatter + trace * torch.eye(d, dtype=torch.float64)
        chol, err = torch.linalg.cholesky_ex(mat)
        if int(err) == 0:
            precision = d * torch.cholesky_inverse(chol)
            info["inverse"] = "cholesky"
        else:
            precision = d * torch.linalg.pinv(mat, hermitian=True)
            info["inverse"] = "pinv"
    w = mus @ precision  # precision is symmetric: (mu Sigma^-1)
    b = math.log(1.0 / n_classes) - 0.5 * (w * mus).sum(1)
    return w.float(), b.float(), info


def fit(
    data: FeatureData,
    *,
    alpha: float | None = None,
    alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    seed: int = 0,
) -> Fitted:
    """Training-free GDA.

    Args:
        data: the cached features.
        alpha: fixed weight of the GDA logits; `None` (default) searches it on val.
        alpha_grid: the search list (default: the published `DEFAULT_ALPHA_GRID`).
        seed: unused (deterministic); kept for a uniform signature.
    """
    del seed
    feats, labels = statistics_features(data)
    w, b, info = gda_parameters(feats, labels, data.n_classes)
    one_shot = data.views is None and bool(
        (torch.bincount(labels, minlength=data.n_classes) <= 1).all()
    )
    if info["cov_trace"] == 0.0:
        info["note"] = (
            ONE_SHOT_NOTE
            if one_shot
            else "all class-centred features are zero: GDA equals zero-shot CLIP"
        )

    val = data.val.float()
    zs = zeroshot_logits(val, data).float()
    lin = torch.addmm(b, val, w.t())
    if alpha is None:
        alphas = torch.tensor([float(a) for a in alpha_grid], dtype=zs.dtype)
        preds = (zs.unsqueeze(0) + alphas.view(-1, 1, 1) * lin.unsqueeze(0)).argmax(
            -1
        )  # (A, M)
        correct = (preds == data.val_labels.unsqueeze(0)).sum(1)
        best = int(
            torch.argmax(correct)
        )  # first best, as the published strict `>` loop
        chosen = float(alpha_grid[best])
        info["searched"] = ["alpha"]
        info["alpha_val_acc"] = {
            str(float(a)): int(c) / len(data.val_labels)
            for a, c in zip(alpha_grid, correct)
        }
    else:
        chosen = float(alpha)
        info["searched"] = []

    config = {
        "n_classes": data.n_classes,
        "dim": data.dim,
        "logit_scale": float(data.logit_scale),
        "alpha": chosen,
    }
    module = GDA(**config)
    with torch.no_grad():
        module.text.copy_(data.text.float())
        module.weight.copy_(w)
        module.bias.copy_(b)
        info["alpha"] = chosen
        info["val_acc"] = accuracy(module(data.val), data.val_labels)
        info["zeroshot_val_acc"] = accuracy(zs, data.val_labels)
    info["used_views"] = data.views is not None
    return Fitted(module=module.eval(), config=config, info=info, curves=[])


register(cached_method(
    name=METHOD, label="GDA", command="gda", order=32, fit=fit, build=GDA, linear=True,
    description="GDA: Gaussian discriminant analysis on the support features beside the zero-shot classifier "
                "(training-free)",
    options=(Option("alpha", positive_float, "the GDA logits' weight (default: searched on validation)"),),
))
