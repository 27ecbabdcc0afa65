"""The training loop the linear probe and LoRA share: `fit` a `TrainJob` under a `TrainConfig`.

    job = TrainJob(name="toy", model=head, train_batches=..., val_batches=..., steps_per_epoch=10,
                   save_best=lambda epoch: ..., out_dir=Path("results/toy"), device=torch.device("cpu"),
                   batch_size=32)
    result = fit(job, TrainConfig(epochs=5, lr=1e-2, seed=0))    # result.curves, result.best_epoch
    result = fit(job, cfg, resume=True)                           # after Ctrl-C: continue

`fit` knows nothing of datasets, labs or methods: AdamW with linear warmup and cosine decay
(one parameter group, or the job's own: LoRA gives its head a rate of its own),
bf16 autocast on CUDA when the job asks for it (heads always run in fp32), a validation pass
and `curves.json` after every epoch, the best epoch on validation (top-1, then lower loss)
saved by the job's `save_best`, and a resume state written after every epoch. What differs
between methods (which module is trained, where batches come from, how the best weights
are saved) is the `TrainJob` that `probe` and `lora` build.

Interrupted runs. After each completed epoch the loop writes, atomically and in this
order, the best checkpoint (when it improved), `curves.json` and `resume.pt` (trainable
weights, optimizer, scheduler, epoch, curves, RNG state). A crash or Ctrl-C at any point
leaves a consistent last completed epoch, and `resume=True` continues from it. The data
order and every random draw of an epoch depend only on `(seed, epoch)` (torch's generators
are re-seeded at each epoch start), so a resumed run ends with the same curves as an
uninterrupted one, timings aside. `resume.pt` holds only tensors and plain containers and
is read with `torch.load(weights_only=True)`: nothing is unpickled. A fresh run first
removes the previous run's outputs, checkpoints included, so nothing of it can be taken
for the new run's.

Several processes (torchrun; `distributed`). Under a process group `fit` is collective:
every rank calls it, `job.train_batches` yields this rank's share of each global batch
(`distributed.rank_order`, padding labelled `distributed.PAD_LABEL`), the model trains in
DDP with each rank's summed loss scaled by `world / samples in the global batch`, so the
averaged gradient is the single-process gradient of the same global batch. Validation
runs on rank 0 alone and its numbers are sent to the others; rank 0 alone writes
checkpoints, curves and the resume state, and reads the resume state for everyone. The
train loss is summed over the ranks, so curves match a single-process run.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clip_utils.config import TrainConfig
from clip_utils.errors import UserError
from clip_utils.runtime import distributed
from clip_utils.runtime.files import atomic_path, read_json, regular_file, write_json
from clip_utils.runtime.progress import bar, write

CURVES_FILE = "curves.json"
RESUME_FILE = "resume.pt"
# Test-set outputs of a previous run in the same folder (written after training ends).
STALE_ON_RESTART = ("metrics.json", "predictions.csv", "classification_report.txt")
# Loss checks sync the GPU; every few steps keeps the GPU queue full and still stops a
# diverged run within a handful of steps.
CHECK_EVERY = 10

Batch = tuple[torch.Tensor, torch.Tensor]
EpochCallback = Callable[[int, dict], None]


class TrainingError(UserError, RuntimeError):
    """A training run cannot go on; the message says what to try (printed as one line by the CLI)."""


@dataclass
class TrainJob:
    """What one method trains and how; everything else is `fit`'s.

    Attributes:
        name: label for progress bars and messages (`flowers102 linear probe`).
        model: the module to train; its parameters with `requires_grad` are trained.
        train_batches: `(epoch, generator) -> (inputs, labels)` batches on the device; the
            order must come from `generator` (seeded from seed and epoch). Under a process
            group: this rank's share of each global batch (`distributed.rank_order`).
        val_batches: `() -> (inputs, labels)` batches of the validation split.
        steps_per_epoch: batches per training epoch.
        save_best: `epoch -> None`, writes the checkpoint of the current weights.
        out_dir: the method's results folder (curves.json, resume.pt).
        device: where training runs.
        batch_size: for the out-of-memory message.
        checkpoints: the files and folders `save_best` writes in `out_dir`; a fresh run
            removes them first, so a run that dies before its first checkpoint never leaves
            the previous run's where `predict` would take it for this one's.
        oom_hint: extra advice when CUDA runs out of memory.
        fingerprint: everything besides `TrainConfig` a resumed run must share (dataset,
            model, training set size, LoRA settings...).
        val_model: what `val_batches` are fed to, when not `model` (the augmented probe
            trains through the encoder but validates its head on cached embeddings).
        progress: progress bars and a line per epoch (off for timing runs such as the benchmark).
        autocast: bf16 autocast on CUDA. On for LoRA (the encoder's matmuls); off for the
            probe, a linear layer with nothing to gain, whose bf16 logits (8-bit mantissa)
            would flip close calls between classes.
        param_groups: AdamW parameter groups (`{"params": [...], "lr": ...}`; a group without
            `lr` trains at `TrainConfig.lr`) covering every trainable parameter once; empty:
            one group at `TrainConfig.lr`. Warmup and decay scale every group alike; the
            curves' `lr` is the first group's.
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
    checkpoints: tuple[str, ...] = ()
    oom_hint: str = ""
    fingerprint: dict = field(default_factory=dict)
    val_model: nn.Module | None = None
    progress: bool = True
    autocast: bool = True
    param_groups: Sequence[dict] = ()


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
    inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator | None = None,
    *, shard: bool = False,
) -> Iterable[Batch]:
    """Minibatches of in-memory tensors in a seeded random order (or in order without a generator).

    Args:
        inputs: `(N, ...)` tensors on the device.
        labels: `(N,)` labels on the same device.
        batch_size: rows per batch (the last batch may be smaller).
        generator: CPU generator for the permutation; None keeps the order.
        shard: training under a process group: yield this rank's share of each batch
            (`distributed.rank_order`; padding rows labelled `distributed.PAD_LABEL`).
    """
    n = len(labels)
    if generator is None:
        order = torch.arange(n)
    else:
        order = torch.randperm(n, generator=generator)
    if shard:
        order, batch_size = distributed.rank_order(order, batch_size)
    order = order.to(labels.device)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        if shard and distributed.active():
            # Index n is rank_order's padding slot: any row, labelled to be ignored.
            pad = idx >= n
            idx = idx.clamp(max=n - 1)
            yield inputs[idx], labels[idx].masked_fill(pad, distributed.PAD_LABEL)
        else:
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


