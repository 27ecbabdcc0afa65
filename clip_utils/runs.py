"""What the trained methods (linear probe, LoRA) share around `train.fit`.

    head = zeroshot_init_head(lab, "flowers102")          # the zero-shot start of both heads
    info = run_info(lab, "flowers102", "lora", cfg, result, trainable=..., total=..., ...)

Both heads start as the zero-shot classifier (the `domain` prompt set times CLIP's logit
scale), so epoch 0 is zero-shot accuracy rather than chance; on the few images per class
these datasets have, that converges faster and generalises better than a zero init. Both
runs describe themselves in metrics.json with the same fields (DESIGN.md).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import asdict
from typing import TypeVar

import torch
from torch import nn

from . import distributed
from .config import TrainConfig
from .heads import zeroshot_head
from .lab import Lab
from .train import FitResult, TrainingError

HEAD_INIT_SET = "domain"
T = TypeVar("T")


def zeroshot_init_head(lab: Lab, dataset: str) -> nn.Linear:
    """A float32 head on `lab.device` holding the `domain` prompt set's zero-shot classifier.

    Args:
        lab: the run context (its shared text classifiers and CLIP's logit scale).
        dataset: dataset name (chooses the domain templates).
    """
    text = lab.text_classifier(dataset, HEAD_INIT_SET)
    return zeroshot_head(text, lab.clip().logit_scale).to(lab.device)


def resolved(cfg: TrainConfig, lab: Lab) -> TrainConfig:
    """`cfg` with the lab's batch size and seed filled in where it leaves them open."""
    return cfg.resolved(lab.batch_size, lab.seed)


def run_info(lab: Lab, dataset: str, method: str, cfg: TrainConfig, fit_result: FitResult, *, trainable: int,
             total: int, peak_vram_mb: float | None, peak_reserved_mb: float | None, seconds: float,
             extra_config: dict | None = None) -> dict:
    """The run description that goes into a trained method's metrics.json (DESIGN.md fields).

    Args:
        lab: the run context.
        dataset: dataset name.
        method: `linear_probe` or `lora`.
        cfg: the training configuration (resolved: batch size and seed set).
        fit_result: what `fit` returned.
        trainable: trainable parameter count.
        total: parameters of the whole classifier (encoder, projection, head, adapters).
        peak_vram_mb: peak allocated CUDA memory of training (None on CPU).
        peak_reserved_mb: peak reserved CUDA memory (None on CPU).
        seconds: wall time of the whole run.
        extra_config: method settings (LoRA rank, ...).
    """
    return {
        "dataset": dataset, "split": "test", "method": method, "model": lab.model,
        "seconds": seconds, "train_seconds": fit_result.train_seconds,
        "trainable_params": trainable, "total_params": total, "trainable_pct": 100.0 * trainable / total,
        "epochs": cfg.epochs, "best_epoch": fit_result.best_epoch,
        "best_val_acc": next((e["val_acc"] for e in fit_result.curves if e["epoch"] == fit_result.best_epoch), None),
        "peak_vram_mb": peak_vram_mb, "peak_reserved_mb": peak_reserved_mb, "device": str(lab.device),
        "world_size": distributed.world_size(),  # processes under torchrun (peak_vram_mb is rank 0's)
        "class_names_source": lab.class_naming,
        "config": {**asdict(resolved(cfg, lab)), **(extra_config or {})},
    }


def freeing_memory_on_failure(train: Callable[..., T], *args) -> T:
    """`train(*args)`; a `TrainingError` (CUDA out of memory, divergence) leaves it without its
    traceback, after the memory the training frames held has been freed.

    A notebook keeps the last traceback (`sys.last_traceback`), and with it every frame's
    locals: the training model and its optimizer state would stay on the GPU, and the next
    cell's smaller batch would not fit. The error's message says all the user needs.

    Args:
        train: the function building and training the model (its locals hold the model).
        *args: its arguments.
    """
    failure = None
    try:
        return train(*args)
    except TrainingError as err:
        failure = err.with_traceback(None)
    # Outside the handler: no frame of `train` is referenced any more.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise failure
