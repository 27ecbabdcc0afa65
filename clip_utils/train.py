"""One training loop for the linear probe and LoRA, and the linear probe itself.

    cfg = TrainConfig(epochs=30, lr=1e-3)
    metrics = run_probe(lab, "flowers102", cfg)               # results/flowers102/linear_probe/
    metrics = run_probe(lab, "flowers102", cfg, resume=True)  # after Ctrl-C: continue

`fit` is the loop both methods share: AdamW with linear warmup and cosine decay, bf16
autocast on CUDA for LoRA's encoder (heads always run in fp32), a validation pass and
`curves.json` after every epoch, the best epoch on validation (top-1, then lower loss)
saved by a method-specific callback, and a resume state written after every epoch. What
differs between the methods (which module is trained, where batches come from, how the
best weights are saved) is a `TrainJob`.

Interrupted runs. After each completed epoch the loop writes, atomically and in this
order, the best checkpoint (when it improved), `curves.json` and `resume.pt` (trainable
weights, optimizer, scheduler, epoch, curves, RNG state). A crash or Ctrl-C at any point
leaves a consistent last completed epoch, and `resume=True` continues from it. The data
order and every random draw of an epoch depend only on `(seed, epoch)` (torch's generators
are re-seeded at each epoch start), so a resumed run ends with the same curves as an
uninterrupted one, timings aside. `resume.pt` holds only tensors and plain containers and
is read with `torch.load(weights_only=True)`: nothing is unpickled.

The linear probe trains on cached features (`lab.features`), held on the device and
sliced by a seeded permutation: no DataLoader and no forward passes through the encoder,
so a Flowers102 probe takes seconds once the features exist. With `augment=True` it trains
through the frozen encoder on augmented images instead. Either way validation and test
use the cached (non-augmented) features: the encoder is frozen, so they are exact.

The head starts as the zero-shot classifier (the `domain` prompt set times CLIP's logit
scale, `models.zeroshot_head`), so epoch 0 is zero-shot accuracy rather than chance; on
the few images per class these datasets have, that converges faster and generalises better
than a zero init.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .results import atomic_path, method_dir, read_json, write_json

CURVES_FILE = "curves.json"
RESUME_FILE = "resume.pt"
# Test-set outputs of a previous run in the same folder (written after training ends).
STALE_ON_RESTART = ("metrics.json", "predictions.csv", "classification_report.txt")
# Loss checks sync the GPU; every few steps keeps the GPU queue full and still stops a
# diverged run within a handful of steps.
CHECK_EVERY = 10

Batch = tuple[torch.Tensor, torch.Tensor]
EpochCallback = Callable[[int, dict], None]


class TrainingError(RuntimeError):
    """A training run cannot go on; the message says what to try (printed as one line by the CLI)."""


@dataclass
class TrainConfig:
    """Hyper-parameters of a probe or LoRA run.

    Attributes:
        epochs: passes over the training split.
        lr: peak learning rate (after warmup).
        weight_decay: AdamW weight decay.
        augment: train on augmented images (LoRA always reads images; for the probe this
            means forward passes through the frozen encoder instead of cached features).
        batch_size: images per step (None: the lab's batch size).
        warmup: fraction of all steps spent warming the learning rate up from 0.
        label_smoothing: cross-entropy label smoothing.
        grad_clip: clip the gradient norm to this (None: no clipping).
        seed: seed of data order, augmentation and dropout (None: the lab's seed).
    """

    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.01
    augment: bool = False
    batch_size: int | None = None
    warmup: float = 0.1
    label_smoothing: float = 0.0
    grad_clip: float | None = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size must be positive, got {self.batch_size}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class TrainJob:
    """What one method trains and how; everything else is `fit`'s.

    Attributes:
        name: label for progress bars and messages (`flowers102 linear probe`).
        model: the module to train; its parameters with `requires_grad` are trained.
        train_batches: `(epoch, generator) -> (inputs, labels)` batches on the device; the
            order must come from `generator` (seeded from seed and epoch).
        val_batches: `() -> (inputs, labels)` batches of the validation split.
        steps_per_epoch: batches per training epoch.
        save_best: `epoch -> None`, writes the checkpoint of the current weights.
        out_dir: the method's results folder (curves.json, resume.pt).
        device: where training runs.
        batch_size: for the out-of-memory message.
        oom_hint: extra advice when CUDA runs out of memory.
        fingerprint: everything besides `TrainConfig` a resumed run must share (dataset,
            model, training set size, LoRA settings...).
        val_model: what `val_batches` are fed to, when not `model` (the augmented probe
            trains through the encoder but validates its head on cached embeddings).
        progress: progress bars and a line per epoch (off for timing runs such as the benchmark).
        autocast: bf16 autocast on CUDA. On for LoRA (the encoder's matmuls); off for the
            probe, a linear layer with nothing to gain, whose bf16 logits (8-bit mantissa)
            would flip close calls between classes.
    """

    name: str
    model: nn.Module
    train_batches: Callable[[int, torch.Generator], Iterable[Batch]]
    val_batches: Callable[[], Iterable[Batch]]
    steps_per_epoch: int
    save_best: Callable[[int], None]
    out_dir: Path
    device: torch.device
    batch_size: int
    oom_hint: str = ""
    fingerprint: dict = field(default_factory=dict)
    val_model: nn.Module | None = None
    progress: bool = True
    autocast: bool = True


@dataclass
class FitResult:
    """Outcome of `fit`: the curves (one dict per epoch) and the best epoch (1-based)."""

    curves: list[dict]
    best_epoch: int
    train_seconds: float


# --------------------------------------------------------------------------- pure helpers


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch: a hash, so neighbouring (seed, epoch) pairs never collide."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:7], "little")


def best_epoch(curves: Sequence[dict]) -> int:
    """The best epoch on validation: highest top-1, then lowest loss, then earliest (0: none)."""
    best, key = 0, None
    for entry in curves:
        k = (entry["val_acc"], -entry["val_loss"])
        if key is None or k > key:
            best, key = entry["epoch"], k
    return best


def permuted_batches(
    inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> Iterable[Batch]:
    """Minibatches of in-memory tensors in a seeded random order (or in order without a generator).

    Args:
        inputs: `(N, ...)` tensors on the device.
        labels: `(N,)` labels on the same device.
        batch_size: rows per batch (the last batch may be smaller).
        generator: CPU generator for the permutation; None keeps the order.
    """
    n = len(labels)
    if generator is None:
        order = torch.arange(n, device=labels.device)
    else:
        order = torch.randperm(n, generator=generator).to(labels.device)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        yield inputs[idx], labels[idx]


def _autocast(device: torch.device, enabled: bool = True):
    # bf16 on CUDA: fp32 range, so no loss scaling; CPU stays fp32 (bf16 there is slow).
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters of `model` (those with `requires_grad`), on CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- the loop


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Batch], device: torch.device,
            autocast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`(logits, labels)` of every batch, float32 on CPU, model in eval mode.

    Args:
        model: the classifier.
        batches: `(inputs, labels)` pairs.
        device: where the model runs.
        autocast: bf16 autocast on CUDA (see `TrainJob.autocast`).
    """
    model.eval()
    logits, labels = [], []
    with _autocast(device, autocast):
        for x, y in batches:
            logits.append(model(x).float())  # on the device: no host sync per batch
            labels.append(y)
    return torch.cat(logits).cpu(), torch.cat(labels).cpu()


def _validate(job: TrainJob) -> tuple[float, float]:
    logits, labels = predict(job.val_model or job.model, job.val_batches(), job.device, job.autocast)
    loss = F.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


def _diverged(value: float, epoch: int, step: int, cfg: TrainConfig) -> TrainingError:
    return TrainingError(
        f"training loss became {value} at epoch {epoch}, step {step}: the run diverged. Try a lower "
        f"learning rate (--lr {cfg.lr / 10:g}), a smaller batch size or gradient clipping; "
        f"the last good epoch's checkpoint and curves are kept."
    )


def _train_epoch(job: TrainJob, cfg: TrainConfig, optimizer, scheduler, epoch: int) -> float:
    job.model.train()
    params = [p for p in job.model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(epoch_seed(cfg.seed or 0, epoch))
    total = torch.zeros((), device=job.device)
    seen = step = 0
    bar = tqdm(job.train_batches(epoch, generator), total=job.steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}",
               unit="step", leave=False, disable=not job.progress)
    for step, (x, y) in enumerate(bar, start=1):
        with _autocast(job.device, job.autocast):
            logits = job.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        total += loss.detach() * len(y)
        seen += len(y)
        if step % CHECK_EVERY == 0 or step == job.steps_per_epoch:
            mean = total.item() / seen
            if not math.isfinite(mean):
                raise _diverged(mean, epoch, step, cfg)
            bar.set_postfix(loss=f"{mean:.4f}")
    if seen == 0:
        raise TrainingError(f"{job.name}: the training split yielded no batches")
    mean = total.item() / seen
    if not math.isfinite(mean):
        raise _diverged(mean, epoch, step, cfg)
    return mean


def _state_fingerprint(job: TrainJob, cfg: TrainConfig) -> dict:
    return {**asdict(cfg), **job.fingerprint, "steps_per_epoch": job.steps_per_epoch}


def _save_state(job: TrainJob, cfg: TrainConfig, optimizer, scheduler, epoch: int, curves: list[dict]) -> None:
    state = {
        "epoch": epoch,
        "curves": curves,
        "fingerprint": _state_fingerprint(job, cfg),
        "weights": trainable_state(job.model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        # Each epoch re-seeds from (seed, epoch); the state is kept so that anything
        # drawing random numbers between epochs would also continue identically.
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    with atomic_path(job.out_dir / RESUME_FILE) as tmp:
        torch.save(state, tmp)


def _load_state(job: TrainJob, cfg: TrainConfig, optimizer, scheduler) -> tuple[int, list[dict]]:
    """Restore the last completed epoch; returns `(epoch, curves)`, `(0, [])` when none saved."""
    file = job.out_dir / RESUME_FILE
    if not file.is_file():
        tqdm.write(f"{job.name}: nothing to resume in {job.out_dir}, starting from epoch 1")
        return 0, []
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign file: say which, never unpickle it
        raise TrainingError(f"cannot read the resume state {file} ({err}); delete it or run without --resume") from err
    saved, now = state["fingerprint"], _state_fingerprint(job, cfg)
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise TrainingError(
            f"cannot resume {job.name} from {file}: the settings changed ({diffs}). Resume with the "
            f"original settings, or run without --resume to start over."
        )
    current = dict(job.model.named_parameters())
    if set(state["weights"]) != {n for n, p in current.items() if p.requires_grad}:
        raise TrainingError(f"{file} holds other trainable weights than {job.name}; run without --resume")
    with torch.no_grad():
        for name, value in state["weights"].items():
            current[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["epoch"]), list(state["curves"])


def fit(
    job: TrainJob, cfg: TrainConfig, *, resume: bool = False, callbacks: Sequence[EpochCallback] = ()
) -> FitResult:
    """Train `job.model`, validating, checkpointing and saving curves after every epoch.

    Args:
        job: what to train and how (see `TrainJob`).
        cfg: hyper-parameters (`cfg.seed` must be set).
        resume: continue from `job.out_dir/resume.pt` when it exists.
        callbacks: called as `callback(epoch, curve_entry)` after each epoch is saved.

    Raises:
        TrainingError: diverged (NaN/inf loss), CUDA out of memory, or an unusable resume state.
    """
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in job.model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError(f"{job.name}: nothing to train (no parameter requires grad)")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * job.steps_per_epoch
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup * total_steps), total_steps)
    if resume:
        done, curves = _load_state(job, cfg, optimizer, scheduler)
    else:
        done, curves = 0, []
        # A fresh run over an old one: drop the old run's outputs now, so that a crash before
        # this run ends can never leave old metrics beside new curves.
        for name in (CURVES_FILE, RESUME_FILE, *STALE_ON_RESTART):
            (job.out_dir / name).unlink(missing_ok=True)

    oom = False
    try:
        for epoch in tqdm(range(done + 1, cfg.epochs + 1), desc=job.name, unit="epoch",
                          initial=done, total=cfg.epochs, disable=not job.progress):
            start = time.perf_counter()
            torch.manual_seed(epoch_seed(cfg.seed or 0, epoch))
            train_loss = _train_epoch(job, cfg, optimizer, scheduler, epoch)
            val_loss, val_acc = _validate(job)
            entry = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc,
                     "seconds": time.perf_counter() - start, "lr": scheduler.get_last_lr()[0]}
            curves.append(entry)
            if best_epoch(curves) == epoch:
                job.save_best(epoch)
            write_json(job.out_dir / CURVES_FILE, curves)
            _save_state(job, cfg, optimizer, scheduler, epoch, curves)
            if job.progress:
                tqdm.write(f"{job.name} epoch {epoch}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                           f"val top-1 {val_acc:.2%}")
            for callback in callbacks:
                callback(epoch, entry)
    except torch.OutOfMemoryError:
        oom = True  # raise outside the handler so the traceback's tensors can be freed
    finally:
        job.model.eval()
    if oom:
        torch.cuda.empty_cache()
        raise TrainingError(
            f"CUDA out of memory while training {job.name} at batch size {job.batch_size}: try "
            f"--batch-size {max(1, job.batch_size // 2)} (CLIP_BATCH_SIZE={max(1, job.batch_size // 2)} in the "
            f"notebook){job.oom_hint}. Completed epochs are kept."
        )
    return FitResult(curves=curves, best_epoch=best_epoch(curves),
                     train_seconds=sum(e["seconds"] for e in curves))


def read_curves(out_dir: str | Path) -> list[dict]:
    """The saved curves of a run folder."""
    return read_json(Path(out_dir) / CURVES_FILE)


# --------------------------------------------------------------------------- shared by probe and LoRA


def zeroshot_init_head(lab, dataset: str) -> nn.Linear:
    """A float32 head on `lab.device` holding the `domain` prompt set's zero-shot classifier.

    Args:
        lab: the run context (its shared text classifiers and CLIP's logit scale).
        dataset: dataset name (chooses the domain templates).
    """
    from .models import zeroshot_head
    from .zeroshot import logit_scale

    return zeroshot_head(lab.text_classifier(dataset, "domain"), logit_scale(lab.clip()[0])).to(lab.device)


def feature_scaling(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of training features, for training the probe in standard units.

    CLIP embeddings are anisotropic (every image shares a large common component, and the
    per-dimension spread is a few hundredths), so plain gradient steps on a head over raw
    embeddings barely move its decisions. In standardised coordinates the same optimiser
    learns in a few epochs; the head is folded back afterwards (`unstandardized_head`).

    Args:
        x: `(N, D)` training features.
        eps: floor on the std, for constant dimensions.
    """
    return x.mean(0), x.std(0).clamp_min(eps)


class FrozenEncoderProbe(nn.Module):
    """A linear head trained on a frozen CLIP encoder's embeddings of images seen on the fly.

    The encoder runs under `no_grad` (no activations kept for backward), in eval mode and
    outside autocast, in its own dtype: it computes exactly what encoded the cached features
    the head is validated and tested on, instead of a bf16 approximation of them.

    Args:
        clip: anything `image_embeddings` accepts (`vision_model`, `visual_projection`).
        head: the trained linear layer, on embeddings in standard units (see `feature_scaling`).
        mean: per-dimension mean of the training embeddings.
        std: their per-dimension standard deviation.
    """

    def __init__(self, clip: nn.Module, head: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection
        self.head = head
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())
        self.requires_grad_(False)
        head.requires_grad_(True)

    def train(self, mode: bool = True) -> FrozenEncoderProbe:
        super().train(mode)
        self.vision_model.eval()
        self.visual_projection.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        from .models import image_embeddings

        with torch.no_grad(), torch.autocast(pixel_values.device.type, enabled=False):
            embeddings = image_embeddings(self, pixel_values)
        return self.head((embeddings.float() - self.mean) / self.std)


@torch.no_grad()
def standardized_head(head: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> nn.Linear:
    """The head on `(x - mean) / std` that computes exactly what `head` computes on `x`."""
    out = nn.Linear(head.in_features, head.out_features).to(head.weight.device)
    out.weight.copy_(head.weight * std)
    out.bias.copy_(head.bias + head.weight @ mean)
    return out


@torch.no_grad()
def unstandardized_head(head: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> nn.Linear:
    """The head on raw `x` that computes what `head` computes on `(x - mean) / std`."""
    out = nn.Linear(head.in_features, head.out_features).to(head.weight.device)
    out.weight.copy_(head.weight / std)
    out.bias.copy_(head.bias - (head.weight / std) @ mean)
    return out


def run_info(lab, dataset: str, method: str, cfg: TrainConfig, fit_result: FitResult, *, trainable: int,
             total: int, peak_vram_mb: float | None, peak_reserved_mb: float | None, seconds: float,
             extra_config: dict | None = None) -> dict:
    """The run description that goes into a trained method's metrics.json (DESIGN.md fields).

    Args:
        lab: the run context.
        dataset: dataset name.
        method: `linear_probe` or `lora`.
        cfg: the training configuration.
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
        "config": {**asdict(resolved(cfg, lab)), **(extra_config or {})},
    }


def resolved(cfg: TrainConfig, lab) -> TrainConfig:
    """`cfg` with the lab's batch size and seed filled in where it leaves them open."""
    from dataclasses import replace

    return replace(cfg, batch_size=cfg.batch_size or lab.batch_size, seed=lab.seed if cfg.seed is None else cfg.seed)


# --------------------------------------------------------------------------- linear probe


def run_probe(lab, dataset: str, cfg: TrainConfig, resume: bool = False,
              callbacks: Sequence[EpochCallback] = ()) -> dict:
    """Train a linear probe on the frozen encoder, evaluate its best epoch on test, save everything.

    Writes `results/<dataset>/linear_probe/`: metrics.json, predictions.csv, curves.json,
    head.safetensors, classification_report.txt, resume.pt (and the test figures).

    Args:
        lab: the run context (model, data, results folder, device, seed).
        dataset: `flowers102` or `cub200`.
        cfg: hyper-parameters.
        resume: continue an interrupted run from its last completed epoch.
        callbacks: called as `callback(epoch, curve_entry)` after each epoch.

    Returns:
        The metrics.json content.
    """
    from .checkpoints import head_info, load_head, save_head
    from .evaluation import save_evaluation
    from .features import iter_labelled_batches
    from .models import count_parameters
    from .vram import VramProbe

    start = time.perf_counter()
    cfg = resolved(cfg, lab)
    device = torch.device(lab.device)
    out = method_dir(lab.results_dir, dataset, "linear_probe")
    model, _ = lab.clip()
    model.requires_grad_(False)  # frozen encoder; only the head learns
    feats = {split: lab.features(dataset, split) for split in ("train", "val", "test")}
    class_names = lab.dataset(dataset, "test").classes
    head = zeroshot_init_head(lab, dataset)
    info = dict(dataset=dataset, method="linear_probe", model=lab.model, class_names=class_names,
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

        def train_batches(epoch: int, generator: torch.Generator) -> Iterable[Batch]:
            order = torch.randperm(len(paths), generator=generator)
            return iter_labelled_batches(paths, feats["train"].labels, lab.preprocess, device, pixel_dtype,
                                         cfg.batch_size, order=order, augment=True, num_workers=lab.num_workers)
    else:
        train_x = (train_x - mean) / std
        trained = unit_head

        def train_batches(epoch: int, generator: torch.Generator) -> Iterable[Batch]:
            return permuted_batches(train_x, train_y, cfg.batch_size, generator)

    job = TrainJob(
        name=f"{dataset} linear probe", model=trained, train_batches=train_batches,
        # The encoder is frozen: the cached validation features are exactly what it computes.
        val_batches=lambda: permuted_batches(val_x, val_y, max(cfg.batch_size, 1024)),
        steps_per_epoch=math.ceil(len(train_y) / cfg.batch_size),
        save_best=lambda epoch: save_head(out / "head.safetensors", unstandardized_head(unit_head, mean, std),
                                          head_info(**info, epoch=epoch)),
        out_dir=out, device=device, batch_size=cfg.batch_size,
        # head_units: resume.pt holds the head in standard units (older runs trained the
        # augmented probe in raw units: same names and shapes, so only this tells them apart).
        fingerprint={"dataset": dataset, "model": lab.model, "method": "linear_probe", "n_train": len(train_y),
                     "augment": cfg.augment, "head_units": "standard"},
        val_model=unit_head if cfg.augment else None,
        autocast=False,
    )
    with VramProbe(device, label=job.name) as vram:
        result = fit(job, cfg, resume=resume, callbacks=callbacks)
    best, _ = load_head(out / "head.safetensors", head_info(**info))
    best = best.to(device)
    logits, labels = predict(best, permuted_batches(feats["test"].embeddings.to(device),
                                                    feats["test"].labels.to(device), 4096), device, autocast=False)
    encoder_params = count_parameters(model.vision_model)[1] + count_parameters(model.visual_projection)[1]
    head_params = sum(p.numel() for p in head.parameters())
    run = run_info(lab, dataset, "linear_probe", cfg, result, trainable=head_params,
                   total=encoder_params + head_params, peak_vram_mb=vram.peak_allocated_mb,
                   peak_reserved_mb=vram.peak_reserved_mb, seconds=time.perf_counter() - start)
    return save_evaluation(out, logits=logits, labels=labels, paths=feats["test"].paths, class_names=class_names,
                           info=run, figure_prefix=f"{dataset}_linear_probe", results_dir=lab.results_dir)
