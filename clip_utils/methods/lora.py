"""LoRA fine-tuning of CLIP with peft, on the shared training loop: the vision tower, the text tower or both.

    metrics = run_lora(lab, "flowers102")                     # config.LORA, config.LORA_SETTINGS
    metrics = run_lora(lab, "flowers102", cfg, LoraSettings(rank=4, alpha=8), resume=True)
    metrics = run_lora(lab, "flowers102", *clip_lora_preset(lab, "flowers102"))   # CLIP-LoRA
    metrics = run_lora(lab, "flowers102", replace(cfg, seed=1), shots=4)   # lora/shots_4/seed_1/
    classifier = load_classifier(lab, "flowers102")           # the best epoch, for predictions

LoRA trains a copy of the lab's checkpoint made on the CPU (`Lab.model_copy`: the lab's
model is shared with zero-shot and the probe, so it must not receive adapters, and the
checkpoint is not read from disk again), and only the towers training uses move to the
GPU: frozen base weights in bf16 on CUDA (fp32 on the CPU), adapters and head fp32. The
lab's inference model (fp16 on CUDA) is freed first, so GPU memory, and its reported peak,
hold LoRA's model alone. Training runs in bf16 autocast on CUDA (the head and logits in fp32), on
augmented images decoded where the model runs (`inputs.iter_labelled_batches`: nvJPEG
and GPU resizing on CUDA).

Which towers (`LoraSettings.encoders`, `lora --encoders`):

- `vision` (the default): peft wraps `model.vision_model` alone, and a linear head is
  trained with it (LP-FT, below); the text tower stays on the CPU.
- `text`, `both`: peft wraps `model.text_model` too (the same target names: both towers call
  their layers q/k/v/out_proj, fc1, fc2), and the classifier is CLIP's own
  (`methods.lora_adapters.TextTowerClassifier`): the `domain` prompts re-encoded at every step, times the
  fixed logit scale, as CLIP-LoRA trains. No head is trained; the best epoch's class
  embeddings are saved as the head (`frozen_head`), so test and predict run the same
  `ClipClassifier` as for vision LoRA. With no linear head, LP-FT's start from the probe does
  not apply: metrics.json says `head_init: "text"`, and the adapters are the one parameter group.

The head of vision LoRA (LP-FT). It starts from the linear probe trained on the same images
(same dataset, model, class list, shots and seed: `methods.common.probe_head`) when that run has
finished, else from the lab's `domain` text classifier; metrics.json says which (`head_init`).
It trains in the probe's units (`heads.StandardizedHead` with the mean and scale of the frozen
encoder's cached training embeddings, `heads.head_units`), in its own parameter group at
`cfg.head_lr` while the adapters train at `cfg.lr`: in raw units, at the adapters' rate, a
head barely moves, and LoRA, which contains the probe, would end below it. The checkpoint
holds the equivalent raw-unit head, like the probe's.

Few-shot runs (`shots=K`) work with every `encoders` setting: the K-shot sample decides
which images train and validate, in `lora/shots_K/seed_S/`.

The best epoch's adapters are saved with `save_pretrained` into `results/<dataset folder>/lora/adapter/`
(vision) and `text_adapter/` (text) beside `head.safetensors`, and test evaluation reads them
back onto another copy of the checkpoint through `load_classifier`, exactly as `predict --method lora` does.

Trainable parameters. peft adds `A` (r x d_in) and `B` (d_out x r) to each adapted linear
layer, so each contributes `r * (d_in + d_out)`; a trained head adds `D * C + C`. For ViT-L/14
with r=8 on q_proj and v_proj: 24 layers x 2 x 8 x (1024 + 1024) = 786,432, plus the head.
CLIP-LoRA's setting (r=2 on q, k, v of both towers, no head): 24 x 3 x 2 x 2048 = 294,912 in
the vision tower plus 12 x 3 x 2 x 1536 = 110,592 in the text tower (width 768).
`lora_trainable_params` computes this from the config, and `run_lora` checks it against the
model's actual parameters.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clip_utils import config
from clip_utils.config import LoraSettings, TrainConfig
from clip_utils.data import Dataset
from clip_utils.errors import InvalidValue
from clip_utils.lab import Lab, inference_dtype
from clip_utils.methods.common import (
    HEAD_INIT_SET,
    RunData,
    freeing_memory_on_failure,
    probe_head,
    resolved,
    run_data,
    run_info,
    zeroshot_init_head,
)
from clip_utils.methods.lora_adapters import (
    TextTowerClassifier,
    attach_adapter,
    class_tokens,
)
from clip_utils.model.clip import Clip
from clip_utils.model.heads import (
    ClipClassifier,
    StandardizedHead,
    count_parameters,
    head_units,
    zeroshot_head,
)
from clip_utils.model.inputs import iter_labelled_batches
from clip_utils.model.lora import add_lora, lora_trainable_params
from clip_utils.model.preprocess import Preprocess
from clip_utils.model.training import EpochCallback, FitResult, TrainJob, fit, predict
from clip_utils.model.vram import VramProbe
from clip_utils.prompts import build_text_classifier, zeroshot_logits
from clip_utils.registry import Method, register
from clip_utils.results import fewshot
from clip_utils.results.checkpoints import (
    ADAPTER_DIR,
    HEAD_FILE,
    TEXT_ADAPTER_DIR,
    HeadInfo,
    check_head,
    head_info,
    missing_checkpoint,
    read_head,
    save_adapter,
    save_head,
)
from clip_utils.results.evaluation import save_evaluation
from clip_utils.runtime import distributed
from clip_utils.runtime.options import (
    Given,
    add_sample_options,
    add_training_options,
    fraction,
    given,
    name_list,
    positive_float,
    positive_int,
)
from clip_utils.runtime.progress import write

METHOD = "lora"


@dataclass
class _Trained:
    result: FitResult
    trainable: int
    total: int
    pre: Preprocess


@dataclass
class _Prompts:
    """What CLIP's own classifier starts from when the text tower is adapted."""

    class_names: list[str]
    templates: list[str]


