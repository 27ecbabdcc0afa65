"""The input path: image files to preprocessed pixel batches on the device (nvJPEG on CUDA).

    for pixels in iter_pixel_batches(paths, pre, "cuda", torch.float16, batch_size=256, desc="encoding"):
        ...
    for pixels, labels in iter_labelled_batches(paths, labels, pre, "cuda", torch.float32, 32, augment=True):
        ...

The textbook pipeline decodes and resizes with PIL in the main process and leaves the GPU
idle. We instead read raw file bytes ahead in a pool of threads, decode JPEGs with
torchvision where the model runs (nvJPEG on CUDA) and resize there. Threads, not DataLoader
worker processes: reading is I/O that releases the GIL, and processes cost a fork of the
whole training process per worker per epoch plus pickling every file through a pipe (many
small tensors passed between processes have also hung runs on the GPU machine). On 2 CPU
cores, with the benchmark's small model and 500 px JPEGs, this path encodes 325-393 img/s
against 145-174 for PIL decoding with torchvision transforms in DataLoader workers and 276
for the textbook pipeline. `fast=False` keeps the PIL path, against which the tests check
that predictions agree.
"""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from clip_utils.data.images import decode_image, open_rgb
from clip_utils.model.preprocess import Preprocess, preprocess_tensors
from clip_utils.runtime import distributed
from clip_utils.runtime.progress import bar


class _PilDataset(Dataset):
    """PIL decode + torchvision transform in the workers: the portable path."""

    def __init__(self, paths: Sequence[str], transform) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(open_rgb(self.paths[i]))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def iter_file_bytes(paths: Sequence[str], batch_size: int, threads: int, prefetch: int = 4):
    """Yield the raw bytes of `paths` in batches, read ahead by a pool of threads.

    Reading files is I/O that releases the GIL, so threads keep the decoder fed without
    what worker processes cost: a fork of the (multi-GB) training process for every worker
    at every epoch, and every file pickled through a pipe. At most `prefetch` batches are
    read ahead, so memory stays bounded on any dataset size.

    Args:
        paths: files to read, in order.
        batch_size: files per batch.
        threads: reader threads (0: read in the calling thread).
        prefetch: batches read ahead.
    """
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    if threads == 0:
        for batch in batches:
            yield [_read(p) for p in batch]
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="clip-read") as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append([pool.submit(_read, p) for p in batch])
            if len(pending) > prefetch:
                yield [f.result() for f in pending.popleft()]
        while pending:
            yield [f.result() for f in pending.popleft()]


def _decode_one_fallback(data: bytes, path: str) -> torch.Tensor:
    # PNG, CMYK JPEG, or anything nvJPEG refuses: decode with PIL, as the portable path does.
    array = np.asarray(decode_image(io.BytesIO(data), path))  # the one decoder: every failure is one line
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


