"""CLAP: CLass-Adaptive linear Probe, on cached CLIP features.

Paper: J. Silva-Rodríguez, S. Hajimiri, I. Ben Ayed, J. Dolz, "A Closer Look at the Few-Shot
Adaptation of Large Vision-Language Models", CVPR 2024 (arXiv:2312.12730).
Published code: https://github.com/jusiro/CLAP (`trainers/adapters.py`, method "ZS-LP + CLAP",
i.e. `TRAINER.ADAPTER.INIT ZS`, `TRAINER.ADAPTER.CONSTRAINT l2`; config
`configs/trainers/SGD_lr1e-1_B256_ep300.yaml`).

Model (a zero-shot-initialised linear probe, "ZS-LP"):

    logits(f) = s * f @ normalize(W)'           W in R^{C x D}, W_0 = T (the text classifier)

Objective (CLAP = ZS-LP + class-adaptive l2 penalty towards the zero-shot prototypes):

    L(W) = CE(logits(X), y) + (1/C) * sum_c lambda_c * ||w_c - t_c||^2

with the Lagrangian multipliers fixed before training from the zero-shot confidence on the
training set (`init_lagrangian_multipliers`, no "balanced"/"corrected"/"constant" variant):

    lambda_c = mean_{i : y_i = c} softmax(s * x_i @ T')_c

i.e. the average zero-shot probability of the true class over the class-c training samples.
(The published "adaptative" outer-step variant of the augmented Lagrangian is not the
published default and is not implemented.) No validation set is used: the model is the one
after the LAST epoch, as published (`scripts/eval.sh` loads `--load-epoch 300`); validation
loss/accuracy are only recorded in the curves.

Schedule (module constants, as published through Dassl): SGD, lr `LR` = 0.1, momentum 0.9,
no weight decay, batch `BATCH_SIZE` = 256, `EPOCHS` = 300; the learning rate of epoch e is
`WARMUP_LR` = 1e-5 for e < `WARMUP_EPOCHS` = 1, then the cosine
`0.5 * LR * (1 + cos(pi * (e - WARMUP_EPOCHS) / EPOCHS))` (Dassl's ConstantWarmupScheduler
around CosineAnnealingLR(T_max=EPOCHS), stepped once per epoch). Each epoch shuffles the
training pool and takes `N // BATCH_SIZE` batches (one batch if N < 256), N being the number
of support IMAGES, exactly as the published `run_epoch` (its number of batches comes from the
Dassl loader over the support images, while the pool holds the augmented copies).

Departures from the published code:
- Cached, L2-normalised features in, no image encoder; the input features are not
  re-normalised in `forward` (the published code divides by their norm, a no-op here).
- The zero-shot prototypes T are the L2-normalised rows of `FeatureData.text`; the published
  base is the UN-normalised text embedding (mean over templates), so its penalty
  ||w_c - t_c||^2 and the SGD steps act at that embedding's scale. Here they act at unit scale.
- Training pool: the published code trains on 20 augmented passes over the support set
  (`epochs_aumentation = 20`) and computes the multipliers on them. Here the pool is the
  `V` augmented views in `data.views` (flattened, V * N samples) when given and
  `use_views=True`, else the `N` un-augmented support features.
- Classes absent from the training pool get lambda_c = 0 (the published code would divide
  by zero).
- fp32 throughout (the published default `PREC fp16` only affects the frozen encoder).
- The random stream (shuffles) is a private `torch.Generator(seed)`, not numpy's global one.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from clip_utils.methods.cached import Option, cached_method
from clip_utils.model.feature_fit import FeatureData, Fitted, dassl_lr, epoch_entry
from clip_utils.registry import register
from clip_utils.runtime.options import positive_float, positive_int

METHOD = "clap"

# Published schedule (configs/trainers/SGD_lr1e-1_B256_ep300.yaml + Dassl defaults).
EPOCHS = 300
LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 0.0
BATCH_SIZE = 256
WARMUP_EPOCHS = 1  # constant warm-up (Dassl WARMUP_TYPE "constant")
WARMUP_LR = 1e-5


class CLAPProbe(nn.Module):
    """Zero-shot-initialised linear probe with L2-normalised prototypes.

    Parameters / buffers:
        prototypes: `(C, D)` learned class prototypes W (normalised in `forward`).
        base_text: `(C, D)` the zero-shot text classifier T the penalty pulls towards.
        multipliers: `(C,)` the class-adaptive Lagrangian multipliers lambda_c.
    """

    def __init__(self, n_classes: int, dim: int, logit_scale: float = 100.0):
        super().__init__()
        self.n_classes = int(n_classes)
        self.dim = int(dim)
        self.logit_scale = float(logit_scale)
        self.prototypes = nn.Parameter(torch.zeros(self.n_classes, self.dim))
        self.register_buffer("base_text", torch.zeros(self.n_classes, self.dim))
        self.register_buffer("multipliers", torch.zeros(self.n_classes))

    def classifier(self) -> torch.Tensor:
        """`(C, D)` the L2-normalised prototypes."""
        return self.prototypes / self.prototypes.norm(dim=-1, keepdim=True)

    def linear_head(self) -> nn.Linear:
        """The same logits as one linear layer: `f (s normalize(W))'`."""
        weight = self.logit_scale * self.classifier()
        head = nn.Linear(self.dim, self.n_classes)
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.zero_()
        return head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * (features @ self.classifier().t())

    def penalty(self) -> torch.Tensor:
        """`mean_c lambda_c ||w_c - t_c||^2` (the published `zero_shot_constraint`, "l2")."""
        dist = (self.prototypes - self.base_text).pow(2).sum(-1)
        return (self.multipliers * dist).mean()


def lagrangian_multipliers(zs_logits: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """`(C,)` mean zero-shot softmax probability of the true class, per class (0 if absent)."""
    probs = zs_logits.softmax(-1)
    onehot = F.one_hot(labels, n_classes).to(probs.dtype)
    per_class = (onehot * probs).sum(0)
    counts = onehot.sum(0)
    return torch.where(counts > 0, per_class / counts.clamp(min=1), torch.zeros_like(per_class))


def fit(
    data: FeatureData,
    *,
    epochs: int = EPOCHS,
    lr: float = LR,
    momentum: float = MOMENTUM,
    weight_decay: float = WEIGHT_DECAY,
    batch_size: int = BATCH_SIZE,
    warmup_epochs: int = WARMUP_EPOCHS,
    warmup_lr: float = WARMUP_LR,
    constraint: str = "l2",
    use_views: bool = True,
    seed: int = 0,
) -> Fitted:
    """Fit CLAP (or plain ZS-LP with `constraint="none"`) on the support set; keep the last epoch.

    Args:
        data: the cached features; only `support*`, `text`, `logit_scale`, `views` train,
            `val*` is only scored for the curves.
        epochs: training epochs (published 300); 0 returns the zero-shot classifier.
        lr, momentum, weight_decay, batch_size, warmup_epochs, warmup_lr: the schedule
            (defaults: the module constants, as published).
        constraint: "l2" (CLAP) or "none" (ZS-LP).
        use_views: train on `data.views` (flattened) when present, as the published code
            trains on augmented copies.
        seed: seeds the private generator of the epoch shuffles.

    Returns:
        `Fitted` with a `CLAPProbe`; `info` holds the multipliers' summary, the pool size,
        the zero-shot and final validation accuracy; `curves` one dict per epoch (`epoch` 1..E,
        `train_loss` = mean batch objective, `val_loss` = CE on val, `val_acc`, `seconds` =
        wall time since the start of `fit`).
    """
    if constraint not in ("l2", "none"):
        raise ValueError(f"constraint must be 'l2' or 'none', not {constraint!r}")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(int(seed))
    C, D, s = data.n_classes, data.dim, float(data.logit_scale)
    text = data.text.float()
    n_images = data.support.shape[0]
    if use_views and data.views is not None:
        views = data.views.float()
        pool_x = views.reshape(-1, D)
        pool_y = data.support_labels.repeat(views.shape[0])
    else:
        pool_x, pool_y = data.support.float(), data.support_labels
    pool_x = pool_x.contiguous()

    module = CLAPProbe(C, D, s)
    with torch.no_grad():
        module.prototypes.copy_(text)
        module.base_text.copy_(text)
        if constraint == "l2":
            module.multipliers.copy_(lagrangian_multipliers(s * pool_x @ text.t(), pool_y, C))
    use_penalty = constraint == "l2"

    optim = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n_batches = max(1, n_images // batch_size)  # published: len(Dassl loader over the support images)
    n_pool = pool_x.shape[0]
    val_x, val_y = data.val.float(), data.val_labels
    with torch.no_grad():
        zs_val_acc = (module(val_x).argmax(-1) == val_y).float().mean().item()

    curves: list[dict[str, float]] = []
    for epoch in range(epochs):
        for group in optim.param_groups:
            group["lr"] = dassl_lr(epoch, lr, epochs, warmup_epochs, warmup_lr)
        perm = torch.randperm(n_pool, generator=gen)
        loss_sum = torch.zeros(())
        seen = 0
        for b in range(n_batches):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            if idx.numel() == 0:
                break
            logits = module(pool_x[idx])
            loss = F.cross_entropy(logits, pool_y[idx])
            if use_penalty:
                loss = loss + module.penalty()
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            loss_sum += loss.detach()
            seen += 1
        curves.append(epoch_entry(module, val_x, val_y, loss_sum, seen, epoch, start))

    module.eval()
    mult = module.multipliers
    info: dict[str, Any] = {
        "selection": "last epoch (as published; no validation used)",
        "best_epoch": int(epochs),
        "constraint": constraint,
        "multipliers_mean": float(mult.mean()),
        "multipliers_min": float(mult.min()),
        "multipliers_max": float(mult.max()),
        "n_train": int(n_pool),
        "trained_on_views": bool(use_views and data.views is not None),
        "batches_per_epoch": int(n_batches),
        "zs_val_acc": zs_val_acc,
        "val_acc": curves[-1]["val_acc"] if curves else zs_val_acc,
        "seconds": time.perf_counter() - start,
    }
    config = {"n_classes": C, "dim": D, "logit_scale": s}
    return Fitted(module=module, config=config, info=info, curves=curves)


register(cached_method(
    name=METHOD, label="CLAP", command="clap", order=34, fit=fit, build=CLAPProbe, epochs=True, linear=True,
    description="CLAP: a zero-shot-initialised linear probe held near the text classifier by class-adaptive "
                "penalties (no validation; last epoch)",
    options=(Option("epochs", positive_int, f"epochs (default: the published {EPOCHS})"),
             Option("lr", positive_float, f"SGD learning rate (default: the published {LR})")),
))