def _train(lab: Lab, dataset: Dataset, data: RunData, splits: dict, start: StandardizedHead | _Prompts,
           cfg: TrainConfig, lora: LoraSettings, resume: bool, callbacks: Sequence[EpochCallback],
           head_init: str) -> _Trained:
    """Build the LoRA classifier (on the head `start`, or CLIP's own from the prompts `start`)
    and run the shared loop; the training copy is freed on return."""
    device = torch.device(lab.device)
    out = data.folder
    class_names = dataset.original_names
    # Copied on the CPU in the checkpoint's fp32 (the logit scale is read before any cast),
    # and only the towers training uses move to the GPU: with the vision tower alone adapted,
    # the text tower (a quarter of ViT-L/14's CLIP) has no part in training. peft's mixed-
    # precision recipe: frozen base weights in bf16 on CUDA (half the memory, no fp32 -> bf16
    # re-cast under autocast at every step), adapters upcast to fp32 by peft
    # (`autocast_adapter_dtype`), the head fp32. The CPU keeps fp32: bf16 is slow there.
    base_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    clip = lab.model_copy("cpu")  # its own copy: the adapters go into it
    model = clip.model
    model.requires_grad_(False)
    # The family says which modules hold each side (SigLIP: no projections, its towers
    # pool and project inside).
    vision_model, visual_projection = clip.backbone.image_parts(model)
    for module in (vision_model, visual_projection):
        if module is not None:
            module.to(device, base_dtype)
    # peft draws the adapters' initial A from the global generator: seeded, the same command
    # gives the same run in any process (`fit` re-seeds it at every epoch anyway).
    torch.manual_seed(cfg.seed)
    vision = add_lora(vision_model, lora) if lora.adapts_vision else vision_model
    text = None
    if isinstance(start, _Prompts):
        text_model, text_projection = clip.backbone.text_parts(model)
        for module in (text_model, text_projection):
            if module is not None:
                module.to(device, base_dtype)
        text = add_lora(text_model, lora)
        tokens = class_tokens(clip.tokenizer, start.class_names, start.templates,
                              model.config.text_config.max_position_embeddings, clip.backbone.text_kwargs(model))
        classifier = TextTowerClassifier(vision, visual_projection, text, text_projection, tokens,
                                         clip.logit_scale, clip.logit_bias)
    else:
        classifier = ClipClassifier(vision, visual_projection, start)  # the text tower is left behind
    head_params = [] if text is not None else list(start.parameters())
    expected = lora_trainable_params(model.config.vision_config, lora, len(class_names), clip.embed_dim,
                                     model.config.text_config)
    trainable, total = count_parameters(classifier)
    if trainable != expected:  # the count in metrics.json must be exact
        raise RuntimeError(f"LoRA trainable parameters: model has {trainable}, config gives {expected}")
    pre = clip.preprocess
    info = dict(dataset=dataset.name, method=METHOD, model=lab.model, class_names=class_names, embed_dim=clip.embed_dim,
                encoders=lora.encoders)

    def batches(split: str, order: torch.Tensor | None = None, augment: bool = False,
                desc: str | None = None) -> Iterable:
        ds = splits[split]
        return iter_labelled_batches([p for p, _ in ds.samples], torch.tensor(ds.targets), pre, device,
                                     base_dtype, cfg.batch_size, order=order, augment=augment,
                                     num_workers=lab.num_workers, desc=desc)

    def save_best(epoch: int) -> None:
        meta = head_info(**info, epoch=epoch)
        if lora.adapts_vision:
            save_adapter(out / ADAPTER_DIR, vision, meta)
        if text is not None:
            save_adapter(out / TEXT_ADAPTER_DIR, text, meta)
            # Called right after validation, in eval mode: the frozen head holds the very class
            # embeddings that validation scored.
            save_head(out / HEAD_FILE, classifier.frozen_head(), meta)
        else:
            save_head(out / HEAD_FILE, start.folded(), meta)  # the raw-unit equivalent, like the probe's

    adapters = [p for p in classifier.parameters() if p.requires_grad and all(p is not h for h in head_params)]
    n_train = len(splits["train"])
    # Under torchrun each rank decodes and trains on its share of every global batch; index
    # n_train is the padding slot of those shares (distributed.rank_order).
    train_paths, train_labels = distributed.padded([p for p, _ in splits["train"].samples],
                                                   torch.tensor(splits["train"].targets))

    def train_batches(epoch: int, generator: torch.Generator) -> Iterable:
        order, per_rank = distributed.rank_order(torch.randperm(n_train, generator=generator), cfg.batch_size)
        return iter_labelled_batches(train_paths, train_labels, pre, device, base_dtype, per_rank, order=order,
                                     augment=cfg.augment, num_workers=lab.num_workers)

    job = TrainJob(
        name=f"{dataset.folder} LoRA", model=classifier,
        train_batches=train_batches,
        val_batches=lambda: batches("val", desc=f"validating {dataset.folder} LoRA"),
        steps_per_epoch=math.ceil(n_train / cfg.batch_size), save_best=save_best,
        checkpoints=(HEAD_FILE, ADAPTER_DIR, TEXT_ADAPTER_DIR), out_dir=out, device=device, batch_size=cfg.batch_size,
        oom_hint=" or add --grad-checkpointing (LoraSettings(grad_checkpointing=True))",
        fingerprint={"dataset": dataset.name, **dataset.record(), "model": lab.model, "method": METHOD, "class_naming": lab.class_naming,
                     "domain": lab.domain, "n_train": n_train, "shots": data.shots, "head_init": head_init,
                     "head_units": None if text is not None else "standard x 768/D",
                     "sample": fewshot.sample_digest([p for s in ("train", "val") for p, _ in splits[s].samples]),
                     **{f"lora_{k}": v for k, v in asdict(lora).items() if k != "grad_checkpointing"}},
        # The adapters first (the curves' lr is theirs), then the head at its own rate (CLIP's
        # own classifier, with the text tower adapted, has no head: one group).
        param_groups=[{"params": adapters}] + ([{"params": head_params, "lr": cfg.head_lr or cfg.lr}]
                                               if head_params else []),
    )
    return _Trained(fit(job, cfg, resume=resume, callbacks=callbacks), trainable, total, pre)