def _loss(logits: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, world: int):
    """`(loss to backpropagate, summed loss of this rank's samples, their count)`."""
    if world == 1:
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        return loss, loss.detach() * len(y), len(y)
    # DDP averages gradients over the ranks, so each rank's sum is scaled by world / the
    # global batch's sample count: the average is then the gradient of the global mean,
    # whatever the shares' sizes (a short last batch, padding).
    summed = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing, reduction="sum",
                             ignore_index=distributed.PAD_LABEL)
    count = (y != distributed.PAD_LABEL).sum()
    return summed * world / distributed.all_sum(count.float()), summed.detach(), count


def _mean_loss(total: torch.Tensor, seen, world: int) -> float:
    if world == 1:
        return total.item() / seen
    # Every rank gets the same epoch mean, so all of them stop together on a divergence.
    total, seen = distributed.all_sum(torch.stack([total, torch.as_tensor(seen, device=total.device).float()])).tolist()
    return total / seen


def _train_epoch(job: TrainJob, model: nn.Module, cfg: TrainConfig, optimizer, scheduler, epoch: int) -> float:
    model.train()
    world = distributed.world_size()
    params = [p for p in job.model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(epoch_seed(cfg.seed or 0, epoch))
    total = torch.zeros((), device=job.device)
    seen = step = 0
    steps = bar(job.train_batches(epoch, generator), total=job.steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}",
                unit="step", enabled=job.progress and distributed.is_main())
    for step, (x, y) in enumerate(steps, start=1):
        with _autocast(job.device, job.autocast):
            logits = model(x)
        loss, summed, count = _loss(logits, y, cfg, world)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        total += summed
        seen += count
        if step % CHECK_EVERY == 0 or step == job.steps_per_epoch:
            mean = _mean_loss(total, seen, world)
            if not math.isfinite(mean):
                raise _diverged(mean, epoch, step, cfg)
            steps.set_postfix(loss=f"{mean:.4f}")
    if step == 0:
        raise TrainingError(f"{job.name}: the training split yielded no batches")
    mean = _mean_loss(total, seen, world)
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