_DECODE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched JPEG decode, made safe to call while the GPU is still busy.

    On CUDA, torchvision allocates the outputs on the caller's current stream but nvJPEG
    writes them from a private stream that is never ordered after the caller's queued work
    (pytorch/vision#9606). The caching allocator hands out memory freed on the current
    stream at once, so with the GPU running behind the host, as it does here by design,
    nvJPEG could write into memory that a queued forward pass still reads, corrupting
    features without an error. So the outputs come from a stream of their own, which has
    no work of its own; `record_stream` keeps each block from being handed out again until
    the consumer's work on it has finished, and the consumer waits for the decode.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type != "cuda":
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    consumer = torch.cuda.current_stream(device)
    if device not in _DECODE_STREAMS:
        _DECODE_STREAMS[device] = torch.cuda.Stream(device)
    stream = _DECODE_STREAMS[device]
    with torch.cuda.stream(stream):
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    consumer.wait_stream(stream)
    for image in images:
        image.record_stream(consumer)
    return images


def decode_batch(blobs: list[bytes], paths: list[str], device: torch.device) -> list[torch.Tensor]:
    """Decode file bytes to `(3, H, W)` uint8 tensors on `device` (nvJPEG on CUDA).

    Args:
        blobs: encoded files.
        paths: their paths, for error messages.
        device: where to decode; JPEGs are decoded there in one batched call.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    out: list[torch.Tensor | None] = [None] * len(blobs)
    jpeg = [i for i, b in enumerate(blobs) if b[:3] == b"\xff\xd8\xff"]
    if jpeg:
        try:
            data = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in jpeg]
            for i, img in zip(jpeg, _decode_jpegs(data, device), strict=True):
                out[i] = img
        except RuntimeError:
            pass  # one odd JPEG fails the batch: decode those one by one below
    for i, img in enumerate(out):
        if img is None:
            out[i] = _decode_one_fallback(blobs[i], paths[i]).to(device, non_blocking=True)
    return out  # type: ignore[return-value]


def default_workers() -> int:
    """Reader threads (or PIL worker processes): all cores but one, at most 16; under torchrun
    the machine's cores are split between its processes first."""
    return max(0, min(16, (os.cpu_count() or 1) // distributed.local_world_size() - 1))


def iter_pixel_batches(
    paths: Sequence[str],
    pre: Preprocess,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    *,
    num_workers: int | None = None,
    fast: bool = True,
    desc: str | None = None,
    augment: bool = False,
):
    """Yield preprocessed `(B, 3, H, W)` batches on `device`, in order, with a progress bar.

    Args:
        paths: image files.
        pre: the model's preprocessing.
        device: target device.
        dtype: pixel dtype (the model's).
        batch_size: images per batch.
        num_workers: reader threads on the fast path, DataLoader worker processes on the PIL
            path (None: `default_workers()`).
        fast: decode raw bytes with torchvision on `device` (nvJPEG on CUDA); False: PIL in the workers.
        desc: progress bar label (None hides the bar).
        augment: training augmentation (`Preprocess.transform(augment=True)`): in the
            workers on the PIL path, on the device on the fast path.
    """
    device = torch.device(device)
    workers = default_workers() if num_workers is None else num_workers
    if fast:
        loader = iter_file_bytes(paths, batch_size, threads=workers)
    else:
        common = dict(batch_size=batch_size, num_workers=workers, persistent_workers=False)
        if workers:
            # Worker seeds are drawn from torch's global generator, so a run seeded the same
            # way augments the same way.
            common["prefetch_factor"] = 4
        transform = pre.transform(augment=augment)
        loader = DataLoader(_PilDataset(paths, transform), pin_memory=device.type == "cuda", **common)
    start = 0
    n_batches = -(-len(paths) // batch_size)
    for batch in bar(loader, desc=desc, unit="batch", total=n_batches, enabled=desc is not None):
        if fast:
            chunk = list(paths[start : start + len(batch)])
            pixels = preprocess_tensors(decode_batch(batch, chunk, device), pre, dtype, augment=augment)
        else:
            pixels = batch.to(device, dtype, non_blocking=True)
        start += len(batch)
        yield pixels


def iter_labelled_batches(
    paths: Sequence[str],
    labels: torch.Tensor,
    pre: Preprocess,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    *,
    order: torch.Tensor | None = None,
    augment: bool = False,
    num_workers: int | None = None,
    fast: bool = True,
    desc: str | None = None,
):
    """Yield `(pixels, labels)` batches on `device`, in a given order (training and evaluation).

    Args:
        paths: image files.
        labels: `(N,)` labels of `paths`.
        pre: the model's preprocessing.
        device: target device.
        dtype: pixel dtype.
        batch_size: images per batch.
        order: a permutation of `range(N)` (e.g. from a seeded generator; None: file order).
        augment: training augmentation (see `iter_pixel_batches`).
        num_workers: reader threads, or worker processes on the PIL path (None: `default_workers()`).
        fast: decode raw bytes with torchvision on `device` (nvJPEG on CUDA); False: PIL in the workers.
        desc: progress bar label (None hides the bar).
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    if order is not None:
        paths, labels = [paths[i] for i in order.tolist()], labels[order]
    labels = labels.to(device)
    start = 0
    for pixels in iter_pixel_batches(paths, pre, device, dtype, batch_size, num_workers=num_workers, fast=fast,
                                     desc=desc, augment=augment):
        yield pixels, labels[start : start + len(pixels)]
        start += len(pixels)
