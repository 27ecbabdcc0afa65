"""The linear probe: a linear head trained on the frozen vision encoder's embeddings.

    metrics = run_probe(lab, "flowers102")                    # config.PROBE; results/flowers102/linear_probe/
    metrics = run_probe(lab, "flowers102", resume=True)       # after Ctrl-C: continue
    classifier = load_classifier(lab, "flowers102")           # the best epoch, for predictions

The probe trains on cached features (`lab.features`), held on the device and sliced by a
seeded permutation: no DataLoader and no forward passes through the encoder, so a
Flowers102 probe takes seconds once the features exist. With `augment=True` it trains
through the frozen encoder on augmented images instead. Either way validation and test use
the cached (non-augmented) features: the encoder is frozen, so they are exact.

The head starts as the zero-shot classifier (`runs.zeroshot_init_head`) and trains in
standard units of the training embeddings: CLIP embeddings share a large common component,
and in raw units a few epochs of gradient steps barely move the head's decisions. The
checkpoint always holds the equivalent head on raw embeddings (`heads.unstandardized_head`),
so predicting needs nothing but the head.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from . import config, distributed
from .checkpoints import (
    HEAD_FILE,
    check_head,
    checkpoint_paths,
    head_info,
    load_head,
    missing_checkpoint,
    read_head,
    save_head,
)
from .config import TrainConfig
from .data import canonical_name, results_name
from .evaluation import save_evaluation
from .heads import (
    ClipClassifier,
    FrozenEncoderProbe,
    count_parameters,
    feature_scaling,
    standardized_head,
    unstandardized_head,
)
from .inputs import iter_labelled_batches
from .lab import Lab
from .results import method_dir
from .runs import resolved, run_info, zeroshot_init_head
from .train import Batch, EpochCallback, TrainJob, fit, permuted_batches, predict
from .vram import VramProbe

METHOD = "linear_probe"


def run_probe(lab: Lab, dataset: str, cfg: TrainConfig = config.PROBE, resume: bool = False,
              callbacks: Sequence[EpochCallback] = ()) -> dict:
    """Train a linear probe on the frozen encoder, evaluate its best epoch on test, save everything.

    Writes `results/<dataset>/linear_probe/`: metrics.json, predictions.csv, curves.json,
    head.safetensors, classification_report.txt, resume.pt (and the test figures).

    Args:
        lab: the run context (model, data, results folder, device, seed).
        dataset: `flowers102` or `cub200`.
        cfg: hyper-parameters (default: `config.PROBE`, as the CLI and Task2.ipynb).
        resume: continue an interrupted run from its last completed epoch.
        callbacks: called as `callback(epoch, curve_entry)` after each epoch.

    Returns:
        The metrics.json content.
    """
    start = time.perf_counter()
    dataset = canonical_name(dataset)
    cfg = resolved(cfg, lab)
    device = torch.device(lab.device)
    out = method_dir(lab.results_dir, dataset, METHOD)
    feats = {split: lab.features(dataset, split) for split in ("train", "val", "test")}
    model = lab.clip().model
    model.requires_grad_(False)  # frozen encoder; only the head learns
    class_names = lab.class_names(dataset)
    head = zeroshot_init_head(lab, dataset)
    info = dict(dataset=dataset, method=METHOD, model=lab.model, class_names=lab.label_map(dataset),
                embed_dim=head.in_features)

    train_x = feats["train"].embeddings.to(device)
    train_y = feats["train"].labels.to(device)
    val_x, val_y = feats["val"].embeddings.to(device), feats["val"].labels.to(device)
    # The head trains in standard units of the training embeddings (same zero-shot start):
    # in raw units a few epochs of gradient steps barely move it. Checkpoints always hold
    # the equivalent head on raw embeddings.
    mean, std = feature_scaling(train_x)
    unit_head = standardized_head(head, mean, std)
    val_x = (val_x - mean) / std
    if cfg.augment:
        trained: nn.Module = FrozenEncoderProbe(model, unit_head, mean, std)
        ds = lab.dataset(dataset, "train")
        paths, pixel_dtype = [p for p, _ in ds.samples], next(model.parameters()).dtype

        # Under torchrun each rank takes its share of every global batch; index len(paths) is the
        # padding slot of those shares (distributed.rank_order).
        padded_paths, padded_labels = distributed.padded(paths, feats["train"].labels)

        def train_batches(epoch: int, generator: torch.Generator) -> Iterable[Batch]:
            order, per_rank = distributed.rank_order(torch.randperm(len(paths), generator=generator), cfg.batch_size)
            return iter_labelled_batches(padded_paths, padded_labels, lab.preprocess, device, pixel_dtype,
                                         per_rank, order=order, augment=True, num_workers=lab.num_workers)
    else:
        train_x = (train_x - mean) / std
        trained = unit_head

        def train_batches(epoch: int, generator: torch.Generator) -> Iterable[Batch]:
            return permuted_batches(train_x, train_y, cfg.batch_size, generator, shard=True)

    job = TrainJob(
        name=f"{dataset} linear probe", model=trained, train_batches=train_batches,
        # The encoder is frozen: the cached validation features are exactly what it computes.
        val_batches=lambda: permuted_batches(val_x, val_y, max(cfg.batch_size, 1024)),
        steps_per_epoch=math.ceil(len(train_y) / cfg.batch_size),
        save_best=lambda epoch: save_head(out / HEAD_FILE, unstandardized_head(unit_head, mean, std),
                                          head_info(**info, epoch=epoch)),
        checkpoints=(HEAD_FILE,),
        out_dir=out, device=device, batch_size=cfg.batch_size,
        # head_units: resume.pt holds the head in standard units (older runs trained the
        # augmented probe in raw units: same names and shapes, so only this tells them apart).
        fingerprint={"dataset": dataset, "model": lab.model, "method": METHOD, "class_naming": lab.class_naming, "domain": lab.domain,
                     "n_train": len(train_y), "augment": cfg.augment, "head_units": "standard"},
        val_model=unit_head if cfg.augment else None,
        autocast=False,
    )
    with VramProbe(device, label=job.name) as vram:
        result = fit(job, cfg, resume=resume, callbacks=callbacks)

    def evaluate() -> dict:  # on rank 0 alone: it reads the checkpoint and writes the results
        best, _ = load_head(out / HEAD_FILE, head_info(**info))
        best = best.to(device)
        logits, labels = predict(best, permuted_batches(feats["test"].embeddings.to(device),
                                                        feats["test"].labels.to(device), 4096), device, autocast=False)
        encoder_params = count_parameters(model.vision_model)[1] + count_parameters(model.visual_projection)[1]
        head_params = sum(p.numel() for p in head.parameters())
        run = run_info(lab, dataset, METHOD, cfg, result, trainable=head_params,
                       total=encoder_params + head_params, peak_vram_mb=vram.peak_allocated_mb,
                       peak_reserved_mb=vram.peak_reserved_mb, seconds=time.perf_counter() - start)
        return save_evaluation(out, logits=logits, labels=labels, paths=feats["test"].paths, class_names=class_names,
                               info=run, figure_prefix=f"{results_name(dataset)}_{METHOD}",
                               results_dir=lab.results_dir)

    return distributed.on_main(evaluate)


def load_classifier(lab: Lab, dataset: str) -> ClipClassifier:
    """The trained probe of a dataset on the lab's frozen CLIP, ready for prediction (eval mode).

    Args:
        lab: the run context (model, results folder, device).
        dataset: dataset name.

    Raises:
        FileNotFoundError: not trained yet (the message names the command to run).
        CheckpointError: damaged, or trained for another dataset, class list or model.
    """
    dataset = canonical_name(dataset)
    path = checkpoint_paths(lab.results_dir, dataset, METHOD)["head"]
    if not path.is_file():
        raise missing_checkpoint(path, dataset, METHOD)
    head, info = read_head(path)
    clip = lab.clip()
    check_head(info, head_info(dataset=dataset, method=METHOD, model=lab.model, class_names=lab.label_map(dataset),
                               embed_dim=clip.embed_dim), path)
    # The head stays float32 beside an fp16 encoder: ClipClassifier casts the embedding up.
    return ClipClassifier(clip.model.vision_model, clip.model.visual_projection, head.float().to(lab.device)).eval()
