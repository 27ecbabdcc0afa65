"""CLIP-Adapter (visual adapter), on cached CLIP features.

Paper: P. Gao, S. Geng, R. Zhang, T. Ma, R. Fang, Y. Zhang, H. Li, Y. Qiao, "CLIP-Adapter:
Better Vision-Language Models with Feature Adapters", IJCV 2024 (132:581-595; online 2023;
arXiv:2110.04544).
Published code: https://github.com/gaopengcuhk/CLIP-Adapter (`clip_adapter.py`, a trainer
for the CoOp/Dassl code base; the repository ships no config and says to "follow CoOp's
command", i.e. CoOp's `configs/trainers/CoOp/*.yaml`).

Model (the published `Adapter` + `CustomCLIP.forward`):

    A(f) = ReLU(W2 ReLU(W1 f))          W1: D -> D/4, W2: D/4 -> D, no biases
    g    = ratio * A(f) + (1 - ratio) * f
    logits(f) = s * normalize(g) @ T'      T: the L2-normalised text classifier

Note the published adapter ends with a ReLU too (Linear, ReLU, Linear, ReLU). With
ratio = 0 this is exactly zero-shot CLIP. The MLP is positively homogeneous, so the model and
its training are invariant to the scale of the input features (raw vs. L2-normalised CLIP
features give the same predictions and the same gradients w.r.t. W1, W2).

Schedule (module constants). Published (CoOp's 16-shot config `vit_b16.yaml`/`rn50.yaml`
with Dassl defaults, which the repository points to): SGD lr 2e-3 (`PUBLISHED_LR`), momentum
0.9, weight decay 5e-4, batch 32 (`PUBLISHED_BATCH_SIZE`), 200 epochs, `RATIO` = 0.2
(hard-coded in the published `forward`). Defaults here: the same, except batch
`BATCH_SIZE` = 256 with the learning rate scaled linearly with the batch actually drawn,
`lr = 2e-3 * min(N, 256) / 32` (1.6e-2 when N >= 256; see departures). The learning rate of
epoch e is `WARMUP_LR` = 1e-5 for e < `WARMUP_EPOCHS` = 1, then
`0.5 * lr * (1 + cos(pi * (e - WARMUP_EPOCHS) / EPOCHS))` (Dassl constant warm-up + cosine,
stepped per epoch). Batches follow Dassl's training loader:
a random permutation per epoch, `N // batch` full batches (remainder dropped), one batch of
all N if N < batch. Adapter weights start at PyTorch's `nn.Linear` default
(U(+-1/sqrt(fan_in))), drawn from the fit's own generator.

Model selection: the LAST epoch, as published (Dassl `TEST.FINAL_MODEL = "last_step"`, and
the trainer's test runs after the final epoch). `select="val"` instead keeps the epoch of best
validation accuracy (an option, not the published protocol).

Departures from the published code:
- Cached, L2-normalised features in, no image encoder (see the scale invariance above).
- The text classifier is `FeatureData.text` (given); the published code encodes one
  hand-crafted template per class with CLIP's text encoder.
- Augmentation: the published loader draws a fresh random crop/flip per image per epoch; here,
  when `data.views` is given and `use_views=True`, each epoch uses one randomly chosen cached
  view per support image, else the un-augmented support features.
- Batch 256 instead of 32, with the linearly scaled learning rate 2e-3 * min(N, 256) / 32
  (1.6e-2 for N >= 256; Goyal et al. 2017) instead of 2e-3, so that 200 epochs at C=102,
  K=16, D=768 take seconds, not minutes, on two CPU cores (8x fewer optimizer steps; the
  FLOPs per epoch are the same); on generated features of that size the two settings reached
  the same accuracy. `fit(data, batch_size=PUBLISHED_BATCH_SIZE, lr=PUBLISHED_LR)` is the
  published setting.
- The learning rate itself: the repository gives no CLIP-Adapter config; the CoOp config it
  points to (lr 2e-3 at batch 32) is the reference.
- fp32 throughout (the published trainer casts CLIP to fp32 as well).

Implementation note: `fit` uses the hand-written exact gradients of `adapter_grads` and
torch.optim.SGD's update rule written out (momentum buffer, coupled weight decay), which
halves the tensor operations per step; both are checked against autograd + torch.optim.SGD
in the tests.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from clip_utils.data import Dataset
from clip_utils.lab import Lab
from clip_utils.methods.cached import Option, cached_method, renamed_scores
from clip_utils.model.feature_fit import FeatureData, Fitted, dassl_lr, epoch_entry
from clip_utils.registry import register
from clip_utils.runtime.options import positive_float, positive_int

METHOD = "clip_adapter"

# Published schedule (CoOp configs/trainers/CoOp/*.yaml, 16 shots, + Dassl defaults).
EPOCHS = 200
PUBLISHED_LR = 2e-3  # CoOp config, batch 32
PUBLISHED_BATCH_SIZE = 32
BATCH_SIZE = 256  # departure: large-batch steps on cached features
LR = PUBLISHED_LR * BATCH_SIZE / PUBLISHED_BATCH_SIZE  # 1.6e-2: linear scaling, for N >= 256
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
WARMUP_EPOCHS = 1
WARMUP_LR = 1e-5
RATIO = 0.2  # residual ratio hard-coded in the published forward
REDUCTION = 4  # bottleneck D -> D / 4


class CLIPAdapterHead(nn.Module):
    """Visual CLIP-Adapter over cached features, scored against the fixed text classifier.

    Parameters / buffers:
        fc1: `Linear(D, D // reduction, bias=False)`.
        fc2: `Linear(D // reduction, D, bias=False)`.
        text: `(C, D)` the fixed, L2-normalised text classifier T.
    """

    def __init__(
        self,
        n_classes: int,
        dim: int,
        ratio: float = RATIO,
        logit_scale: float = 100.0,
        reduction: int = REDUCTION,
    ):
        super().__init__()
        self.n_classes = int(n_classes)
        self.dim = int(dim)
        self.ratio = float(ratio)
        self.logit_scale = float(logit_scale)
        self.reduction = int(reduction)
        hidden = max(1, self.dim // self.reduction)
        self.fc1 = nn.Linear(self.dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, self.dim, bias=False)
        self.register_buffer("text", torch.zeros(self.n_classes, self.dim))

    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        """`(B, D)` the blended, L2-normalised image features."""
        x = F.relu(self.fc2(F.relu(self.fc1(features))))
        g = self.ratio * x + (1.0 - self.ratio) * features
        return g / g.norm(dim=-1, keepdim=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * (self.adapt(features) @ self.text.t())


@torch.no_grad()
def adapter_grads(
    head: CLIPAdapterHead, x: torch.Tensor, onehot: torch.Tensor, x_keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of a batch and its exact gradients w.r.t. `fc1.weight`, `fc2.weight`.

    The hand-written backward of `head.forward` + `F.cross_entropy` (fewer, larger tensor ops
    than autograd; checked against autograd in the tests).

    Args:
        head: the adapter (its weights are read, not changed).
        x: `(B, D)` features.
        onehot: `(B, C)` float one-hot labels.
        x_keep: optional precomputed `(1 - ratio) * x`.
    """
    w1, w2, r, s = head.fc1.weight, head.fc2.weight, head.ratio, head.logit_scale
    n = x.shape[0]
    h1 = x @ w1.t()
    a1 = h1.clamp_min(0)
    h2 = a1 @ w2.t()
    a2 = h2.clamp_min(0)
    g = torch.add((1.0 - r) * x if x_keep is None else x_keep, a2, alpha=r)
    inv = g.norm(dim=-1, keepdim=True).reciprocal_()
    gn = g.mul_(inv)
    logits = (gn @ head.text.t()).mul_(s)
    logp = logits.log_softmax(-1)
    loss = -(logp * onehot).sum() / n
    dlogits = logp.exp_().sub_(onehot).mul_(s / n)  # d loss / d (gn @ T') incl. the scale
    dgn = dlogits @ head.text
    dg = dgn.sub_(gn * (dgn * gn).sum(-1, keepdim=True)).mul_(inv)  # through g / ||g||
    da2 = dg.mul_(r).mul_(h2 > 0)
    dw2 = da2.t() @ a1
    da1 = (da2 @ w2).mul_(h1 > 0)
    dw1 = da1.t() @ x
    return loss, dw1, dw2