def _probe_head_on_cpu(lab: Lab, dataset: Dataset, data: RunData) -> nn.Linear | None:
    head = probe_head(lab, dataset, data)
    return None if head is None else head.cpu()


def clip_lora_preset(lab: Lab, dataset: Dataset | str, shots: int | None = None,
                     seed: int | None = None) -> tuple[TrainConfig, LoraSettings]:
    """CLIP-LoRA's settings (`config.CLIP_LORA`, `config.CLIP_LORA_SETTINGS`) with its iteration
    count for this dataset's training split in epochs (`config.clip_lora_epochs`).

    Args:
        lab: the run context (the training split is listed, not read).
        dataset: the dataset.
        shots: a few-shot run's images per class (None: the whole training split).
        seed: the few-shot run's seed (None: the lab's); it decides the sample's size only
            where a class has fewer than `shots` images.
    """
    fewshot.check_shots(shots)
    dataset = lab.resolve(dataset)
    train, n_classes = lab.dataset(dataset, "train"), len(dataset.class_names)
    n_train = len(train)
    if shots is not None:
        sample = fewshot.draw(train.samples, lab.dataset(dataset, "val").samples, shots,
                              lab.seed if seed is None else seed)
        n_train = len(sample.train)
    cfg = config.CLIP_LORA
    return replace(cfg, epochs=config.clip_lora_epochs(n_train, n_classes, cfg.batch_size)), config.CLIP_LORA_SETTINGS