def _read_state(job: TrainJob, cfg: TrainConfig) -> dict | None:
    """The checked resume state of the last completed epoch, None when none is saved."""
    file = job.out_dir / RESUME_FILE
    if not file.is_file():
        write(f"{job.name}: nothing to resume in {job.out_dir}, starting from epoch 1")
        return None
    way_out = "delete it and rerun, or run without --resume to start over"
    try:
        state = torch.load(regular_file(file, "resume state"), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's text advises weights_only=False: never passed on, never done
        raise TrainingError(f"{file} is not a resume state this program wrote (it holds pickled objects, which "
                            f"are never loaded); {way_out}") from None
    except UserError:
        raise
    except Exception as err:  # truncated or damaged: say which file, in one line
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TrainingError(f"the resume state {file} is cut short or damaged ({why}); {way_out}") from None
    if not isinstance(state, dict) or not {"fingerprint", "weights", "epoch"} <= state.keys():
        raise TrainingError(f"{file} is not a resume state this program wrote; {way_out}")
    saved, now = state["fingerprint"], _state_fingerprint(job, cfg)
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise TrainingError(
            f"cannot resume {job.name} from {file}: the settings changed ({diffs}). Resume with the "
            f"original settings, or run without --resume to start over."
        )
    trainable = {n for n, p in job.model.named_parameters() if p.requires_grad}
    if set(state["weights"]) != trainable:
        raise TrainingError(f"{file} holds other trainable weights than {job.name}; run without --resume")
    done = int(state["epoch"])
    write(f"{job.name}: resuming after epoch {done} of {cfg.epochs} from {file}")
    return state


def _load_state(job: TrainJob, cfg: TrainConfig, optimizer, scheduler) -> tuple[int, list[dict]]:
    """Restore the last completed epoch; returns `(epoch, curves)`, `(0, [])` when none saved.

    Rank 0 reads and checks the file and sends the state to every rank (the others never
    touch the results folder).
    """
    state = distributed.on_main(_read_state, job, cfg)
    if state is None:
        return 0, []
    current = dict(job.model.named_parameters())
    with torch.no_grad():
        for name, value in state["weights"].items():
            current[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    # Saved on rank 0's machine: another machine may have another number of GPUs.
    if state["rng"]["cuda"] and len(state["rng"]["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["epoch"]), list(state["curves"])


def clear_previous_run(out_dir: Path, checkpoints: Sequence[str] = ()) -> None:
    """Remove a previous run's curves, resume state, test outputs and `checkpoints` from `out_dir`.

    A fresh run over an old one does this first, so that a crash before the new run ends
    can never leave old metrics beside new curves, or an old checkpoint `predict` would take
    for the new run's.

    Args:
        out_dir: the run's folder.
        checkpoints: the checkpoint files and folders the run writes there.
    """
    for name in (CURVES_FILE, RESUME_FILE, *STALE_ON_RESTART, *checkpoints):
        path = Path(out_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _save_epoch(job: TrainJob, cfg: TrainConfig, optimizer, scheduler, curves: list[dict]) -> None:
    """After an epoch (rank 0): the best checkpoint when it improved, curves.json, resume.pt, a line."""
    entry = curves[-1]
    epoch = entry["epoch"]
    if best_epoch(curves) == epoch:
        job.save_best(epoch)
    write_json(job.out_dir / CURVES_FILE, curves)
    _save_state(job, cfg, optimizer, scheduler, epoch, curves)
    if job.progress:
        write(f"{job.name} epoch {epoch}: train loss {entry['train_loss']:.4f}, val loss {entry['val_loss']:.4f}, "
              f"val top-1 {entry['val_acc']:.2%}")


def _param_groups(job: TrainJob, params: list[nn.Parameter]) -> list[dict]:
    if not job.param_groups:
        return [{"params": params}]
    grouped = [p for group in job.param_groups for p in group["params"]]
    if len(grouped) != len(params) or {id(p) for p in grouped} != {id(p) for p in params}:
        # A trainable weight outside every group would silently never train.
        raise TrainingError(f"{job.name}: the parameter groups must hold every trainable parameter exactly once")
    return [dict(group, params=list(group["params"])) for group in job.param_groups]


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
    model = distributed.wrap(job.model, job.device)  # DDP under a process group; starts from rank 0's weights
    # The groups hold job.model's own Parameter objects: DDP wraps the module, not its parameters.
    optimizer = torch.optim.AdamW(_param_groups(job, params), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * job.steps_per_epoch
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup * total_steps), total_steps)
    if resume:
        done, curves = _load_state(job, cfg, optimizer, scheduler)
    else:
        done, curves = 0, []
        distributed.on_main(clear_previous_run, job.out_dir, job.checkpoints)

    oom = False
    try:
        for epoch in bar(range(done + 1, cfg.epochs + 1), desc=job.name, unit="epoch", initial=done,
                         total=cfg.epochs, enabled=job.progress and distributed.is_main()):
            start = time.perf_counter()
            # Plus the rank: each rank draws its own dropout masks and augmentations (the same
            # stream on every rank would give the images of one step the same crops).
            torch.manual_seed(epoch_seed(cfg.seed or 0, epoch) + distributed.rank())
            train_loss = _train_epoch(job, model, cfg, optimizer, scheduler, epoch)
            # On rank 0 alone (the others wait): the same numbers on every rank, simply.
            val_loss, val_acc = distributed.on_main(_validate, job)
            entry = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc,
                     "seconds": time.perf_counter() - start, "lr": scheduler.get_last_lr()[0]}
            curves.append(entry)
            distributed.on_main(_save_epoch, job, cfg, optimizer, scheduler, curves)
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