def fit(
    data: FeatureData,
    *,
    ratio: float = RATIO,
    epochs: int = EPOCHS,
    lr: float | None = None,
    momentum: float = MOMENTUM,
    weight_decay: float = WEIGHT_DECAY,
    batch_size: int = BATCH_SIZE,
    warmup_epochs: int = WARMUP_EPOCHS,
    warmup_lr: float = WARMUP_LR,
    reduction: int = REDUCTION,
    select: str = "last",
    use_views: bool = True,
    seed: int = 0,
) -> Fitted:
    """Fit the visual adapter on the support set.

    Args:
        data: the cached features (support trains; val is scored every epoch).
        ratio: residual ratio (published 0.2).
        epochs, momentum, weight_decay, batch_size, warmup_epochs, warmup_lr: the schedule
            (defaults: the module constants; batch 256 instead of the published 32).
        lr: base learning rate; None (default) scales the published 2e-3 at batch 32 linearly
            to the batch actually drawn: `2e-3 * min(N, batch_size) / 32` (1.6e-2 at N >= 256).
        reduction: bottleneck reduction (published 4).
        select: "last" (published) or "val" (epoch of best val accuracy, first on ties).
        use_views: draw one cached augmented view per image per epoch when `data.views` exists.
        seed: seeds the private generator (adapter init, shuffles, view draws).

    Returns:
        `Fitted` with a `CLIPAdapterHead`; curves one dict per epoch (`epoch` 1..E,
        `train_loss` = mean batch CE, `val_loss`, `val_acc`, `seconds` since the start of `fit`).
    """
    if select not in ("last", "val"):
        raise ValueError(f"select must be 'last' or 'val', not {select!r}")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(int(seed))
    C, D, s = data.n_classes, data.dim, float(data.logit_scale)
    support, labels = data.support.float().contiguous(), data.support_labels
    views = data.views.float() if (use_views and data.views is not None) else None
    n = support.shape[0]

    module = CLIPAdapterHead(C, D, ratio, s, reduction)
    with torch.no_grad():
        module.text.copy_(data.text.float())
        for lin in (module.fc1, module.fc2):  # nn.Linear's default init, from our generator
            bound = 1.0 / math.sqrt(lin.in_features)
            lin.weight.copy_(torch.rand(lin.weight.shape, generator=gen) * (2 * bound) - bound)
    n_batches = n // batch_size if n >= batch_size else 1
    if lr is None:
        lr = PUBLISHED_LR * min(n, batch_size) / PUBLISHED_BATCH_SIZE
    # SGD with momentum and coupled weight decay, exactly torch.optim.SGD's update
    # (dampening 0, no Nesterov), on the hand-written gradients of `adapter_grads`.
    weights = [module.fc1.weight, module.fc2.weight]
    buffers = [torch.zeros_like(w) for w in weights]
    val_x, val_y = data.val.float(), data.val_labels
    with torch.no_grad():
        init_val_acc = (module(val_x).argmax(-1) == val_y).float().mean().item()
        zs_val_acc = (s * val_x @ data.text.float().t()).argmax(-1).eq(val_y).float().mean().item()

    best_acc, best_epoch = init_val_acc, 0
    best_state = {k: v.clone() for k, v in module.state_dict().items()}
    curves: list[dict[str, float]] = []
    rows = torch.arange(n)
    for epoch in range(epochs):
        lr_e = dassl_lr(epoch, lr, epochs, warmup_epochs, warmup_lr)
        if views is not None:
            x_epoch = views[torch.randint(views.shape[0], (n,), generator=gen), rows]
        else:
            x_epoch = support
        perm = torch.randperm(n, generator=gen)
        x_epoch = x_epoch[perm]  # contiguous batches below
        onehot = F.one_hot(labels[perm], C).float()
        keep = (1.0 - module.ratio) * x_epoch
        loss_sum = torch.zeros(())
        with torch.no_grad():
            for b in range(n_batches):
                lo, hi = b * batch_size, (b + 1) * batch_size
                loss, dw1, dw2 = adapter_grads(module, x_epoch[lo:hi], onehot[lo:hi], keep[lo:hi])
                for w, grad, buf in zip(weights, (dw1, dw2), buffers):
                    if weight_decay:
                        grad.add_(w, alpha=weight_decay)
                    buf.mul_(momentum).add_(grad)
                    w.sub_(buf, alpha=lr_e)
                loss_sum += loss
        entry = epoch_entry(module, val_x, val_y, loss_sum, n_batches, epoch, start)
        curves.append(entry)
        if select == "val" and entry["val_acc"] > best_acc:
            best_acc, best_epoch = entry["val_acc"], epoch + 1
            best_state = {k: v.clone() for k, v in module.state_dict().items()}

    if select == "val":
        module.load_state_dict(best_state)
        chosen, chosen_acc = best_epoch, best_acc
    else:
        chosen, chosen_acc = epochs, (curves[-1]["val_acc"] if curves else init_val_acc)
    module.eval()
    info: dict[str, Any] = {
        "selection": "last epoch (as published)" if select == "last" else "best val accuracy",
        "best_epoch": int(chosen),
        "ratio": float(ratio),
        "lr": float(lr),
        "batch_size": int(min(n, batch_size)),
        "zs_val_acc": zs_val_acc,
        "val_acc": chosen_acc,
        "trained_on_views": views is not None,
        "batches_per_epoch": int(n_batches),
        "seconds": time.perf_counter() - start,
    }
    config = {
        "n_classes": C,
        "dim": D,
        "ratio": float(ratio),
        "logit_scale": s,
        "reduction": int(reduction),
    }
    return Fitted(module=module, config=config, info=info, curves=curves)


def _new_text(lab: Lab, module: nn.Module, new: Dataset, run: Mapping[str, Any]) -> torch.Tensor:
    # the adapter changes the image feature only: new classes are the zero-shot classifier of
    # the prompt set the run was fitted with
    return lab.text_classifier(new, run["prompt_set"]).t()


register(cached_method(
    name=METHOD, label="CLIP-Adapter", command="clip-adapter", order=36, fit=fit, build=CLIPAdapterHead, epochs=True,
    new_classes="text", score_new=functools.partial(renamed_scores, method=METHOD, build=CLIPAdapterHead,
                                                    text_for=_new_text),
    description="CLIP-Adapter: a bottleneck MLP on the image feature, blended with it, scored by the text "
                "classifier (last epoch)",
    options=(Option("epochs", positive_int, f"epochs (default: the published {EPOCHS})"),
             Option("ratio", positive_float, f"the residual ratio of the adapted feature (default: {RATIO})")),
))
