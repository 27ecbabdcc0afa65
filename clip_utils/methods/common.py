"""What the probe and LoRA share around the training loop (`model.training.fit`).

    flowers = lab.resolve("flowers102")
    data = run_data(lab, flowers, "lora", shots=4, seed=1)   # the run's folder and images
    head = zeroshot_init_head(lab, flowers)          # the zero-shot start of both heads
    start = probe_head(lab, flowers, data)           # LoRA's start: the matching probe, if any
    info = run_info(lab, flowers, "lora", cfg, result, trainable=..., total=..., ...)

The training loop's probe (`--solver adamw`) starts its head as the zero-shot classifier (the
`domain` prompt set times the model's logit scale), so epoch 0 is zero-shot accuracy rather
than chance; on the few images per class these datasets have, that converges faster and
generalises better than a zero init (the default L-BFGS probe has no starting head).
LoRA's head starts from the linear probe trained on the same images when there is one
(LP-FT: the adapters then start from a trained head instead of tearing the encoder up to
fix a zero-shot one), else from zero-shot too. Both runs describe themselves in
metrics.json with the same fields (DESIGN.md), few-shot runs with their `shots` and `seed`.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from clip_utils import config
from clip_utils.config import TrainConfig
from clip_utils.data import Dataset, ImageListDataset
from clip_utils.errors import InvalidValue
from clip_utils.lab import Lab
from clip_utils.model.heads import zeroshot_head
from clip_utils.model.training import FitResult, TrainingError
from clip_utils.results import fewshot
from clip_utils.results.checkpoints import (
    HEAD_FILE,
    TRAIN_HEAD_FILE,
    CheckpointError,
    check_head,
    head_info,
    read_head,
)
from clip_utils.results.layout import check_results_folder
from clip_utils.runtime import distributed
from clip_utils.runtime.files import read_json

HEAD_INIT_SET = "domain"
T = TypeVar("T")


@dataclass(frozen=True)
class RunData:
    """Where a run goes and which images it trains and validates on.

    Attributes:
        folder: the run's results folder (`fewshot.run_dir`).
        shots: images per class (None: every image of the splits).
        seed: the run's seed (training order, augmentation and the few-shot draw).
        train: indices into the train split (None: all).
        val: indices into the val split (None: all).
    """

    folder: Path
    shots: int | None
    seed: int
    train: list[int] | None = None
    val: list[int] | None = None

    def split(self, dataset: ImageListDataset, split: str) -> ImageListDataset:
        """`dataset` (a train or val split) reduced to this run's images."""
        indices = {"train": self.train, "val": self.val}.get(split)
        if indices is None:
            return dataset
        return ImageListDataset([dataset.samples[i] for i in indices], dataset.classes, dataset.transform,
                                name=dataset.name, split=split)

    def tags(self) -> dict:
        """What metrics.json records of the sample: `shots` (None: all images) and `seed`."""
        return {"shots": self.shots, "seed": self.seed}


def run_data(lab: Lab, dataset: Dataset, method: str, shots: int | None, seed: int) -> RunData:
    """The folder and images of a run; a few-shot run's sample is drawn and saved to samples.json.

    Args:
        lab: the run context.
        dataset: the resolved dataset.
        method: the registered method's name.
        shots: images per class (None: all).
        seed: the run's (resolved) seed.
    """
    check_results_folder(lab.results_dir, dataset)
    folder = fewshot.run_dir(lab.results_dir, dataset, method, shots, seed)
    if shots is None:
        return RunData(folder, None, seed)
    train, val = lab.dataset(dataset, "train"), lab.dataset(dataset, "val")
    try:
        sample = fewshot.draw(train.samples, val.samples, shots, seed)
    except InvalidValue as err:
        raise InvalidValue(f"{dataset.folder}: {err}") from None
    # Every rank draws the same sample (seeded); rank 0 alone writes it.
    distributed.on_main(fewshot.write_samples, folder, sample, train.samples, val.samples)
    return RunData(folder, shots, seed, sample.train, sample.val)


