"""LP++: a linear probe whose class weights blend visual prototypes and text embeddings.

Paper: Yunshi Huang, Fereshteh Shakeri, Jose Dolz, Malik Boudiaf, Houda Bahig, Ismail Ben Ayed,
"LP++: A Surprisingly Strong Linear Probe for Few-Shot CLIP", CVPR 2024. Published code:
https://github.com/FereshteShakeri/FewShot-CLIP-Strong-Baseline (`methods/linear_probe_p2.py`,
`methods/utils.py`, `configs/base.yaml`).

Formula (no logit scale, as published):

    logits(f) = f (w_k + alpha_k t_k)' + b_k

with visual weights `w` (C, D), biases `b` (C,), per-class blending `alpha` (C,) and the fixed text
rows `t_k`. The loss is the mean cross-entropy over the whole support set (full batch).

Optimisation, following the published code (block majorise-minimise with data-derived steps,
no learning-rate search):

* `w` initialised at the per-class SUM of the support features (the published
  `compute_centroids` returns `one_hot' z`; the division by the class count is commented out),
  i.e. K times the class mean at K shots; `w_init="mean"` gives the class means instead;
* `b` initialised as `nn.Linear`'s default, U(-1/sqrt(D), 1/sqrt(D)), from the seeded generator;
* `alpha` initialised at the same value for every class: `250 * mean_k(mean_{i: y_i = k} f_i t_k')`
  (published `250 / shots * (alpha_tilde * shots)`: the shots cancel);
* step for (w, b): `lr_w = 4 N / lambda_max(F' F)` (published `calculate_lr_w`, with an exact
  symmetric eigen-solver), SGD with momentum 0.9 on (w, b), one full-batch step per epoch;
* step for alpha: `lr_alpha = N / (4 max_k sum_i (f_i t_k')^2)` (published `calculate_lr_alpha`);
  alpha takes a plain gradient step every `alpha_every` = 10 epochs (after the (w, b) step of
  that epoch). Published quirk, kept by default: `alpha.grad` is never zeroed (alpha is not in
  the optimizer), so each alpha step uses the gradient ACCUMULATED over all epochs so far;
  `accumulate_alpha_grad=False` uses the current epoch's gradient only;
* 300 epochs (`configs/base.yaml` `train_epoch`); after every epoch the model is scored on val
  and the best epoch is kept (`>=`: the LAST best on ties, as published).

Curves: one dict per epoch: `epoch` (1-based), `train_loss` (the full-batch loss at the start of
the epoch's step, as the published `loss.item()`), `val_loss`, `val_acc`, `seconds` (wall-clock
since training started). `info["best_epoch"]` uses the same numbering.

Departures from the published code:

* training features: the un-augmented support features (`data.support`); published: one
  random-resized-crop / flip view per image, extracted once per task (`data.views` is not used);
* float32 (published: the CLIP model's dtype, fp16 on GPU) and exact gradients written out in
  closed form (softmax minus one-hot) instead of autograd: the same updates;
* the number of classes is `data.n_classes` (published `N / shots`);
* the val split is whatever `data.val` is (published: a K-shot-per-class sample of the dataset's
  val split, drawn per task);
* the model kept is the best-val epoch's (the published code keeps the live model and only
  evaluates TEST at each new best val epoch; the reported accuracy is the same);
* `lambda_max` from `torch.linalg.eigvalsh` on the smaller of `F' F` / `F F'` (float64) instead
  of `scipy.linalg.eigh` on `F' F`.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from clip_utils.methods.cached import Option, cached_method
from clip_utils.model.feature_fit import FeatureData, Fitted, accuracy
from clip_utils.registry import register
from clip_utils.runtime.options import positive_int

METHOD = "lp_pp"

DEFAULTS: dict = {
    "epochs": 300,
    "alpha_every": 10,
    "momentum": 0.9,
    "alpha_init_factor": 250.0,
    "w_init": "sum",
    "accumulate_alpha_grad": True,
}
"""The published LP++ schedule (see the module docstring)."""


class LPPlusPlus(nn.Module):
    """`f (W + diag(alpha) T)' + b`.

    Args:
        n_classes: C.
        dim: D.
    """

    def __init__(self, n_classes: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_classes, dim))
        self.bias = nn.Parameter(torch.zeros(n_classes))
        self.alpha = nn.Parameter(torch.zeros(n_classes))
        self.register_buffer("text", torch.zeros(n_classes, dim))

    def linear_head(self) -> nn.Linear:
        """The same logits as one linear layer: `f (W + diag(alpha) T)' + b`."""
        head = nn.Linear(self.weight.shape[1], self.weight.shape[0])
        with torch.no_grad():
            head.weight.copy_(self.weight + self.alpha.unsqueeze(1) * self.text)
            head.bias.copy_(self.bias)
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        w = self.weight + self.alpha.unsqueeze(1) * self.text
        return torch.addmm(self.bias, x, w.t()).float()


def step_sizes(feats: torch.Tensor, text_logits: torch.Tensor) -> tuple[float, float]:
    """`(lr_w, lr_alpha)` of the published code from the `(N, D)` support features and their
    `(N, C)` text logits `f t_k'`."""
    n, d = feats.shape
    x = feats.double()
    gram = x.t() @ x if d <= n else x @ x.t()
    lam = float(torch.linalg.eigvalsh(gram)[-1])
    lr_w = 4.0 * n / lam
    lr_alpha = n / (4.0 * float(text_logits.double().pow(2).sum(0).max()))
    return lr_w, lr_alpha


def fit(
    data: FeatureData,
    *,
    epochs: int = DEFAULTS["epochs"],
    alpha_every: int = DEFAULTS["alpha_every"],
    momentum: float = DEFAULTS["momentum"],
    alpha_init_factor: float = DEFAULTS["alpha_init_factor"],
    w_init: str = DEFAULTS["w_init"],
    accumulate_alpha_grad: bool = DEFAULTS["accumulate_alpha_grad"],
    seed: int = 0,
) -> Fitted:
    """LP++.

    Args:
        data: the cached features.
        epochs: full-batch epochs (published 300).
        alpha_every: alpha is updated every this many epochs (published 10).
        momentum: SGD momentum for (w, b) (published 0.9).
        alpha_init_factor: alpha starts at this times the mean own-class text similarity (250).
        w_init: "sum" (published) or "mean" of each class's support features.
        accumulate_alpha_grad: reproduce the published never-zeroed alpha gradient.
        seed: seeds the bias initialisation.
    """
    if w_init not in ("sum", "mean"):
        raise ValueError(f"w_init must be 'sum' or 'mean', not {w_init!r}")
    gen = torch.Generator().manual_seed(seed)
    feats = data.support.float()
    n, d = feats.shape
    c = data.n_classes
    text = data.text.float()
    onehot = data.one_hot()
    counts = onehot.sum(0)
    if bool((counts == 0).any()):
        raise ValueError("LP++ needs at least one support feature per class")

    ft = feats @ text.t()  # (N, C) text logits
    val = data.val.float()
    vt = val @ text.t()
    val_labels = data.val_labels

    lr_w, lr_alpha = step_sizes(feats, ft)
    own = (onehot * ft).sum(0) / counts  # mean own-class text similarity per class
    alpha0 = alpha_init_factor * float(own.mean())

    w = onehot.t() @ feats
    if w_init == "mean":
        w = w / counts.unsqueeze(1)
    bound = 1.0 / math.sqrt(d)
    b = (torch.rand(c, generator=gen) * 2.0 - 1.0) * bound
    alpha = torch.full((c,), alpha0)
    buf_w = torch.zeros_like(w)
    buf_b = torch.zeros_like(b)
    grad_alpha = torch.zeros_like(alpha)

    curves: list[dict[str, float]] = []
    best = (-1.0, 0, w.clone(), b.clone(), alpha.clone())
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        logits = torch.addmm(b, feats, w.t()).add_(alpha * ft)
        logp = torch.log_softmax(logits, dim=1)
        train_loss = float(-(logp * onehot).sum() / n)
        g = (logp.exp_() - onehot).div_(n)  # d loss / d logits
        gw = g.t() @ feats
        gb = g.sum(0)
        ga = (g * ft).sum(0)
        buf_w.mul_(momentum).add_(gw)
        buf_b.mul_(momentum).add_(gb)
        w.sub_(lr_w * buf_w)
        b.sub_(lr_w * buf_b)
        grad_alpha = grad_alpha + ga if accumulate_alpha_grad else ga
        if epoch % alpha_every == 0:
            alpha = alpha - lr_alpha * grad_alpha

        val_logits = torch.addmm(b, val, w.t()).add_(alpha * vt)
        val_loss = float(nn.functional.cross_entropy(val_logits, val_labels))
        val_acc = accuracy(val_logits, val_labels)
        if val_acc >= best[0]:
            best = (val_acc, epoch, w.clone(), b.clone(), alpha.clone())
        curves.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "seconds": time.perf_counter() - start,
            }
        )

    best_acc, best_epoch, w, b, alpha = best
    config = {"n_classes": c, "dim": d}
    module = LPPlusPlus(**config)
    with torch.no_grad():
        module.weight.copy_(w)
        module.bias.copy_(b)
        module.alpha.copy_(alpha)
        module.text.copy_(text)
    module.requires_grad_(False)
    info = {
        "best_epoch": best_epoch,
        "val_acc": best_acc,
        "epochs": epochs,
        "lr_w": lr_w,
        "lr_alpha": lr_alpha,
        "alpha_init": alpha0,
        "alpha_mean": float(alpha.mean()),
        "w_init": w_init,
        "accumulate_alpha_grad": accumulate_alpha_grad,
    }
    return Fitted(module=module.eval(), config=config, info=info, curves=curves)


register(cached_method(
    name=METHOD, label="LP++", command="lp++", order=33, fit=fit, build=LPPlusPlus, epochs=True, linear=True,
    aliases=("lp-pp",),
    description="LP++: a linear probe blended with the text classifier, block majorize-minimize steps "
                "(best epoch on validation)",
    options=(Option("epochs", positive_int, f"epochs (default: the published {DEFAULTS['epochs']})"),),
))
