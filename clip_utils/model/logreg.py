"""The CLIP paper's linear probe: L-BFGS logistic regression, C chosen on validation, refit on train + val.

    fit = fit_lbfgs(train_x, train_y, val_x, val_y, n_classes)
    fit.head        # nn.Linear on the raw (L2-normalised) embeddings, like any probe head
    fit.train_head  # the same C fitted on train alone (a start for LoRA that has not seen val)
    fit.c, fit.curves

CLIP (Radford et al. 2021, appendix A.3) fits scikit-learn's L-BFGS logistic regression on
the frozen embeddings and chooses the L2 regularisation on the validation split with a
parametric binary search: start from 10^-6, 10^-4, ..., 10^6, then halve the interval around
the best value until the grid has 8 steps per decade; the final model is fitted on train and
validation together at the chosen value. Here the search runs over scikit-learn's inverse
regularisation C (the same range, as it is symmetric), each candidate scored by validation
top-1 and, on ties, validation log loss (each fit starts from the previous one's solution:
the problem is convex, so that only saves iterations). A few-shot run skips the refit
(`refit=False`): on K + min(K, 4) images per class it would no longer be K-shot, and the
methods it is compared with never train on validation. No learning rate, no epochs:
the problem is convex and L-BFGS solves it, which makes this the reference a gradient
probe is held to.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from clip_utils.config import LBFGS_C_START, LBFGS_MAX_ITER, LBFGS_STEPS_PER_DECADE


@dataclass
class LbfgsFit:
    """Outcome of `fit_lbfgs`.

    Attributes:
        head: `nn.Linear(D, n_classes)` on raw embeddings (float32, CPU), fitted on train + val
            (without the refit: `train_head`).
        train_head: the same at the chosen C fitted on train alone, as scored on validation.
        c: the chosen inverse regularisation.
        curves: one entry per C tried, in increasing C: `epoch` (its rank, 1-based), `C`,
            `train_loss`, `val_loss`, `val_acc`, `seconds`, `lr` (None) — the shape of
            `curves.json`, so report draws it like any run (the x axis then ranks C).
        best: the rank of the chosen C in `curves`.
        refit_seconds: time of the final fit on train + val.
    """

    head: nn.Linear
    train_head: nn.Linear
    c: float
    curves: list[dict]
    best: int
    refit_seconds: float


def _model(c: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=max_iter, warm_start=True)


def _fit(model, x: np.ndarray, y: np.ndarray):
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # Weakly regularised fits on separable data stop at max_iter; the sweep scores them anyway.
        warnings.simplefilter("ignore", ConvergenceWarning)
        # A K-shot sample always has more than half as many classes as images (1-shot: as
        # many): scikit-learn's guess that the labels are a regression target is wrong here.
        warnings.filterwarnings("ignore", "The number of unique classes is greater than 50%", UserWarning)
        return model.fit(x, y)


def _log_loss(model, x: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import log_loss

    return float(log_loss(y, model.predict_proba(x), labels=model.classes_))


def head_from(model, n_classes: int) -> nn.Linear:
    """The `nn.Linear` that computes a fitted scikit-learn logistic regression's decision scores.

    Args:
        model: a fitted `LogisticRegression`.
        n_classes: outputs (classes absent from training get a score no input reaches).
    """
    coef, bias = np.asarray(model.coef_, dtype=np.float64), np.asarray(model.intercept_, dtype=np.float64)
    if len(model.classes_) == 2 and coef.shape[0] == 1:  # binary: one score, class 1 against class 0
        coef, bias = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], bias])
    weight = np.zeros((n_classes, coef.shape[1]))
    offset = np.full(n_classes, bias.min() - 1e4)
    for row, label in enumerate(model.classes_):
        weight[int(label)], offset[int(label)] = coef[row], bias[row]
    head = nn.Linear(coef.shape[1], n_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(offset))
    return head


def fit_lbfgs(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
              n_classes: int, start: Sequence[float] = LBFGS_C_START,
              steps_per_decade: int = LBFGS_STEPS_PER_DECADE, max_iter: int = LBFGS_MAX_ITER,
              refit: bool = True) -> LbfgsFit:
    """Sweep C on validation by the CLIP paper's binary search, then refit on train + val.

    Args:
        train_x: `(N, D)` L2-normalised training embeddings.
        train_y: `(N,)` labels.
        val_x: `(M, D)` validation embeddings.
        val_y: `(M,)` labels.
        n_classes: the head's outputs.
        start: the first C values (log-spaced, evenly).
        steps_per_decade: the resolution the search refines to.
        max_iter: L-BFGS iterations per fit.
        refit: fit the final head on train + val (the paper); False: keep the train-only fit.
    """
    xt, yt = train_x.double().cpu().numpy(), train_y.cpu().numpy()
    xv, yv = val_x.double().cpu().numpy(), val_y.cpu().numpy()
    tried: dict[float, dict] = {}  # log10(C) -> curve entry
    heads: dict[float, nn.Linear] = {}
    model = _model(1.0, max_iter)  # one estimator: each fit warm-starts from the last

    def score(log_c: float) -> None:
        c = 10.0**log_c
        began = time.perf_counter()
        _fit(model.set_params(C=c), xt, yt)
        heads[log_c] = head_from(model, n_classes)
        tried[log_c] = {"C": c, "train_loss": _log_loss(model, xt, yt), "val_loss": _log_loss(model, xv, yv),
                        "val_acc": float(model.score(xv, yv)), "seconds": time.perf_counter() - began, "lr": None}

    def best() -> float:
        # Highest validation top-1, then lowest validation loss, then the stronger regularisation.
        return max(tried, key=lambda k: (tried[k]["val_acc"], -tried[k]["val_loss"], -k))

    logs = [round(math.log10(c), 6) for c in start]
    for log_c in logs:
        score(log_c)
    step, low, high = (logs[1] - logs[0]) if len(logs) > 1 else 1.0, min(logs), max(logs)
    while step > 1 / steps_per_decade + 1e-9:
        step /= 2
        centre = best()
        for log_c in (round(centre - step, 6), round(centre + step, 6)):
            if low <= log_c <= high and log_c not in tried:
                score(log_c)
    chosen = best()
    began = time.perf_counter()
    if refit:
        final = head_from(_fit(model.set_params(C=10.0**chosen), np.concatenate([xt, xv]), np.concatenate([yt, yv])),
                          n_classes)
    else:
        final = heads[chosen]
    ordered = sorted(tried)
    curves = [{"epoch": rank, **tried[k]} for rank, k in enumerate(ordered, start=1)]
    return LbfgsFit(head=final.float(), train_head=heads[chosen].float(), c=10.0**chosen, curves=curves,
                    best=ordered.index(chosen) + 1, refit_seconds=time.perf_counter() - began)
