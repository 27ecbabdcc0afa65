"""What the methods fitted on cached image features share: their data, checkpoint and classifier.

    flowers = lab.resolve("flowers102")
    metrics = run_cached(lab, flowers, METHOD, fit, settings, shots=16, seed=1)
    classifier = load_cached(lab, flowers, METHOD, TipAdapter, shots=16, seed=1)

Tip-Adapter, GDA, CLAP, LP++, TaskRes and CLIP-Adapter (and any method of that kind) learn
on the lab's cached, L2-normalised image embeddings and the zero-shot text classifier: no
forward pass through the encoder, so a fit takes seconds. A run here

1. draws the run's images (`common.run_data`: every image of the splits, or the K-shot
   sample every method of a sweep shares, saved in samples.json);
2. builds the zero-shot classifier it starts from: `--prompts SET`, or `auto`, the set that
   scores best on the run's own validation images (`Lab.choose_prompt_set`);
3. calls the method's `fit(FeatureData)` with the support and validation features alone: the
   test split is not read until the fitted module is saved, so no method can select on it;
4. saves the module (`checkpoints.save_module`: tensors and constructor arguments, no
   pickle), its curves when it trains, then scores the test split once and writes the
   results (`evaluation.save_evaluation`), like every other method.

`load_cached` puts a saved module behind the lab's vision tower (`heads.ClipClassifier`),
so `predict`, the explorer and `report` use it as any other classifier. A module that is
linear in the feature (it has `linear_head()`) also exports as a plain linear head.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from clip_utils import config, prompts
from clip_utils.data import Dataset
from clip_utils.lab import Lab
from clip_utils.methods.common import RunData, run_data
from clip_utils.model.clip import Clip
from clip_utils.model.feature_fit import FeatureData, Fitted
from clip_utils.model.heads import ClipClassifier, image_encoder_parameters
from clip_utils.model.training import CURVES_FILE
from clip_utils.model.vram import VramProbe
from clip_utils.registry import Method
from clip_utils.results import fewshot
from clip_utils.results.checkpoints import (
    MODULE_FILE,
    HeadInfo,
    check_head,
    head_info,
    missing_checkpoint,
    read_module,
    save_module,
)
from clip_utils.results.evaluation import save_evaluation
from clip_utils.runtime import progress
from clip_utils.runtime.files import write_json
from clip_utils.runtime.options import add_prompt_option, add_sample_options

EVAL_BATCH = 8192  # test features scored per matmul
# The blend hyper-parameters these methods use (searched on validation or fixed: `fit_info`
# says which), as metrics.json's `hyperparameters` and the CLI's summary line report them.
HYPERPARAMETERS = ("alpha", "beta")


@dataclass(frozen=True)
class CachedSettings:
    """A cached-feature run's settings.

    Attributes:
        prompts: the prompt set of the zero-shot classifier it builds on (`auto`: chosen on the
            run's validation images).
        options: the method's own options that were fixed (e.g. `{"alpha": 1.0}`); the rest
            are searched on validation or at the method's defaults.
    """

    prompts: str = prompts.AUTO
    options: Mapping[str, Any] = field(default_factory=dict)


def add_cached_arguments(parser: argparse.ArgumentParser) -> None:
    """`--prompts` and `--shots`: the options every cached-feature method takes."""
    add_prompt_option(parser)
    add_sample_options(parser)


def cached_settings(args: argparse.Namespace, options: tuple[str, ...] = ()) -> CachedSettings:
    """A method's settings from its command line; options left unset (None) are not fixed.

    Args:
        args: the parsed command line (the method's own, or `fewshot`'s).
        options: the names (argparse dests) of the method's own options.
    """
    fixed = {name: getattr(args, name) for name in options if getattr(args, name, None) is not None}
    return CachedSettings(getattr(args, "prompts", None) or prompts.AUTO, fixed)


def recorded(lab: Lab, settings: CachedSettings, seed: int) -> dict:
    """The metrics.json fields of a finished run with these settings (a sweep reuses it)."""
    return {"prompts": settings.prompts, "config": {"seed": seed, **settings.options}}


def feature_data(lab: Lab, dataset: Dataset, data: RunData, prompt_set: str) -> tuple[FeatureData, str, dict[str, float]]:
    """The run's support and validation features and the zero-shot classifier it builds on.

    Args:
        lab: the run context (cached features, text classifiers, device).
        dataset: the resolved dataset.
        data: the run's images.
        prompt_set: a prompt set, or `auto` (chosen on the run's validation images).

    Returns:
        `(FeatureData, the prompt set used, {set: validation top-1} when auto chose it)`.
    """
    device = torch.device(lab.device)
    train = lab.features(dataset, "train").subset(data.train)
    val = lab.features(dataset, "val").subset(data.val)
    chosen, scores = (lab.choose_prompt_set(dataset, val) if prompt_set == prompts.AUTO else (prompt_set, {}))
    text = lab.text_classifier(dataset, chosen).t().float().to(device)  # (C, D), one row per class
    fd = FeatureData(support=train.embeddings.float().to(device), support_labels=train.labels.to(device),
                     val=val.embeddings.float().to(device), val_labels=val.labels.to(device),
                     text=text, logit_scale=lab.logit_scale)
    return fd, chosen, scores


def _parameters(fitted: Fitted, trains: bool) -> tuple[int, int]:
    """`(learned, stored)`: what training changed (the fit says so where it is not the module's
    parameters; nothing for a training-free fit, whose tensors are computed from the data), and
    every tensor the module keeps (buffers too)."""
    params = sum(p.numel() for p in fitted.module.parameters())
    learned = fitted.learned if fitted.learned is not None else (params if trains else 0)
    return learned, params + sum(b.numel() for b in fitted.module.buffers())


@torch.inference_mode()
def _scores(module: nn.Module, features: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.cat([module(chunk.float().to(device)) for chunk in features.split(EVAL_BATCH)])


def run_cached(lab: Lab, dataset: Dataset | str, method: str, fit: Callable[..., Fitted],
               settings: CachedSettings, *, shots: int | None = None, seed: int | None = None,
               prepare: Callable[[Lab, Dataset, RunData], Mapping[str, Any]] | None = None,
               trains: bool = True) -> dict:
    """Fit a method on cached features, save it, then evaluate it on test once.

    Writes `results/<dataset folder>/<method folder>/` (a few-shot run: `.../shots_<K>/seed_<S>/`,
    with samples.json): metrics.json, predictions.csv, adapter.safetensors, curves.json
    (when it trains), classification_report.txt and the test figures.

    Args:
        lab: the run context.
        dataset: the dataset (a name is resolved by the lab: this is an entry point).
        method: the registered method's name.
        fit: its fit, the settings' options already bound.
        settings: prompt set and options, recorded in metrics.json.
        shots: K images per class (None: every image of train and val).
        seed: the seed of the sample and of the fit (None: the lab's).
        prepare: for a fit that needs more than the features (a prompt learner needs the
            lab's text tower): `prepare(lab, dataset, run data)` gives extra keyword arguments
            of `fit`, made after the sample is drawn and before the fit (never the test split).
        trains: whether the fit trains its module's parameters (False: they are computed from
            the data, and none counts as learned).

    Returns:
        The metrics.json content.
    """
    start = time.perf_counter()
    dataset = lab.resolve(dataset)
    fewshot.check_shots(shots)
    seed = lab.seed if seed is None else seed
    device = torch.device(lab.device)
    data = run_data(lab, dataset, method, shots, seed)
    fd, chosen, scores = feature_data(lab, dataset, data, settings.prompts)
    torch.manual_seed(seed)
    with VramProbe(device, label=f"{dataset.folder} {method}") as vram:
        fit_start = time.perf_counter()  # a prompt learner's text tower made ready counts in its fit
        extra = dict(prepare(lab, dataset, data)) if prepare is not None else {}
        fitted = fit(fd, **extra)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # note: a CPU-GPU sync point, once, for an honest fit time
        fit_seconds = time.perf_counter() - fit_start
    module = fitted.module.eval()
    if fitted.info.get("note"):  # e.g. GDA at one shot without augmented views: exactly zero-shot
        progress.info(f"note: {method}: {fitted.info['note']}")
    info = head_info(dataset=dataset.name, method=method, model=lab.model, class_names=dataset.original_names,
                     embed_dim=fd.dim, epoch=int(fitted.info.get("best_epoch", 0) or 0))
    save_module(data.folder / MODULE_FILE, module, fitted.config, info)
    if fitted.curves:
        write_json(data.folder / CURVES_FILE, fitted.curves)
    # Only now, with the fit saved, is the test split read: nothing above could select on it.
    test = lab.features(dataset, "test")
    logits = _scores(module, test.embeddings, device)
    learned, stored = _parameters(fitted, trains)
    # counted on the checkpoint the lab holds anyway: no inference model is rebuilt for a number
    encoder = image_encoder_parameters(lab.checkpoint().model)
    run = {
        "dataset": dataset.name, **dataset.record(), "split": "test", "method": method, "model": lab.model,
        **data.tags(),
        "seconds": time.perf_counter() - start, "train_seconds": fit_seconds,
        "trainable_params": learned, "stored_params": stored, "total_params": encoder + stored,
        "trainable_pct": 100.0 * learned / (encoder + stored),
        "epochs": len(fitted.curves), "best_epoch": fitted.info.get("best_epoch"),
        "peak_vram_mb": vram.peak_allocated_mb, "peak_reserved_mb": vram.peak_reserved_mb, "device": str(device),
        "n_train": len(fd.support_labels), "n_val": len(fd.val_labels), "fitted_on": "train",
        "selected_on": "val", "prompts": settings.prompts, "prompt_set": chosen, "prompt_val_top1": scores,
        "hyperparameters": {k: fitted.info[k] for k in HYPERPARAMETERS if isinstance(fitted.info.get(k), (int, float))},
        "fit_info": fitted.info, "head_init": config.HEAD_INIT_ZEROSHOT, "class_names_source": lab.class_naming,
        "config": {"seed": seed, **settings.options},
    }
    figures_root = lab.results_dir if shots is None else data.folder
    return save_evaluation(data.folder, logits=logits, labels=test.labels, paths=test.paths,
                           class_names=list(dataset.class_names), info=run, figure_prefix=f"{dataset.folder}_{method}",
                           results_dir=figures_root)


def read_cached(lab: Lab, dataset: Dataset, method: str, build: Callable[..., nn.Module], shots: int | None = None,
                seed: int | None = None) -> tuple[nn.Module, HeadInfo]:
    """A saved module of a run, checked against the lab's model and the dataset's classes.

    Raises:
        FileNotFoundError: not fitted yet (the message names the command to run).
        CheckpointError: damaged, or fitted for another dataset, class list or model.
    """
    seed = lab.seed if seed is None else seed
    path = fewshot.run_dir(lab.results_dir, dataset, method, shots, seed) / MODULE_FILE
    if not path.is_file():
        raise missing_checkpoint(path, dataset, method, shots, seed)
    module, info = read_module(path, build)
    clip = lab.checkpoint()  # its embedding size only: no inference model built for it (export needs none)
    check_head(info, head_info(dataset=dataset.name, method=method, model=lab.model,
                               class_names=dataset.original_names, embed_dim=clip.embed_dim), path)
    return module, info


def load_cached(lab: Lab, dataset: Dataset | str, method: str, build: Callable[..., nn.Module], *, shots: int | None = None,
                seed: int | None = None, prompt_set: str | None = None) -> ClipClassifier:
    """A saved module behind the lab's frozen vision tower, ready for prediction (eval mode).

    Args:
        lab: the run context (model, results folder, device).
        dataset: the dataset (a name is resolved by the lab).
        method: the registered method's name.
        build: the module's class.
        shots: the few-shot run's images per class (None: the full-data run).
        seed: the few-shot run's seed (None: the lab's).
        prompt_set: unused (the module holds the text classifier it was fitted with).
    """
    module, _ = read_cached(lab, lab.resolve(dataset), method, build, shots, seed)
    clip = lab.clip()
    # The module stays float32 beside an fp16 encoder: ClipClassifier casts the embedding up.
    return ClipClassifier(*clip.backbone.image_parts(clip.model), module.float().to(lab.device)).eval()


def renamed_scores(lab: Lab, trained_on: Dataset, new: Dataset, *, method: str, build: Callable[..., nn.Module],
                   text_for: Callable[[Lab, nn.Module, Dataset, Mapping[str, Any]], torch.Tensor],
                   shots: int | None, seed: int | None, run: Mapping[str, Any]) -> torch.Tensor:
    """Scores of `new`'s test images among `new`'s classes by a module fitted on `trained_on`
    whose class side is its `text` buffer `(C, D)` (CoOp, CLIP-Adapter): the buffer replaced
    by `text_for(lab, module, new, run)`, the same module otherwise.

    Args:
        lab: the run context.
        trained_on: the dataset (class set) the module was fitted on.
        new: the class set to score.
        method: the registered method's name.
        build: the module's class.
        text_for: the new classes' `(C_new, D)` unit text features.
        shots: the run's images per class (None: full data).
        seed: the run's seed.
        run: the run's metrics.json content.
    """
    module, _ = read_cached(lab, trained_on, method, build, shots, seed)
    device = torch.device(lab.device)
    module = module.float().to(device).eval()
    module.text = text_for(lab, module, new, run).float().to(device)
    return _scores(module, lab.features(new, "test").embeddings, device)


def has_checkpoint(folder) -> bool:
    """Whether a run folder holds a fitted module."""
    return (folder / MODULE_FILE).is_file()


def export_linear(lab: Lab, dataset: Dataset, *, method: str, build: Callable[..., nn.Module]
                  ) -> tuple[Clip, nn.Linear, HeadInfo, None]:
    """The base model (float32, its own copy) and the saved module as the linear head it is.

    For modules linear in the normalised image feature: `linear_head()` gives the equivalent
    `nn.Linear` (logits = W f + b), so the exported folder is the same as a linear probe's.
    """
    module, info = read_cached(lab, dataset, method, build)
    return lab.model_copy("cpu"), module.linear_head(), info, None


@dataclass(frozen=True)
class Option:
    """A method's own option: `--NAME` on its command line, the keyword of its `fit`.

    Left out, the option is None and the method uses its default (or searches the value on
    validation, where the method does).
    """

    name: str
    type: Callable[[str], Any]
    help: str


def cached_method(*, name: str, label: str, command: str, description: str, order: float,
                  fit: Callable[..., Fitted], build: Callable[..., nn.Module], options: tuple[Option, ...] = (),
                  epochs: bool = False, linear: bool = False, new_classes: str = "fallback",
                  score_new: Callable[..., torch.Tensor] | None = None, aliases: tuple[str, ...] = ()) -> Method:
    """The declaration of a method fitted on cached features (its module registers it).

    Args:
        name: canonical name, also its results folder.
        label: how tables and figures name it.
        command: its CLI command.
        description: one line for `--help`.
        order: position in tables and figures.
        fit: `fit(FeatureData, *, seed, **options) -> Fitted`.
        build: the module's class (rebuilt from its saved config).
        options: its own command-line options (each a keyword of `fit`).
        epochs: it trains over epochs (curves.json); `--epochs` of a sweep reaches it when it
            has an `epochs` option.
        linear: its module is linear in the feature (`linear_head()`), so it exports.
        new_classes: how it scores classes it did not fit on (`registry.NewClasses`).
        score_new: how a "text" method scores new classes (`registry.Method.score_new`).
        aliases: other names accepted on input.
    """

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_cached_arguments(parser)
        group = parser.add_argument_group(label)
        for o in options:
            group.add_argument(f"--{o.name.replace('_', '-')}", dest=o.name, type=o.type, default=None, help=o.help)

    def run(lab: Lab, dataset: Dataset | str, settings: CachedSettings, *, shots: int | None = None, seed: int | None = None,
            resume: bool = False, callbacks: tuple = ()) -> dict:
        seed = lab.seed if seed is None else seed
        bound = functools.partial(fit, seed=seed, **settings.options)
        return run_cached(lab, dataset, name, bound, settings, shots=shots, seed=seed, trains=epochs)

    def load_classifier(lab: Lab, dataset: Dataset | str, **kwargs: Any) -> ClipClassifier:
        return load_cached(lab, dataset, name, build, **kwargs)

    return Method(
        name=name, label=label, command=command, folder=name, description=description, order=order, aliases=aliases,
        trained=True, epochs=epochs, uses_text_classifier=True, new_classes=new_classes,
        add_arguments=add_arguments, settings=functools.partial(cached_settings, options=tuple(o.name for o in options)),
        run=run, recorded=recorded, load_classifier=load_classifier, has_checkpoint=has_checkpoint, fit=fit,
        export=functools.partial(export_linear, method=name, build=build) if linear else None,
        score_new=score_new,
    )
