"""Tip-Adapter: a training-free key-value cache on top of zero-shot CLIP.

Paper: Renrui Zhang, Wei Zhang, Rongyao Fang, Peng Gao, Kunchang Li, Jifeng Dai, Yu Qiao,
Hongsheng Li, "Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification",
ECCV 2022. Published code: https://github.com/gaopengcuhk/Tip-Adapter (`main.py`, `utils.py`
`build_cache_model` / `search_hp`, `configs/*.yaml`).

Formula, for an L2-normalised feature `f` (a row), with keys `F` (N, D) = the support features
and values `L` (N, C) = their one-hot labels:

    logits(f) = s * f T' + alpha * exp(-beta * (1 - f F')) L

`s` is `data.logit_scale` (100 for OpenAI CLIP), `T` the (C, D) text classifier.

Hyper-parameters. `fit(data, alpha=..., beta=...)` uses the given values; a value left `None`
is searched on the validation split, over `DEFAULT_BETA_GRID` x `DEFAULT_ALPHA_GRID` (or the
grids passed in), keeping the first best point in beta-major, alpha-minor order, as the published
double loop with a strict `>` does. The published grids are
`[0.1 + i * (scale - 0.1) / step for i in range(step)]` with a per-dataset `search_scale` (beta 7
to 50, alpha 3 to 50) and `search_step` [200, 20]. One default for every dataset is fixed here:

* `DEFAULT_BETA_GRID = published_grid(12, 50)`: beta in 0.1 ... 11.76, step 0.238 (scale 12 is
  the median of the published beta scales; 50 steps instead of 200, see the departures);
* `DEFAULT_ALPHA_GRID = published_grid(10, 20)`: alpha in 0.1 ... 9.505, step 0.495 (scale 10 is
  the median of the published alpha scales; the published 20 steps).

The search is exact and fast: for each beta, the cache logits of the whole val set are computed
once (keys sorted by class, so `exp(...) L` is a segment sum instead of a matmul), and the val
accuracy at every alpha comes from one interval per val image (the set of alphas at which its
true class wins is an interval: `alpha >= lo` and `alpha <= hi`), so the alpha grid costs almost
nothing.

Departures from the published code:

* one default grid for every dataset (published: a per-dataset `search_scale` in the yaml), with
  50 beta steps instead of 200 (the beta sweep dominates the cost; step 0.24 instead of 0.06);
  pass `beta_grid=published_grid(scale, 200)` to get the published density;
* keys from augmented views (`data.views`) are the mean of the L2-normalised view features,
  re-normalised; the published cache averages the *un-normalised* features of its 10 augmented
  passes before normalising. Without `data.views` the keys are the support features themselves
  (published always uses 10 random-crop/flip passes);
* the accuracy on ties inside the search: the interval formulation counts an image as correct
  when its class ties the best score, where `argmax` would take the lowest class index (a
  measure-zero difference); the reported `val_acc` is recomputed with the fitted module;
* float32 throughout (published keys/values in fp16 on GPU);
* `s = data.logit_scale` (published: the constant 100, OpenAI CLIP's scale);
* selection on `data.val` only (published `main_imagenet.py` searches on the ImageNet TEST split);
* `alpha` or `beta` may be fixed alone and the other searched (published: both or none).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
from clip_utils.runtime.options import positive_float

METHOD = "tip_adapter"


def fit(
    data: FeatureData,
    *,
    alpha: float | None = None,
    beta: float | None = None,
    alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    beta_grid: Sequence[float] = DEFAULT_BETA_GRID,
    seed: int = 0,
) -> Fitted:
    """Training-free Tip-Adapter.

    Args:
        data: the cached features.
        alpha, beta: fixed values; `None` (default) searches it on val over its grid.
        alpha_grid, beta_grid: the search grids (defaults: `DEFAULT_ALPHA_GRID`, `DEFAULT_BETA_GRID`).
        seed: unused (the method is deterministic); kept for a uniform signature.
    """
    del seed
    keys, keys_from = cache_keys(data)
    a, b, search = search_alpha_beta(data, keys, alpha, beta, alpha_grid, beta_grid)
    module, config = build(data, keys, a, b)
    with torch.no_grad():
        val_acc = accuracy(module(data.val), data.val_labels)
        zs_acc = accuracy(zeroshot_logits(data.val, data), data.val_labels)
    info = {
        "alpha": a,
        "beta": b,
        "keys": keys_from,
        "val_acc": val_acc,
        "zeroshot_val_acc": zs_acc,
        **search,
    }
    return Fitted(module=module, config=config, info=info, curves=[])


register(cached_method(
    name=METHOD, label="Tip-Adapter", command="tip-adapter", order=30, fit=fit, build=TipAdapter,
    description="Tip-Adapter: a training-free cache of the support features beside the zero-shot classifier",
    options=(Option("alpha", positive_float, "the cache's weight (default: searched on validation)"),
             Option("beta", positive_float, "the cache's sharpness (default: searched on validation)")),
))