def run_lora(lab: Lab, dataset: Dataset | str, cfg: TrainConfig = config.LORA, lora: LoraSettings = config.LORA_SETTINGS,
             resume: bool = False, callbacks: Sequence[EpochCallback] = (), *, shots: int | None = None) -> dict:
    """Fine-tune CLIP with LoRA, evaluate the best epoch on test, save everything.

    Writes `results/<dataset folder>/lora/` (a few-shot run: `.../shots_<K>/seed_<S>/`, with
    samples.json): metrics.json, predictions.csv, curves.json, head.safetensors, adapter/
    and/or text_adapter/ (peft), classification_report.txt, resume.pt, and the test figures
    (a few-shot run's in its own `figures/`).

    Args:
        lab: the run context (model, data, results folder, device, seed).
        dataset: the dataset (a name is resolved by the lab: this is an entry point).
        cfg: hyper-parameters (default: `config.LORA`, as the CLI and Task2.ipynb;
            `augment=False` trains on centre crops; `head_lr` is the head's rate with the
            vision tower alone adapted). `cfg.seed` (else the lab's) also draws a few-shot sample.
        lora: adapter settings (default: `config.LORA_SETTINGS`: the vision tower alone;
            `clip_lora_preset` gives CLIP-LoRA's).
        resume: continue an interrupted run from its last completed epoch.
        callbacks: called as `callback(epoch, curve_entry)` after each epoch.
        shots: train on this many images per class, validate on min(shots, 4) per class
            (None: every image). The head starts from the probe of the same shots and seed.

    Returns:
        The metrics.json content (with `shots`, `seed`, `head_init`, `n_train`, `n_val`).
    """
    start = time.perf_counter()
    dataset = lab.resolve(dataset)
    fewshot.check_shots(shots)
    cfg = resolved(cfg, lab)
    device = torch.device(lab.device)
    data = run_data(lab, dataset, METHOD, shots, cfg.seed)
    out = data.folder
    # The test split is listed in `evaluate`, after the best epoch is saved: nothing before can select on it.
    splits = {s: data.split(lab.dataset(dataset, s), s) for s in ("train", "val")}
    class_names = list(dataset.class_names)
    begin: StandardizedHead | _Prompts
    if lora.adapts_text:
        # CLIP's own classifier, from the prompts the zero-shot head would use: no linear head,
        # so LP-FT's start from the probe does not apply.
        begin = _Prompts(class_names, list(lab.prompt_sets(dataset)[HEAD_INIT_SET]))
        head_init = "text"
    else:
        # The probe's head is in the results folder: rank 0 reads it and sends it (on the CPU)
        # to every rank, so all ranks build the same head and agree on head_init.
        start_head = distributed.on_main(_probe_head_on_cpu, lab, dataset, data)
        if start_head is not None:
            start_head = start_head.to(device)
        head_init = config.LORA_HEAD_FROM if start_head is not None else config.HEAD_INIT_ZEROSHOT
        if start_head is None:
            start_head = zeroshot_init_head(lab, dataset)  # the zero-shot start, from the lab's model
        # The probe's units: the frozen encoder's training embeddings (cached; the probe's own).
        mean, scale = head_units(lab.features(dataset, "train").subset(data.train).embeddings.to(device))
        begin = StandardizedHead(start_head, mean, scale)
    # Then the lab's inference model (fp16 ViT-L/14 on CUDA) is not needed: free it, so LoRA
    # has that memory and its peak is its own.
    lab.unload()
    with VramProbe(device, label=f"{dataset.folder} LoRA") as vram:
        trained = freeing_memory_on_failure(_train, lab, dataset, data, splits, begin, cfg, lora, resume, callbacks,
                                            head_init)
    result, trainable, total, pre = trained.result, trained.trainable, trained.total, trained.pre

    recorded_lora = adapter_config(lora)
    extra = {"head_init": head_init, "n_train": len(splits["train"]), "n_val": len(splits["val"])}

    test = data.split(lab.dataset(dataset, "test"), "test")  # every rank: a download waits on the others

    def evaluate() -> dict:  # on rank 0 alone: it reads the checkpoint and writes the results
        best = load_classifier(lab, dataset, shots, cfg.seed)
        dtype = best.encoder_dtype
        test_batches = iter_labelled_batches([p for p, _ in test.samples], torch.tensor(test.targets), pre, device,
                                             dtype, cfg.batch_size, num_workers=lab.num_workers,
                                             desc=f"testing {dataset.folder} LoRA")
        # The reloaded classifier is already in the inference dtype (fp16 on CUDA): no autocast,
        # which would recast its fp16 weights to bf16 and lose precision.
        logits, labels = predict(best, test_batches, device, autocast=False)
        run = run_info(lab, dataset, METHOD, cfg, result, trainable=trainable, total=total,
                       peak_vram_mb=vram.peak_allocated_mb, peak_reserved_mb=vram.peak_reserved_mb,
                       seconds=time.perf_counter() - start, extra_config=recorded_lora, data=data)
        # A few-shot run keeps its figures in its own folder: results/figures stays one set per method.
        return save_evaluation(out, logits=logits, labels=labels, paths=[p for p, _ in test.samples],
                               class_names=class_names, info=run | extra,
                               figure_prefix=f"{dataset.folder}_{METHOD}",
                               results_dir=lab.results_dir if shots is None else out)

    return distributed.on_main(evaluate)


