"""One job on several processes (GPUs, machines), started by torchrun: the process group and its helpers.

    torchrun --standalone --nproc_per_node 4 -m clip_utils lora --dataset flowers102    # 4 GPUs, one job
    device = distributed.setup("cuda")            # the CLI: join the group; this rank's device, cuda:LOCAL_RANK
    metrics = distributed.on_main(save, ...)       # rank 0 runs it (writes files), every rank gets the result
    rows = distributed.gather_rows(encode(paths[distributed.shard(len(paths))]))   # dataset order

torchrun starts the processes and sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`...; `setup` joins
them into a process group (NCCL on CUDA, each rank on `cuda:LOCAL_RANK`; gloo on the CPU).
Without torchrun (or with one process) there is no group, and every helper here is the
identity: `world_size()` is 1, `on_main(f)` is `f()`, `shard(n)` is everything.

The rules the stages follow under a group (see README, "Several GPUs or machines"):

- Every rank runs the same code in the same order, so collectives match: the stages call
  these helpers, never `if rank == ...` around a collective.
- Only rank 0 reads or writes the results folder (results, checkpoints, curves, resume
  state, figures, the feature cache) and prints; `on_main` runs such a step on rank 0 and
  sends its result to the others, who wait for it. Machines therefore need not share a
  filesystem for results (each needs the datasets and the model).
- Training (`model.training.fit`) is data parallel (DDP): every rank takes its share of each global
  batch (`rank_order`), gradients are averaged, and the loss is weighted so that a step
  equals the single-process step on the same global batch.
- Feature encoding shards the images (`shard`) and gathers the embeddings in dataset
  order (`gather_rows`).

From Python under torchrun, call `setup` first and build the `Lab` on the device it
returns; every rank then calls the same `run_*` functions. Depends on torch alone, so
`train`, `features`, `inputs` and the methods can all import it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from clip_utils.errors import InvalidValue

T = TypeVar("T")

# A padding slot in a rank's share of a batch (see `rank_order`): cross_entropy's default
# ignore_index, so padded samples add nothing to the loss or its count.
PAD_LABEL = -100
# Steps that rank 0 alone runs (validation, test evaluation, figures, the feature cache)
# keep the others waiting in a collective; NCCL's default 10 minutes could end a run whose
# test split is large, so a wait may last an hour before it counts as a hang.
TIMEOUT = timedelta(minutes=60)


class RankZeroFailed(RuntimeError):
    """Raised on the other ranks when a step `on_main` ran on rank 0 failed there (rank 0 reports it)."""


def launched() -> bool:
    """Whether torchrun started this process as one of several (`WORLD_SIZE` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes in the job (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return _rank()


def _rank() -> int:  # for the functions whose `rank` argument hides `rank()`
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes files and prints."""
    return rank() == 0


def local_world_size() -> int:
    """Processes of this job on this machine (torchrun's `LOCAL_WORLD_SIZE`; 1 without torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def setup(device: str) -> str:
    """Join torchrun's process group when launched by it; return the device this rank uses.

    NCCL when `device` is CUDA (each rank on `cuda:LOCAL_RANK`), gloo otherwise. Without
    torchrun, or with a single process, nothing is set up and `device` comes back unchanged.

    Args:
        device: the requested device (`cuda`, `cpu`, ...); under torchrun a CUDA device
            must not name an index, since each rank takes its own.

    Raises:
        ValueError: a CUDA index under torchrun, or fewer GPUs than local ranks.
    """
    if not launched() or not dist.is_available():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    kind = torch.device(device)
    if kind.type == "cuda":
        if kind.index is not None:
            raise InvalidValue(f"--device {device}: under torchrun each rank takes cuda:LOCAL_RANK; pass --device cuda")
        if local >= torch.cuda.device_count():
            raise InvalidValue(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible): start at most "
                             f"that many processes per machine (--nproc_per_node)")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        if kind.type == "cuda":
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=torch.device(device))
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
    return device


def teardown(wait: bool = False) -> None:
    """Leave the process group, if one is up (the end of a CLI command).

    Args:
        wait: first wait for every rank (a normal end). Rank 0 finishes later than the others
            (it writes the results), and a 2-process run's rank 0 was seen to abort at exit
            ("terminate called without an active exception"), likely from its peer tearing
            gloo down first. After a failure on one rank alone there is no waiting: the others
            may never arrive.
    """
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    # NCCL moves CUDA tensors only; gloo CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast(value: Any = None) -> Any:
    """Rank 0's `value` on every rank (any picklable object; `value` is ignored elsewhere).

    Args:
        value: what rank 0 sends.
    """
    if not active():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run `fn(*args, **kwargs)` on rank 0 only; every rank returns its result.

    The other ranks wait meanwhile (this is the barrier where rank 0 writes). A failure on
    rank 0 is raised there and, as `RankZeroFailed`, on the others, so no rank waits for a
    collective that never comes.

    Args:
        fn: the step (writes files, reads the results folder, prints).
        *args: its positional arguments.
        **kwargs: its keyword arguments.
    """
    if not active():
        return fn(*args, **kwargs)
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as err:
            broadcast(("failed", f"{type(err).__name__}: {err}"))
            raise
        broadcast(("ok", result))
        return result
    status, value = broadcast()
    if status != "ok":
        raise RankZeroFailed(f"rank 0 failed: {value}")
    return value


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """Run the block on each machine's local rank 0 first, then on the other ranks.

    For downloads: one rank per machine fetches, the others then find the files in place.
    """
    if not active():
        yield
        return
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if not first:
        dist.barrier()
    yield
    if first:
        dist.barrier()


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over every rank (a new tensor on `tensor`'s device).

    Args:
        tensor: this rank's part (on CUDA under NCCL, on the CPU under gloo).
    """
    if not active():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def shard_sizes(n: int, world: int | None = None) -> list[int]:
    """Rows of each rank's contiguous shard of `n` items (`ceil(n / world)` each, the last ones fewer).

    Args:
        n: items.
        world: ranks (default: `world_size()`).
    """
    world = world or world_size()
    step = math.ceil(n / world) if n else 0
    return [max(0, min(step, n - r * step)) for r in range(world)]


def shard(n: int, rank: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous share of `n` items, in order: concatenating the shards of
    ranks 0, 1, ... gives `range(n)` (what `gather_rows` relies on).

    Args:
        n: items.
        rank: the rank (default: this process's).
        world: ranks (default: `world_size()`).
    """
    world = world or world_size()
    rank = _rank() if rank is None else rank
    sizes = shard_sizes(n, world)
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def gather_rows(part: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's `shard(n)` rows of a result, concatenated in rank (= dataset) order, on the CPU.

    A padded `all_gather`: each rank sends `ceil(n / world)` rows, the padding is cut off.

    Args:
        part: `(shard rows, ...)` this rank's rows (same trailing shape and dtype everywhere).
        n: rows in all.
    """
    if not active():
        return part.cpu()
    sizes = shard_sizes(n)
    device = _comm_device()
    padded = torch.zeros((max(sizes), *part.shape[1:]), dtype=part.dtype, device=device)
    padded[: len(part)] = part.to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:size] for p, size in zip(parts, sizes, strict=True)]).cpu()


