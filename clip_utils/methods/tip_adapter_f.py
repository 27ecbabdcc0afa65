"""Tip-Adapter-F: Tip-Adapter with the cache keys fine-tuned.

Paper: Renrui Zhang, Wei Zhang, Rongyao Fang, Peng Gao, Kunchang Li, Jifeng Dai, Yu Qiao,
Hongsheng Li, "Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification",
ECCV 2022. Published code: https://github.com/gaopengcuhk/Tip-Adapter (`main.py`,
`run_tip_adapter_F`; `utils.py` `search_hp`).

Formula (the module is `cache_model.TipAdapter`, keys a Parameter):

    logits(f) = s * f T' + alpha * exp(-beta * (1 - f K')) L

with `K` initialised at the Tip-Adapter cache keys (`cache_model.cache_keys`) and trained by
cross-entropy on the support set at the initial `alpha = init_alpha`, `beta = init_beta`; `L` (the
one-hot support labels) and `T` stay fixed. Schedule, as published (`DEFAULTS`):

* AdamW, lr 1e-3, eps 1e-4, PyTorch's default weight decay 0.01 (published `AdamW(params,
  lr=cfg['lr'], eps=1e-4)`);
* cosine annealing to 0 over `epochs * ceil(N / batch_size)` steps, stepped every batch;
* 20 epochs, batch size 256, shuffled every epoch, last partial batch kept (`drop_last=False`);
* `init_alpha = 1`, `init_beta = 1` (published yaml: `init_beta` 1 everywhere, `init_alpha`
  1.17 to 10 per dataset; 1 is the setting of the LP++ repository's re-run of Tip-Adapter-F);
* after each epoch the keys are scored on val at the initial alpha/beta; the best epoch (first
  best, strict `>`) is kept; then alpha and beta are searched on val with the trained keys over
  `tip_adapter.DEFAULT_BETA_GRID` x `tip_adapter.DEFAULT_ALPHA_GRID` (see that module).

Curves: one dict per epoch: `epoch` (1-based), `train_loss` (mean of the batch losses),
`val_loss`, `val_acc` (at the initial alpha/beta), `seconds` (wall-clock since training started).
`info["best_epoch"]` uses the same 1-based numbering.

Departures from the published code:

* the best epoch is selected on VAL; the published code selects it on the TEST split (and also
  reports `max(best_acc, acc)` over test);
* training features: with `data.views`, each epoch draws one of the V views of every support image
  at random (seeded); without views, the support features every epoch. Published: a fresh
  random-resized-crop / flip of each image through the image encoder every epoch;
* one default search grid for every dataset (see `tip_adapter`), and the same
  `init_alpha`/`init_beta` for every dataset;
* float32 throughout (published: fp16 CLIP features and keys, which is why eps is 1e-4);
* `s = data.logit_scale` (published: the constant 100);
* `seed` drives the shuffling (and the view draw) with a private generator.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import nn

from clip_utils.methods.cached import Option, cached_method
from clip_utils.model.cache_model import (
    DEFAULT_ALPHA_GRID,
    DEFAULT_BETA_GRID,
    TipAdapter,
    build,
    cache_keys,
    search_alpha_beta,
)
from clip_utils.model.feature_fit import FeatureData, Fitted, accuracy, zeroshot_logits
from clip_utils.registry import register
from clip_utils.runtime.options import positive_float, positive_int

METHOD = "tip_adapter_f"

DEFAULTS: dict = {
    "epochs": 20,
    "batch_size": 256,
    "lr": 1e-3,
    "eps": 1e-4,
    "weight_decay": 0.01,
    "init_alpha": 1.0,
    "init_beta": 1.0,
}
"""The published Tip-Adapter-F schedule (see the module docstring)."""


def fit(
    data: FeatureData,
    *,
    epochs: int = DEFAULTS["epochs"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    eps: float = DEFAULTS["eps"],
    weight_decay: float = DEFAULTS["weight_decay"],
    init_alpha: float = DEFAULTS["init_alpha"],
    init_beta: float = DEFAULTS["init_beta"],
    alpha: float | None = None,
    beta: float | None = None,
    alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    beta_grid: Sequence[float] = DEFAULT_BETA_GRID,
    seed: int = 0,
) -> Fitted:
    """Tip-Adapter-F.

    Args:
        data: the cached features.
        epochs, batch_size, lr, eps, weight_decay: the training schedule (published defaults).
        init_alpha, init_beta: alpha and beta during training and epoch selection.
        alpha, beta: final values; `None` (default) searches it on val after training.
        alpha_grid, beta_grid: the final search grids.
        seed: seeds the shuffling and the choice of views.
    """
    gen = torch.Generator().manual_seed(seed)
    keys0, keys_from = cache_keys(data)
    module, _ = build(data, keys0, init_alpha, init_beta)
    module.train()
    module.keys.requires_grad_(True)

    n = data.support.shape[0]
    labels = data.support_labels
    values = module.values
    text = module.text
    scale = float(data.logit_scale)
    steps_per_epoch = math.ceil(n / batch_size)
    optimizer = torch.optim.AdamW(
        [module.keys], lr=lr, eps=eps, weight_decay=weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, epochs * steps_per_epoch
    )

    val = data.val.float()
    val_zs = zeroshot_logits(val, data).float()
    support_zs = scale * data.support.float() @ text.t()
    views = data.views.float() if data.views is not None else None

    curves: list[dict[str, float]] = []
    best_acc, best_epoch, best_keys = -1.0, 0, keys0.clone()
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        if views is None:
            feats, feats_zs = data.support.float(), support_zs
        else:
            pick = torch.randint(views.shape[0], (n,), generator=gen)
            feats = views[pick, torch.arange(n)]
            feats_zs = scale * feats @ text.t()
        perm = torch.randperm(n, generator=gen)
        losses = []
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            f = feats[idx]
            affinity = f @ module.keys.t()
            logits = feats_zs[idx] + init_alpha * (
                torch.exp(init_beta * (affinity - 1.0)) @ values
            )
            loss = nn.functional.cross_entropy(logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        with torch.no_grad():
            val_logits = (
                val_zs
                + init_alpha
                * torch.exp(init_beta * (val @ module.keys.t() - 1.0))
                @ values
            )
            val_loss = nn.functional.cross_entropy(val_logits, data.val_labels).item()
            val_acc = accuracy(val_logits, data.val_labels)
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            best_keys = module.keys.detach().clone()
        curves.append(
            {
                "epoch": epoch,
                "train_loss": sum(losses) / len(losses),
                "val_loss": val_loss,
                "val_acc": val_acc,
                "seconds": time.perf_counter() - start,
            }
        )

    a, b, search = search_alpha_beta(
        data, best_keys, alpha, beta, alpha_grid, beta_grid
    )
    module, config = build(data, best_keys, a, b)
    with torch.no_grad():
        final_acc = accuracy(module(data.val), data.val_labels)
    info = {
        "alpha": a,
        "beta": b,
        "init_alpha": float(init_alpha),
        "init_beta": float(init_beta),
        "best_epoch": best_epoch,
        "best_epoch_val_acc": best_acc,
        "epochs": epochs,
        "keys": keys_from,
        "train_features": "support"
        if views is None
        else f"one random view of {views.shape[0]} per image per epoch",
        "val_acc": final_acc,
        "zeroshot_val_acc": accuracy(val_zs, data.val_labels),
        **search,
    }
    return Fitted(module=module, config=config, info=info, curves=curves)


register(cached_method(
    name=METHOD, label="Tip-Adapter-F", command="tip-adapter-f", order=31, fit=fit, build=TipAdapter, epochs=True,
    description="Tip-Adapter-F: Tip-Adapter with the cache keys fine-tuned (best epoch on validation)",
    options=(Option("epochs", positive_int, f"epochs (default: the published {DEFAULTS['epochs']})"),
             Option("lr", positive_float, f"AdamW learning rate (default: the published {DEFAULTS['lr']})"),
             Option("alpha", positive_float, "the cache's final weight (default: searched on validation)"),
             Option("beta", positive_float, "the cache's final sharpness (default: searched on validation)")),
))