def load_classifier(lab: Lab, dataset: Dataset | str, shots: int | None = None, seed: int | None = None) -> ClipClassifier:
    """The trained LoRA classifier of a dataset, ready for prediction: a `ClipClassifier` in eval mode.

    A copy of the lab's checkpoint (in the lab's inference dtype) gets the saved adapter:
    attaching it to the lab's shared model would change zero-shot predictions made later in
    the same process. A text-adapted run's head already holds its text tower's class
    embeddings, so its text adapter is not needed here (`export` merges it).

    Args:
        lab: the run context (model, results folder, device).
        dataset: the dataset (a name is resolved by the lab).
        shots: the few-shot run's images per class (None: the full-data run).
        seed: the few-shot run's seed (None: the lab's).

    Raises:
        FileNotFoundError: not trained yet (the message names the command to run).
        CheckpointError: damaged, or trained for another dataset, class list or model.
    """
    head, info, adapters = _saved_run(lab, lab.resolve(dataset), shots, seed, towers=(VISION,))
    clip = lab.model_copy(lab.device, inference_dtype(lab.device))
    vision, projection = clip.backbone.image_parts(clip.model)
    if VISION in adapters:
        vision = attach_adapter(vision, adapters[VISION], info, lab.device)
    # The head stays float32 beside an fp16 encoder: ClipClassifier casts the embedding up.
    return ClipClassifier(vision, projection, head.float().to(lab.device)).eval()


