"""The linear probe: a linear head on the frozen vision encoder's cached embeddings.

    metrics = run_probe(lab, "flowers102")                    # L-BFGS (config.PROBE_SOLVER); linear_probe/
    metrics = run_probe(lab, "flowers102", refit=True)        # the CLIP paper's refit on train + val
    metrics = run_probe(lab, "flowers102", config.PROBE, solver="adamw", resume=True)   # the loop, resumed
    metrics = run_probe(lab, "flowers102", replace(cfg, seed=1), shots=4)   # linear_probe/shots_4/seed_1/
    classifier = load_classifier(lab, "flowers102")           # the saved head, for predictions

Two solvers. `lbfgs` (the default, `config.PROBE_SOLVER`) is the CLIP paper's probe
(`model.logreg`): scikit-learn's L-BFGS logistic regression on the L2-normalised cached
embeddings, C chosen on validation; fitted on the training images alone, as every other
method is, so methods compared side by side saw the same labelled images (`refit=True`,
`probe --refit`, refits on train + val as the paper does; a few-shot run never is, to stay
K-shot; `fitted_on` says which). Its curves.json holds one entry per C tried (`epoch` ranks
them), metrics.json the chosen `C` and `head_init: none` (no starting head). `adamw` is the
shared training loop: the head starts as the zero-shot classifier
(`methods.common.zeroshot_init_head`, `head_init: zeroshot`) and trains in head units of the
training embeddings (`heads.head_units`): CLIP embeddings share a large common component,
and in raw units a few epochs of gradient steps barely move the head's decisions.

The loop trains on cached features held on the device and sliced by a seeded permutation: no
DataLoader and no forward passes through the encoder. With `augment=True` it trains through
the frozen encoder on augmented images instead. Either way validation and test use the
cached (non-augmented) features: the encoder is frozen, so they are exact. A few-shot run
(`shots=K`) takes its K images per class (and min(K, 4) for validation) from the same cached
features, by index (`results.fewshot`): nothing is encoded again. The checkpoint always holds
the equivalent head on raw embeddings, so predicting needs nothing but the head.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from clip_utils import config
from clip_utils.config import TrainConfig
from clip_utils.data import Dataset
from clip_utils.errors import InvalidValue
from clip_utils.lab import Lab
from clip_utils.methods.common import (
    RunData,
    resolved,
    run_data,
    run_info,
    zeroshot_init_head,
)
from clip_utils.model.clip import Clip
from clip_utils.model.features import Features
from clip_utils.model.heads import (
    ClipClassifier,
    FrozenEncoderProbe,
    head_units,
    image_encoder_parameters,
    standardized_head,
    unstandardized_head,
)
from clip_utils.model.inputs import iter_labelled_batches
from clip_utils.model.logreg import fit_lbfgs
from clip_utils.model.training import (
    CURVES_FILE,
    Batch,
    EpochCallback,
    FitResult,
    TrainJob,
    clear_previous_run,
    fit,
    permuted_batches,
    predict,
)
from clip_utils.model.vram import VramProbe
from clip_utils.registry import Method, register
from clip_utils.results import fewshot
from clip_utils.results.checkpoints import (
    HEAD_FILE,
    TRAIN_HEAD_FILE,
    HeadInfo,
    check_head,
    checkpoint_paths,
    head_info,
    load_head,
    missing_checkpoint,
    read_head,
    save_head,
)
from clip_utils.results.evaluation import save_evaluation
from clip_utils.runtime import distributed
from clip_utils.runtime.files import write_json
from clip_utils.runtime.options import (
    add_sample_options,
    add_training_options,
    given,
    positive_int,
)

METHOD = "linear_probe"


def _train_adamw(lab: Lab, dataset: Dataset, data: RunData, feats: dict[str, Features], cfg: TrainConfig, info: dict,
                 resume: bool, callbacks: Sequence[EpochCallback]) -> FitResult:
    """The gradient probe on the shared loop: zero-shot start, head units, best epoch on validation."""
    device, out = torch.device(lab.device), data.folder
    model = lab.clip().model
    head = zeroshot_init_head(lab, dataset)
    train_x = feats["train"].embeddings.to(device)
    train_y = feats["train"].labels.to(device)
    val_x, val_y = feats["val"].embeddings.to(device), feats["val"].labels.to(device)
    # The head trains in head units of the training embeddings (same zero-shot start): in
    # raw units a few epochs of gradient steps barely move it. Checkpoints always hold the
    # equivalent head on raw embeddings.
    mean, std = head_units(train_x)
    unit_head = standardized_head(head, mean, std)
    val_x = (val_x - mean) / std
    if cfg.augment:
        trained: nn.Module = FrozenEncoderProbe(model, unit_head, mean, std)
        paths, pixel_dtype = feats["train"].paths, next(model.parameters()).dtype

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
        name=f"{dataset.folder} linear probe", model=trained, train_batches=train_batches,
        # The encoder is frozen: the cached validation features are exactly what it computes.
        val_batches=lambda: permuted_batches(val_x, val_y, max(cfg.batch_size, 1024)),
        steps_per_epoch=math.ceil(len(train_y) / cfg.batch_size),
        save_best=lambda epoch: save_head(out / HEAD_FILE, unstandardized_head(unit_head, mean, std),
                                          head_info(**info, epoch=epoch)),
        checkpoints=(HEAD_FILE, TRAIN_HEAD_FILE),  # an earlier L-BFGS run's train-only head goes too
        out_dir=out, device=device, batch_size=cfg.batch_size,
        # head_units: resume.pt holds the head in these units (older runs trained in raw or
        # plain standard units: same names and shapes, so only this tells them apart).
        fingerprint={"dataset": dataset.name, **dataset.record(), "model": lab.model, "method": METHOD, "class_naming": lab.class_naming,
                     "domain": lab.domain, "n_train": len(train_y), "augment": cfg.augment,
                     "head_units": "standard x 768/D", "shots": data.shots,
                     "sample": fewshot.sample_digest(feats["train"].paths + feats["val"].paths)},
        val_model=unit_head if cfg.augment else None,
        autocast=False,
    )
    return fit(job, cfg, resume=resume, callbacks=callbacks)


def _fit_lbfgs(data: RunData, feats: dict[str, Features], n_classes: int, info: dict,
               refit: bool) -> tuple[FitResult, float]:
    """The CLIP paper's probe: C swept on validation, refit on train + val when asked (full data
    only), saved like any head."""
    clear_previous_run(data.folder, (HEAD_FILE, TRAIN_HEAD_FILE))  # no earlier run's resume state or head survives
    # A K-shot run is never refit: on K + min(K, 4) images per class it would not be K-shot.
    refit = refit and data.shots is None
    fitted = fit_lbfgs(feats["train"].embeddings, feats["train"].labels, feats["val"].embeddings,
                       feats["val"].labels, n_classes, refit=refit)
    save_head(data.folder / HEAD_FILE, fitted.head, head_info(**info, epoch=fitted.best))
    if refit:  # what LoRA starts from: the head that has not seen the validation images
        save_head(data.folder / TRAIN_HEAD_FILE, fitted.train_head, head_info(**info, epoch=fitted.best))
    write_json(data.folder / CURVES_FILE, fitted.curves)
    seconds = sum(e["seconds"] for e in fitted.curves) + fitted.refit_seconds
    return FitResult(curves=fitted.curves, best_epoch=fitted.best, train_seconds=seconds), fitted.c


def run_probe(lab: Lab, dataset: Dataset | str, cfg: TrainConfig = config.PROBE, resume: bool = False,
              callbacks: Sequence[EpochCallback] = (), *, shots: int | None = None,
              solver: str = config.PROBE_SOLVER, refit: bool = config.PROBE_REFIT) -> dict:
    """Train a linear probe on the frozen encoder, evaluate it on test, save everything.

    Writes `results/<dataset folder>/linear_probe/` (a few-shot run: `.../shots_<K>/seed_<S>/`, with
    samples.json): metrics.json, predictions.csv, curves.json, head.safetensors,
    classification_report.txt, resume.pt (adamw), and the test figures (a few-shot run's in
    its own `figures/`).

    Args:
        lab: the run context (model, data, results folder, device, seed).
        dataset: the dataset (a name is resolved by the lab: this is an entry point).
        cfg: hyper-parameters (default: `config.PROBE`, as the CLI and Task2.ipynb); `cfg.seed`
            (else the lab's) also draws a few-shot sample. The lbfgs solver uses none of them.
        resume: continue an interrupted adamw run from its last completed epoch.
        callbacks: called as `callback(epoch, curve_entry)` after each adamw epoch.
        shots: train on this many images per class, validate on min(shots, 4) per class
            (None: every image).
        solver: `adamw` (the shared loop) or `lbfgs` (the CLIP paper's logistic regression).
        refit: lbfgs only: refit on train + val at the chosen C, as the CLIP paper does (the
            probe then fits on images the other methods only validate on; never with `shots`).

    Returns:
        The metrics.json content (with `shots`, `seed`, `solver`, `head_init`, `n_train`,
        `n_val`, and `C` for lbfgs).
    """
    start = time.perf_counter()
    dataset = lab.resolve(dataset)
    fewshot.check_shots(shots)
    if solver not in config.SOLVERS:
        raise InvalidValue(f"unknown probe solver {solver!r}: choose one of {', '.join(config.SOLVERS)}")
    if refit and solver != "lbfgs":
        raise InvalidValue("refit is the lbfgs solver's: the training loop keeps its best epoch on validation")
    if solver == "lbfgs" and cfg.augment:
        raise InvalidValue("the lbfgs solver fits the cached features; augmented training needs the adamw solver")
    cfg = resolved(cfg, lab)
    device = torch.device(lab.device)
    data = run_data(lab, dataset, METHOD, shots, cfg.seed)
    # The test split is read in `evaluate`, after the head is saved: nothing before can select on it.
    feats = {"train": lab.features(dataset, "train").subset(data.train),
             "val": lab.features(dataset, "val").subset(data.val)}
    model = lab.clip().model
    model.requires_grad_(False)  # frozen encoder; only the head learns
    class_names = list(dataset.class_names)
    embed_dim = feats["train"].embeddings.shape[1]
    info = dict(dataset=dataset.name, method=METHOD, model=lab.model, class_names=dataset.original_names,
                embed_dim=embed_dim)
    extra = {"solver": solver, "n_train": len(feats["train"]), "n_val": len(feats["val"])}
    with VramProbe(device, label=f"{dataset.folder} linear probe") as vram:
        if solver == "lbfgs":
            # CPU scikit-learn on cached features, writing the heads and curves: rank 0 alone
            # fits it and sends the result to the others (nothing there is collective).
            result, c = distributed.on_main(_fit_lbfgs, data, feats, len(class_names), info, refit)
            # No epochs: the "epochs" are the C values tried (curves.json has one entry each).
            cfg = replace(cfg, epochs=len(result.curves))
            extra |= {"C": c, "head_init": "none", "fitted_on": "train+val" if refit and not shots else "train"}
        else:
            result = _train_adamw(lab, dataset, data, feats, cfg, info, resume, callbacks)
            extra |= {"head_init": config.HEAD_INIT_ZEROSHOT}

    feats["test"] = lab.features(dataset, "test")  # every rank: the encoding is sharded under torchrun

    def evaluate() -> dict:  # on rank 0 alone: it reads the checkpoint and writes the results
        best, _ = load_head(data.folder / HEAD_FILE, head_info(**info))
        best = best.to(device)
        logits, labels = predict(best, permuted_batches(feats["test"].embeddings.to(device),
                                                        feats["test"].labels.to(device), 4096), device, autocast=False)
        encoder_params = image_encoder_parameters(model)
        head_params = embed_dim * len(class_names) + len(class_names)
        run = run_info(lab, dataset, METHOD, cfg, result, trainable=head_params,
                       total=encoder_params + head_params, peak_vram_mb=vram.peak_allocated_mb,
                       peak_reserved_mb=vram.peak_reserved_mb, seconds=time.perf_counter() - start, data=data)
        # A few-shot run keeps its figures in its own folder: results/figures stays one set per method.
        figures_root = lab.results_dir if shots is None else data.folder
        return save_evaluation(data.folder, logits=logits, labels=labels, paths=feats["test"].paths,
                               class_names=class_names, info=run | extra,
                               figure_prefix=f"{dataset.folder}_{METHOD}", results_dir=figures_root)

    return distributed.on_main(evaluate)


def load_classifier(lab: Lab, dataset: Dataset | str, shots: int | None = None, seed: int | None = None) -> ClipClassifier:
    """The trained probe of a dataset on the lab's frozen CLIP, ready for prediction (eval mode).

    Args:
        lab: the run context (model, results folder, device).
        dataset: the dataset (a name is resolved by the lab).
        shots: the few-shot run's images per class (None: the full-data run).
        seed: the few-shot run's seed (None: the lab's).

    Raises:
        FileNotFoundError: not trained yet (the message names the command to run).
        CheckpointError: damaged, or trained for another dataset, class list or model.
    """
    dataset = lab.resolve(dataset)
    path = fewshot.run_dir(lab.results_dir, dataset, METHOD, shots, lab.seed if seed is None else seed) / HEAD_FILE
    if not path.is_file():
        raise missing_checkpoint(path, dataset, METHOD, shots, lab.seed if seed is None else seed)
    head, info = read_head(path)
    clip = lab.clip()
    check_head(info, head_info(dataset=dataset.name, method=METHOD, model=lab.model, class_names=dataset.original_names,
                               embed_dim=clip.embed_dim), path)
    # The head stays float32 beside an fp16 encoder: ClipClassifier casts the embedding up.
    return ClipClassifier(*clip.backbone.image_parts(clip.model), head.float().to(lab.device)).eval()


# ---------------------------------------------------------------------------- the registered method

@dataclass(frozen=True)
class ProbeSettings:
    """A probe run's settings: the training loop's (adamw) and the solver."""

    train: TrainConfig = config.PROBE
    solver: str = config.PROBE_SOLVER
    refit: bool = config.PROBE_REFIT


SOLVER_HELP = ("lbfgs: the CLIP paper's L-BFGS logistic regression, C swept on validation (no epochs or learning "
               "rate; --refit refits on train + val); adamw: the training loop with the training options "
               "(default: %(default)s)")
# Options of the training loop: the lbfgs solver uses none of them.
LOOP_OPTIONS = ("epochs", "lr", "weight_decay", "resume", "augment")


def _add_arguments(parser) -> None:
    add_training_options(parser, config.PROBE)
    add_sample_options(parser)
    parser.add_argument("--solver", choices=config.SOLVERS, default=config.PROBE_SOLVER, help=SOLVER_HELP)
    parser.add_argument("--refit", action="store_true", default=config.PROBE_REFIT,
                        help="lbfgs: refit on train + val at the chosen C, as the CLIP paper does (the other methods "
                             "fit on train alone; not with --shots)")
    parser.add_argument("--augment", action="store_true", default=config.PROBE.augment,
                        help="train on augmented images (slower: no cached features; needs --solver adamw)")
    parser.add_argument("--encode-batch-size", type=positive_int, default=config.ENCODE_BATCH_SIZE,
                        help="images per forward pass when encoding the frozen features (default: %(default)s)")


def _add_sweep_arguments(parser) -> None:
    parser.add_argument("--solver", choices=config.SOLVERS, default=config.PROBE_SOLVER,
                        help="the linear probe's solver (default: %(default)s)")


def _check_arguments(args) -> None:
    if getattr(args, "refit", False) and getattr(args, "shots", None):
        raise InvalidValue("--refit adds the validation images to the fit: a K-shot run (--shots) stays K-shot")
    if getattr(args, "solver", config.PROBE_SOLVER) != "lbfgs":
        if getattr(args, "refit", False):
            raise InvalidValue("--refit is the lbfgs solver's: the training loop keeps its best epoch on validation")
        return
    if getattr(args, "augment", False):
        raise InvalidValue("--augment trains through the encoder with the training loop: add --solver adamw")
    wasted = [f"--{name.replace('_', '-')}" for name in LOOP_OPTIONS if name in given(args)]
    if wasted:
        raise InvalidValue(f"{', '.join(wasted)}: the lbfgs solver has no training loop (it sweeps C on validation); "
                         f"these options apply with --solver adamw")


def _settings(args) -> ProbeSettings:
    d = config.PROBE
    train = replace(d, epochs=getattr(args, "epochs", None) or d.epochs, lr=getattr(args, "lr", d.lr),
                    weight_decay=getattr(args, "weight_decay", d.weight_decay),
                    augment=getattr(args, "augment", d.augment), batch_size=args.batch_size, seed=args.seed)
    return ProbeSettings(train, getattr(args, "solver", config.PROBE_SOLVER), getattr(args, "refit", config.PROBE_REFIT))


def _run(lab: Lab, dataset: Dataset | str, settings: ProbeSettings, *, shots: int | None = None, seed: int | None = None,
         resume: bool = False, callbacks: Sequence[EpochCallback] = ()) -> dict:
    cfg = settings.train if seed is None else replace(settings.train, seed=seed)
    return run_probe(lab, dataset, cfg, resume=resume, callbacks=callbacks, shots=shots, solver=settings.solver,
                     refit=settings.refit)


def _recorded(lab: Lab, settings: ProbeSettings, seed: int) -> dict:
    if settings.solver == "lbfgs":
        return {"solver": settings.solver}  # no training settings: L-BFGS uses none of them
    return {"config": asdict(replace(settings.train, seed=seed).resolved(lab.batch_size, lab.seed)),
            "solver": settings.solver}


def _load_classifier(lab: Lab, dataset: Dataset | str, *, shots: int | None = None, seed: int | None = None,
                     prompt_set: str | None = None) -> ClipClassifier:
    return load_classifier(lab, dataset, shots, seed)


def _export(lab: Lab, dataset: Dataset) -> tuple[Clip, nn.Linear, HeadInfo, None]:
    """The base model in float32 (its own copy: saving rewrites its config), unchanged, and the probe's head."""
    clip = lab.model_copy("cpu")
    path = checkpoint_paths(lab.results_dir, dataset, METHOD)["head"]
    head, info = load_head(path, head_info(dataset=dataset.name, method=METHOD, model=lab.model,
                                           class_names=dataset.original_names, embed_dim=clip.embed_dim))
    return clip, head, info, None


register(Method(
    name=METHOD, label="linear probe", command="probe", folder="linear_probe", order=10, aliases=("probe",),
    description="linear probe on the frozen vision encoder",
    trained=True, epochs=True, new_classes="closed", distributed=True, batch_size=config.PROBE.batch_size,
    add_arguments=_add_arguments, add_sweep_arguments=_add_sweep_arguments, check_arguments=_check_arguments,
    settings=_settings, run=_run, recorded=_recorded, load_classifier=_load_classifier,
    has_checkpoint=lambda folder: (folder / HEAD_FILE).is_file(), export=_export,
))