def probe_head(lab: Lab, dataset: Dataset, data: RunData) -> nn.Linear | None:
    """The finished linear probe of the same dataset, model, class names, shots and seed, or None.

    LoRA's head starts from it: from the head fitted on train alone where the probe has one
    (L-BFGS refits its saved head on train + val, which would leave LoRA validating on images
    its head was fitted to). A probe whose run is unfinished (no metrics.json), or that was
    trained on other images, another seed, model or class list, is not used (a warning says
    why when its head is there but does not fit).

    Args:
        lab: the run context (results folder, model).
        dataset: the resolved dataset.
        data: the LoRA run's `RunData`.
    """
    folder = fewshot.run_dir(lab.results_dir, dataset, config.LORA_HEAD_FROM, data.shots, data.seed)
    file, metrics_file = folder / TRAIN_HEAD_FILE, folder / "metrics.json"
    if not file.is_file():
        file = folder / HEAD_FILE
    if not (file.is_file() and metrics_file.is_file()):
        return None
    try:
        head, info = read_head(file)
        check_head(info, head_info(dataset=dataset.name, method=config.LORA_HEAD_FROM, model=lab.model,
                                   class_names=dataset.original_names,
                                   embed_dim=head.in_features), file)
        metrics = read_json(metrics_file)
    except (CheckpointError, ValueError) as err:
        warnings.warn(f"LoRA starts from zero-shot: the linear probe in {folder} does not fit ({err})", stacklevel=2)
        return None
    why = None
    if metrics.get("shots") != data.shots or metrics.get("config", {}).get("seed") != data.seed:
        why = (f"it was trained with shots {metrics.get('shots')} and seed {metrics.get('config', {}).get('seed')}, "
               f"this run uses shots {data.shots} and seed {data.seed}")
    elif data.shots is not None:
        same = fewshot.read_samples(folder)["train"] == fewshot.read_samples(data.folder)["train"]
        why = None if same else "it was trained on other images (its samples.json differs)"
    if why:
        warnings.warn(f"LoRA starts from zero-shot: the linear probe in {folder} is not for this run ({why})",
                      stacklevel=2)
        return None
    return head.to(lab.device)


def zeroshot_init_head(lab: Lab, dataset: Dataset | str) -> nn.Linear:
    """A float32 head on `lab.device` holding the `domain` prompt set's zero-shot classifier.

    Args:
        lab: the run context (its shared text classifiers and CLIP's logit scale).
        dataset: the dataset (its domain templates and class names).
    """
    text = lab.text_classifier(dataset, HEAD_INIT_SET)
    return zeroshot_head(text, lab.logit_scale, lab.logit_bias).to(lab.device)


def resolved(cfg: TrainConfig, lab: Lab) -> TrainConfig:
    """`cfg` with the lab's batch size and seed filled in where it leaves them open."""
    return cfg.resolved(lab.batch_size, lab.seed)


def run_info(lab: Lab, dataset: Dataset, method: str, cfg: TrainConfig, fit_result: FitResult, *, trainable: int,
             total: int, peak_vram_mb: float | None, peak_reserved_mb: float | None, seconds: float,
             extra_config: dict | None = None, data: RunData | None = None) -> dict:
    """The run description that goes into a trained method's metrics.json (DESIGN.md fields).

    Args:
        lab: the run context.
        dataset: the resolved dataset.
        method: the registered method's name.
        cfg: the training configuration (resolved: batch size and seed set).
        fit_result: what `fit` returned.
        trainable: trainable parameter count.
        total: parameters of the whole classifier (encoder, projection, head, adapters).
        peak_vram_mb: peak allocated CUDA memory of training (None on CPU).
        peak_reserved_mb: peak reserved CUDA memory (None on CPU).
        seconds: wall time of the whole run.
        extra_config: method settings (LoRA rank, ...).
        data: the run's images (adds `shots`, `seed`; None: all images at `cfg.seed`).
    """
    cfg = resolved(cfg, lab)
    tags = data.tags() if data is not None else {"shots": None, "seed": cfg.seed}
    return {
        "dataset": dataset.name, **dataset.record(), "split": "test", "method": method, "model": lab.model, **tags, "fitted_on": "train",
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