# ---------------------------------------------------------------------------- the registered method

@dataclass(frozen=True)
class LoraRunSettings:
    """A LoRA run's settings: the training loop's, the adapters', and the preset they came from.

    `train.epochs` None: the preset's iteration count for the dataset, worked out when it runs.
    """

    train: TrainConfig = config.LORA
    lora: LoraSettings = config.LORA_SETTINGS
    preset: str | None = None


def _add_arguments(parser) -> None:
    train, lora = config.LORA, config.LORA_SETTINGS
    add_training_options(parser, train)
    add_sample_options(parser)
    g = parser.add_argument_group("LoRA")
    g.add_argument("--head-lr", type=positive_float, default=train.head_lr, action=Given,
                   help="the head's learning rate with --encoders vision (its own parameter group, in the probe's "
                        "units; the head starts from the probe of the same shots and seed when one is saved) "
                        "(default: %(default)s)")
    g.add_argument("--preset", choices=tuple(config.LORA_PRESETS), default=None,
                   help="clip-lora: CLIP-LoRA's published settings (q,k,v of both encoders, r=2, alpha=1, "
                        "dropout 0.25, lr 2e-4, batch 32, no warm-up, its 500 iterations per shot as epochs, "
                        "see README); options given explicitly override it")
    g.add_argument("--encoders", choices=config.ENCODERS, default=lora.encoders,
                   help="towers to adapt: vision (a linear head on the adapted image embeddings), text or both "
                        "(CLIP's own classifier, the class prompts re-encoded at every step) (default: %(default)s)")
    g.add_argument("--rank", type=positive_int, default=lora.rank, help="LoRA rank r (default: %(default)s)")
    g.add_argument("--alpha", type=positive_float, default=lora.alpha, help="LoRA alpha (default: %(default)s)")
    g.add_argument("--dropout", type=fraction, default=lora.dropout, help="LoRA dropout (default: %(default)s)")
    g.add_argument("--targets", type=name_list, default=list(lora.targets),
                   help=f"comma list of layers to adapt in each adapted tower: {', '.join(config.TARGETS)} "
                        f"(default: {','.join(lora.targets)})")
    g.add_argument("--grad-checkpointing", action="store_true", default=lora.grad_checkpointing,
                   help="recompute activations in the backward pass: far less memory, about 25%% slower")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=train.augment,
                   help="train without image augmentation")


def _parser_defaults(args) -> dict | None:
    """A preset's values as the command's defaults (explicit options still win)."""
    if not getattr(args, "preset", None):
        return None
    train, lora = config.LORA_PRESETS[args.preset]
    return {"epochs": os.environ.get("CLIP_EPOCHS"),  # unset: the preset's count for the dataset
            "lr": train.lr, "weight_decay": train.weight_decay, "head_lr": train.head_lr, "augment": train.augment,
            "batch_size": os.environ.get("CLIP_BATCH_SIZE", str(train.batch_size)),
            "rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets),
            "grad_checkpointing": lora.grad_checkpointing, "encoders": lora.encoders}


def _lora_settings(args) -> LoraSettings:
    d = config.LORA_SETTINGS
    return LoraSettings(rank=getattr(args, "rank", d.rank), alpha=getattr(args, "alpha", d.alpha),
                        dropout=getattr(args, "dropout", d.dropout), targets=tuple(getattr(args, "targets", d.targets)),
                        grad_checkpointing=getattr(args, "grad_checkpointing", d.grad_checkpointing),
                        encoders=getattr(args, "encoders", d.encoders))


def _check_arguments(args) -> None:
    _lora_settings(args)  # rank, targets, towers: a ValueError names what is wrong
    if "head_lr" in given(args) and getattr(args, "encoders", "vision") != "vision":
        raise InvalidValue(f"--head-lr is the rate of the linear head that --encoders vision trains; --encoders "
                         f"{args.encoders} trains no head (CLIP's own classifier): leave --head-lr out")


