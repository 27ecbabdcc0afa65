"""TaskRes: Task Residual tuning of the zero-shot text classifier, on cached CLIP features.

Paper: T. Yu, Z. Lu, X. Jin, Z. Chen, X. Wang, "Task Residual for Tuning Vision-Language
Models", CVPR 2023 (arXiv:2211.10277).
Published code: https://github.com/geekyutao/TaskRes (`trainers/taskres.py`, configs
`configs/trainers/TaskRes/adam_lr2e-3_B256_ep200.yaml`, runs `train_regular.sh`).

Model (the published `TaskResLearner` + `CustomCLIP.forward`, which DOES re-normalise):

    W = T + alpha * X                 X in R^{C x D} learned, X_0 = 0, T fixed
    logits(f) = s * f @ normalize(W)'   (row-wise L2 normalisation of W)

trained with plain cross-entropy. With X = 0 this is exactly zero-shot CLIP.

Schedule (module constants; published for the 16-shot non-ImageNet runs of
`train_regular.sh`: `adam_lr2e-3_B256_ep200`, scale 0.5): Adam (betas 0.9/0.999) lr `LR` =
2e-3, weight decay 5e-4 (Dassl's default `OPTIM.WEIGHT_DECAY`, coupled L2 as in
`torch.optim.Adam`), batch `BATCH_SIZE` = 256, `EPOCHS` = 200, `ALPHA` = 0.5; the learning
rate of epoch e is `WARMUP_LR` = 1e-5 for e < `WARMUP_EPOCHS` = 1, then
`0.5 * LR * (1 + cos(pi * (e - WARMUP_EPOCHS) / EPOCHS))` (Dassl constant warm-up + cosine,
stepped per epoch). Batches follow Dassl's training loader: a random permutation per epoch,
`N // BATCH_SIZE` full batches (the remainder dropped) when N >= 256, else one batch of all N.
(Published variants: 100 epochs for 1-4 shots, lr 2e-4 for ImageNet, alpha 1.0 for Flowers.)

Model selection: the LAST epoch, as published (Dassl `TEST.FINAL_MODEL = "last_step"`;
`scripts/taskres/eval.sh` loads `--load-epoch 200`). `select="val"` instead keeps the epoch of
best validation accuracy (an option, not the published protocol).

Departures from the published code:
- Cached, L2-normalised features in, no image encoder; input features are not re-normalised
  in `forward` (the published code divides by their norm, a no-op here).
- The base T is the L2-normalised `FeatureData.text`; the published base is the
  UN-normalised text embedding (mean over templates; one template outside ImageNet). Since W
  is normalised afterwards the zero-shot classifier is the same, but the residual's relative
  size for a given alpha and Adam step (and its weight decay) differ by that embedding's norm.
- No "enhanced base" (TaskRes* with a tuned text projection) option.
- Augmentation: the published loader draws a fresh random crop/flip of each support image
  every epoch; here, when `data.views` is given and `use_views=True`, each epoch uses one
  randomly chosen cached view per support image, else the un-augmented support features.
- fp32 throughout; private `torch.Generator(seed)` for shuffles and view draws.
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

METHOD = "taskres"

# Published schedule (adam_lr2e-3_B256_ep200.yaml + Dassl defaults, train_regular.sh 16 shots).
EPOCHS = 200
LR = 2e-3
ADAM_BETAS = (0.9, 0.999)
WEIGHT_DECAY = 5e-4  # Dassl default OPTIM.WEIGHT_DECAY (not overridden by the TaskRes configs)
BATCH_SIZE = 256
WARMUP_EPOCHS = 1
WARMUP_LR = 1e-5
ALPHA = 0.5  # TRAINER.TaskRes.RESIDUAL_SCALE for every dataset but Flowers (1.0)


class TaskResHead(nn.Module):
    """`s * f @ normalize(T + alpha * X)'`.

    Parameters / buffers:
        base_text: `(C, D)` the fixed zero-shot text classifier T.
        residual: `(C, D)` the learned task residual X (zero at initialisation).
    """

    def __init__(self, n_classes: int, dim: int, alpha: float = ALPHA, logit_scale: float = 100.0):
        super().__init__()
        self.n_classes = int(n_classes)
        self.dim = int(dim)
        self.alpha = float(alpha)
        self.logit_scale = float(logit_scale)
        self.register_buffer("base_text", torch.zeros(self.n_classes, self.dim))
        self.residual = nn.Parameter(torch.zeros(self.n_classes, self.dim))

    def classifier(self) -> torch.Tensor:
        """`(C, D)` the normalised classifier rows."""
        w = self.base_text + self.alpha * self.residual
        return w / w.norm(dim=-1, keepdim=True)

    def linear_head(self) -> nn.Linear:
        """The same logits as one linear layer: `f (s normalize(T + alpha X))'`."""
        head = nn.Linear(self.dim, self.n_classes)
        with torch.no_grad():
            head.weight.copy_(self.logit_scale * self.classifier())
            head.bias.zero_()
        return head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * (features @ self.classifier().t())


def fit(
    data: FeatureData,
    *,
    alpha: float = ALPHA,
    epochs: int = EPOCHS,
    lr: float = LR,
    weight_decay: float = WEIGHT_DECAY,
    batch_size: int = BATCH_SIZE,
    warmup_epochs: int = WARMUP_EPOCHS,
    warmup_lr: float = WARMUP_LR,
    select: str = "last",
    use_views: bool = True,
    seed: int = 0,
) -> Fitted:
    """Fit the task residual X on the support set.

    Args:
        data: the cached features (support trains; val is scored every epoch).
        alpha: residual scale (published 0.5).
        epochs, lr, weight_decay, batch_size, warmup_epochs, warmup_lr: the schedule
            (defaults: the module constants, as published).
        select: "last" (published) or "val" (the epoch of best val accuracy, first on ties).
        use_views: draw one cached augmented view per image per epoch when `data.views` exists.
        seed: seeds the private generator (shuffles, view draws).

    Returns:
        `Fitted` with a `TaskResHead`; curves one dict per epoch (`epoch` 1..E, `train_loss` =
        mean batch CE, `val_loss`, `val_acc`, `seconds` since the start of `fit`).
    """
    if select not in ("last", "val"):
        raise ValueError(f"select must be 'last' or 'val', not {select!r}")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(int(seed))
    C, D, s = data.n_classes, data.dim, float(data.logit_scale)
    support, labels = data.support.float().contiguous(), data.support_labels
    views = data.views.float() if (use_views and data.views is not None) else None
    n = support.shape[0]

    module = TaskResHead(C, D, alpha, s)
    with torch.no_grad():
        module.base_text.copy_(data.text.float())
    optim = torch.optim.Adam(module.parameters(), lr=lr, betas=ADAM_BETAS, weight_decay=weight_decay)
    # Dassl: drop_last only when the set holds at least one full batch.
    n_batches = n // batch_size if n >= batch_size else 1
    val_x, val_y = data.val.float(), data.val_labels
    with torch.no_grad():
        zs_val_acc = (module(val_x).argmax(-1) == val_y).float().mean().item()

    best_acc, best_epoch, best_state = zs_val_acc, 0, module.residual.detach().clone()
    curves: list[dict[str, float]] = []
    rows = torch.arange(n)
    for epoch in range(epochs):
        for group in optim.param_groups:
            group["lr"] = dassl_lr(epoch, lr, epochs, warmup_epochs, warmup_lr)
        if views is not None:
            x_epoch = views[torch.randint(views.shape[0], (n,), generator=gen), rows]
        else:
            x_epoch = support
        perm = torch.randperm(n, generator=gen)
        loss_sum = torch.zeros(())
        for b in range(n_batches):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            loss = F.cross_entropy(module(x_epoch[idx]), labels[idx])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            loss_sum += loss.detach()
        entry = epoch_entry(module, val_x, val_y, loss_sum, n_batches, epoch, start)
        curves.append(entry)
        if select == "val" and entry["val_acc"] > best_acc:
            best_acc, best_epoch = entry["val_acc"], epoch + 1
            best_state = module.residual.detach().clone()

    if select == "val":
        with torch.no_grad():
            module.residual.copy_(best_state)
        chosen, chosen_acc = best_epoch, best_acc
    else:
        chosen, chosen_acc = epochs, (curves[-1]["val_acc"] if curves else zs_val_acc)
    module.eval()
    info: dict[str, Any] = {
        "selection": "last epoch (as published)" if select == "last" else "best val accuracy",
        "best_epoch": int(chosen),
        "alpha": float(alpha),
        "zs_val_acc": zs_val_acc,
        "val_acc": chosen_acc,
        "residual_norm": float(module.residual.detach().norm()),
        "trained_on_views": views is not None,
        "batches_per_epoch": int(n_batches),
        "seconds": time.perf_counter() - start,
    }
    config = {"n_classes": C, "dim": D, "alpha": float(alpha), "logit_scale": s}
    return Fitted(module=module, config=config, info=info, curves=curves)


register(cached_method(
    name=METHOD, label="TaskRes", command="taskres", order=35, fit=fit, build=TaskResHead, epochs=True, linear=True,
    description="TaskRes: the text classifier plus a learned task residual (last epoch)",
    options=(Option("epochs", positive_int, f"epochs (default: the published {EPOCHS})"),
             Option("lr", positive_float, f"Adam learning rate (default: the published {LR})"),
             Option("alpha", positive_float, f"the residual's scale (default: the published {ALPHA})")),
))
