"""Fitting a classifier on cached image features: what every such method takes and gives back.

    data = FeatureData(support, support_labels, val, val_labels, text, logit_scale)
    fitted = fit(data)                   # a method's fit: a module scoring features, and its choices
    logits = fitted.module(features)     # (B, C) float32

Pure tensors, no files: the methods that adapt CLIP on the lab's cached, L2-normalised image
embeddings (`methods.cached`) give their fit a `FeatureData` of the run's training ("support")
and validation images only: the test split is not in it, so nothing can be selected on it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class FeatureData:
    """The cached, L2-normalised image embeddings one few-shot fit sees.

    Attributes:
        support: `(N, D)` float32 training ("support") features, L2-normalised.
        support_labels: `(N,)` int64 labels in `[0, C)`.
        val: `(M, D)` float32 validation features (never the test split).
        val_labels: `(M,)` int64.
        text: `(C, D)` float32 zero-shot text classifier, one L2-normalised row per class.
        logit_scale: the model's own logit scale (`exp(logit_scale)`, 100 for OpenAI CLIP).
        views: optional `(V, N, D)` features of V augmented views of each support image
            (L2-normalised), for methods whose published code averages augmented views.
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor
    text: torch.Tensor
    logit_scale: float
    views: torch.Tensor | None = None

    @property
    def n_classes(self) -> int:
        return self.text.shape[0]

    @property
    def dim(self) -> int:
        return self.text.shape[1]

    def one_hot(self) -> torch.Tensor:
        """`(N, C)` float32 one-hot labels of the support set."""
        return nn.functional.one_hot(self.support_labels, self.n_classes).float()


@dataclass
class Fitted:
    """A fitted method: the module that scores features, and what the fit chose.

    Attributes:
        module: `nn.Module` mapping `(B, D)` L2-normalised features to `(B, C)` float32 logits.
            Rebuilt by `type(module)(**config)` then `load_state_dict`.
        config: constructor keyword arguments (JSON-able: ints, floats, strings, lists).
        info: what was selected and how (`alpha`, `beta`, `best_epoch`, ... ; JSON-able).
        curves: one dict per epoch for trained methods (`epoch`, `train_loss`, `val_loss`,
            `val_acc`, `seconds`), empty for training-free ones.
        learned: how many numbers training changed, where they are not the module's parameters
            (a prompt learner's context, kept as a buffer); None: the module's parameters.
    """

    module: nn.Module
    config: dict[str, Any]
    info: dict[str, Any]
    curves: list[dict[str, float]]
    learned: int | None = None


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]. note: a CPU-GPU sync point (`.item()`)."""
    return (logits.argmax(-1) == labels).float().mean().item()


def zeroshot_logits(features: torch.Tensor, data: FeatureData) -> torch.Tensor:
    """`logit_scale * f T'`: CLIP's zero-shot logits."""
    return data.logit_scale * features @ data.text.t()


def grid_search(score: Callable[..., float], grid: dict[str, Sequence[float]]) -> tuple[dict[str, float], float]:
    """The grid point with the highest `score(**point)` (first one on ties), and its score.

    Args:
        score: maps keyword arguments to a validation accuracy.
        grid: `{name: values}`; every combination is tried.
    """
    import itertools

    names = list(grid)
    best, best_score = None, -1.0
    for values in itertools.product(*(grid[n] for n in names)):
        point = dict(zip(names, values))
        s = score(**point)
        if s > best_score:
            best, best_score = point, s
    return best, best_score


def dassl_lr(epoch: int, base_lr: float, epochs: int, warmup_epochs: int, warmup_lr: float) -> float:
    """Learning rate of (0-based) `epoch` under Dassl's schedule (CoOp, CLIP-Adapter, TaskRes,
    CLAP): a constant warm-up rate for `warmup_epochs`, then cosine from `base_lr` over `epochs`."""
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


@torch.no_grad()
def epoch_entry(module: nn.Module, val: torch.Tensor, val_labels: torch.Tensor, loss_sum: torch.Tensor,
                n_batches: int, epoch: int, start: float) -> dict[str, float]:
    """One curves.json entry after (0-based) `epoch`: mean train loss, validation loss and top-1.

    note: one CPU-GPU sync per epoch (`.tolist()`), none per batch.
    """
    logits = module(val)
    stats = torch.stack([loss_sum / max(n_batches, 1), torch.nn.functional.cross_entropy(logits, val_labels),
                         (logits.argmax(-1) == val_labels).float().mean()]).tolist()
    return {"epoch": epoch + 1, "train_loss": stats[0], "val_loss": stats[1], "val_acc": stats[2],
            "seconds": time.perf_counter() - start}