def _settings(args) -> LoraRunSettings:
    preset = getattr(args, "preset", None)
    d = config.LORA_PRESETS[preset][0] if preset else config.LORA
    epochs = getattr(args, "epochs", None) or (None if preset else d.epochs)
    train = replace(d, epochs=epochs, lr=getattr(args, "lr", d.lr), weight_decay=getattr(args, "weight_decay", d.weight_decay),
                    head_lr=getattr(args, "head_lr", d.head_lr), augment=getattr(args, "augment", d.augment),
                    batch_size=args.batch_size, seed=args.seed)
    return LoraRunSettings(train, _lora_settings(args), preset)


def _run(lab: Lab, dataset: Dataset | str, settings: LoraRunSettings, *, shots: int | None = None, seed: int | None = None,
         resume: bool = False, callbacks: Sequence[EpochCallback] = ()) -> dict:
    cfg = settings.train if seed is None else replace(settings.train, seed=seed)
    if cfg.epochs is None:  # a preset without --epochs: its iteration count for this dataset
        cfg = replace(cfg, epochs=clip_lora_preset(lab, dataset, shots=shots, seed=cfg.seed)[0].epochs)
        write(f"--preset {settings.preset}: {cfg.epochs} epochs (CLIP-LoRA's 500 iterations per training image per "
              f"class, at most 8000, at batch {config.LORA_PRESETS[settings.preset][0].batch_size})")
    return run_lora(lab, dataset, cfg, settings.lora, resume=resume, callbacks=callbacks, shots=shots)


def adapter_config(settings: LoraSettings) -> dict:
    """The adapter settings as `run_lora` records them in metrics.json's config."""
    return {"lora_" + k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()}


def _recorded(lab: Lab, settings: LoraRunSettings, seed: int) -> dict:
    cfg = replace(settings.train, seed=seed).resolved(lab.batch_size, lab.seed)
    return {"config": asdict(cfg) | adapter_config(settings.lora)}


def _load_classifier(lab: Lab, dataset: Dataset | str, *, shots: int | None = None, seed: int | None = None,
                     prompt_set: str | None = None) -> ClipClassifier:
    return load_classifier(lab, dataset, shots, seed)


def _has_checkpoint(folder) -> bool:
    # An adapter of either tower (`--encoders text` leaves no vision adapter).
    adapters = (folder / ADAPTER_DIR / "adapter_config.json", folder / TEXT_ADAPTER_DIR / "adapter_config.json")
    return (folder / HEAD_FILE).is_file() and any(p.is_file() for p in adapters)


VISION, TEXT = "vision_model", "text_model"  # the towers' attributes on every family's model
ADAPTER_DIRS = {VISION: ADAPTER_DIR, TEXT: TEXT_ADAPTER_DIR}


def _saved_run(lab: Lab, dataset: Dataset, shots: int | None, seed: int | None,
               towers: Sequence[str]) -> tuple[nn.Linear, HeadInfo, dict[str, Path]]:
    """A finished run's head and metadata, checked against the lab's model and the dataset, and
    the adapter folders of those of `towers` the run adapted.

    Raises:
        FileNotFoundError: not trained yet (the message names the command to run).
        CheckpointError: damaged, or trained for another dataset, class list or model.
    """
    seed = lab.seed if seed is None else seed
    folder = fewshot.run_dir(lab.results_dir, dataset, METHOD, shots, seed)
    if not (folder / HEAD_FILE).is_file():
        raise missing_checkpoint(folder / HEAD_FILE, dataset, METHOD, shots, seed)
    head, info = read_head(folder / HEAD_FILE)
    adapted = LoraSettings(encoders=info.encoders)
    adapters = {tower: folder / ADAPTER_DIRS[tower] for tower in towers
                if (adapted.adapts_vision if tower == VISION else adapted.adapts_text)}
    for adapter in adapters.values():
        if not (adapter / "adapter_config.json").is_file():
            raise missing_checkpoint(adapter, dataset, METHOD, shots, seed)
    check_head(info, head_info(dataset=dataset.name, method=METHOD, model=lab.model, class_names=dataset.original_names,
                               embed_dim=lab.checkpoint().embed_dim), folder / HEAD_FILE)
    return head, info, adapters