def rank_order(order: torch.Tensor, batch_size: int, rank: int | None = None,
               world: int | None = None) -> tuple[torch.Tensor, int]:
    """This rank's share of every global batch of `order`, and the batch size it steps with.

    The global batches are `order`'s consecutive runs of `batch_size` (the last may be
    shorter), exactly the single-process batches; rank r takes positions `r::world` of
    each, so the ranks' shares of a step are disjoint and together the whole global batch.
    Each share is padded to `ceil(batch_size / world)` (the last step's to at least one
    sample) with the index `len(order)`: the caller puts a padding sample there, labelled
    `PAD_LABEL`, so every rank runs the same number of equal steps (what DDP needs) and the
    padding weighs nothing. Without a process group, `(order, batch_size)` unchanged.

    Args:
        order: a permutation of `range(N)` (seeded: the same on every rank).
        batch_size: the global batch.
        rank: the rank (default: this process's).
        world: ranks (default: `world_size()`).
    """
    world = world or world_size()
    if world == 1:
        return order, batch_size
    rank = _rank() if rank is None else rank
    n, per_rank = len(order), math.ceil(batch_size / world)
    pad = torch.tensor([n], dtype=order.dtype)
    shares = []
    for start in range(0, n, batch_size):
        share = order[start : start + batch_size][rank::world]
        last = start + batch_size >= n
        missing = (1 if last else per_rank) - len(share)
        shares.append(torch.cat([share, pad.expand(missing)]) if missing > 0 else share)
    return (torch.cat(shares) if shares else order), per_rank


def padded(paths: Sequence[str], labels: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """`paths` and `labels` with the padding slot of `rank_order` (index N) appended: the
    first image again, labelled `PAD_LABEL`.

    Args:
        paths: the N image files.
        labels: their `(N,)` labels.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    return [*paths, paths[0]], torch.cat([labels, torch.tensor([PAD_LABEL])])


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel under a process group (itself otherwise).

    DDP averages the gradients of the trainable parameters over the ranks during the
    backward pass and starts every rank from rank 0's weights and buffers.
    `forward_sync_buffers=False`: CLIP's only buffers (position ids) never change, so
    re-sending them at every step would be waste.

    Args:
        model: the module being trained (parameters on `device`).
        device: this rank's device.
    """
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(device)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