def _adapted(lab: Lab, dataset: Dataset, shots: int | None, seed: int | None,
             device: str | torch.device) -> tuple[Clip, torch.nn.Linear, HeadInfo]:
    """The base CLIP in float32 on `device` (its own copy) with a run's adapters merged into
    it, the run's head and its metadata.

    Raises:
        FileNotFoundError: not trained yet (the message names the command to run).
        CheckpointError: damaged, or trained for another dataset, class list or model.
    """
    head, info, adapters = _saved_run(lab, dataset, shots, seed, towers=(VISION, TEXT))
    clip = lab.model_copy(device)  # its own: merging changes it
    for tower, adapter in adapters.items():
        # peft injects the adapter into the tower in place, and merging puts plain Linear layers
        # with the merged weights back in place: the model holding the tower is adapted.
        attach_adapter(getattr(clip.model, tower), adapter, info, device).merge_and_unload()
    leftover = [n for n, _ in clip.model.named_parameters() if "lora_" in n]
    if leftover:
        raise RuntimeError(f"LoRA layers survived the merge: {leftover[:3]}")
    return clip, head, info


def _export(lab: Lab, dataset: Dataset) -> tuple[Clip, torch.nn.Linear, HeadInfo, str]:
    """The base CLIP in float32 with the run's adapters merged into it, its head and metadata, and
    the towers it adapted."""
    clip, head, info = _adapted(lab, dataset, None, None, "cpu")
    return clip, head, info, info.encoders


@torch.inference_mode()
def _score_new(lab: Lab, trained_on: Dataset, new: Dataset, *, shots: int | None, seed: int | None,
               run: Mapping[str, Any]) -> torch.Tensor:
    """New classes through the run's towers: its trained head has no row for them, so they are
    scored by CLIP's own classifier, the `domain` prompts of the new names (the set its head
    starts from) through the text tower, against the test images through the vision tower,
    each as the run left it (adapted or not: `--encoders`). A tower the run left unchanged
    gives what the lab already holds: its text classifier, or its cached test embeddings."""
    device = torch.device(lab.device)
    clip, _, info = _adapted(lab, trained_on, shots, seed, device)
    adapted = LoraSettings(encoders=info.encoders)
    clip.model.to(inference_dtype(device))
    if adapted.adapts_text:
        text = build_text_classifier(clip.model, clip.tokenizer, list(new.class_names),
                                     lab.prompt_sets(new)[HEAD_INIT_SET], device, lab.batch_size,
                                     desc=f"encoding {new.folder} prompts (LoRA)",
                                     text_kwargs=clip.backbone.text_kwargs(clip.model))
    else:
        text = lab.text_classifier(new, HEAD_INIT_SET).to(device)
    if not adapted.adapts_vision:
        test = lab.features(new, "test")
        return zeroshot_logits(test.embeddings.float().to(device), text.float(), clip.logit_scale, clip.logit_bias)
    head = zeroshot_head(text, clip.logit_scale, clip.logit_bias).to(device)
    classifier = ClipClassifier(*clip.backbone.image_parts(clip.model), head).eval()
    test = lab.dataset(new, "test")
    batches = iter_labelled_batches([p for p, _ in test.samples], torch.tensor(test.targets), clip.preprocess, device,
                                    classifier.encoder_dtype, lab.batch_size, num_workers=lab.num_workers,
                                    desc=f"testing {new.folder} LoRA")
    logits, _ = predict(classifier, batches, device, autocast=False)
    return logits


register(Method(
    name=METHOD, label="LoRA", command="lora", folder="lora", order=20,
    description="LoRA fine-tuning of the vision encoder, the text encoder or both",
    trained=True, epochs=True, new_classes="text", distributed=True, requires=(config.LORA_HEAD_FROM,),
    batch_size=config.LORA.batch_size, add_arguments=_add_arguments, parser_defaults=_parser_defaults,
    check_arguments=_check_arguments, settings=_settings, run=_run, recorded=_recorded,
    load_classifier=_load_classifier, has_checkpoint=_has_checkpoint, export=_export, score_new=_score_new,
))
