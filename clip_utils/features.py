"""Image encoding with an on-disk feature cache, and the fast input path (nvJPEG on CUDA).

    feats = encode_dataset(model, dataset, pre, device="cuda", cache_dir="results/cache")
    feats.embeddings  # (N, D) L2-normalised CLIP image embeddings, float32 on CPU

Zero-shot evaluation under any number of prompt sets and the linear probe only need the
frozen image embeddings, so each (model, dataset, split, preprocessing) is encoded once
and stored; every prompt set and every later run reuses it. The cache key hashes the
model's config and a fingerprint of its weights, the dataset's files (path, label, size,
modification time), the preprocessing and the input path, so a change to any of them
encodes again instead of reusing stale features.

Input paths. The textbook pipeline decodes and resizes with PIL in the main process and
leaves the GPU idle. We instead read raw file bytes ahead in a pool of threads, decode JPEGs
with torchvision where the model runs (nvJPEG on CUDA) and resize there. Threads, not
DataLoader worker processes: reading is I/O that releases the GIL, and processes cost a
fork of the whole training process per worker per epoch plus pickling every file through a
pipe (many small tensors passed between processes have also hung runs on the GPU machine).
On 2 CPU cores, with the benchmark's small model and 500 px JPEGs, this path encodes 325-393
img/s against 145-174 for PIL decoding with torchvision transforms in DataLoader workers
and 276 for the textbook pipeline. `fast=False` keeps the PIL path, against which the tests
check that predictions agree.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data import ImageListDataset, open_rgb
from .models import Preprocess, image_embeddings
from .results import atomic_path

CACHE_VERSION = 1


@dataclass
class Features:
    """Encoded images of one dataset split.

    Attributes:
        embeddings: `(N, D)` L2-normalised image embeddings (float32, CPU).
        labels: `(N,)` int64 labels.
        paths: image files in the same order.
        encoding: how the embeddings were computed, kept with the cache so a later run reports
            the real cost rather than a cache read: `seconds`, `peak_vram_mb` and
            `peak_reserved_mb` (None off CUDA), `device`, and `from_cache`.
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    encoding: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)


# --------------------------------------------------------------------------- input paths


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
    import io

    import numpy as np

    try:
        with Image.open(io.BytesIO(data)) as img:
            array = np.asarray(img.convert("RGB"))
    except OSError as err:
        from .data import UnreadableImageError

        raise UnreadableImageError(f"cannot read image {path}: {err}") from err
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


def augment_geometry(pre: Preprocess) -> list:
    """The random geometric transforms of `pre.transform(augment=True)` (crop, flip).

    Taken from the PIL transform itself, so the device path augments exactly like the
    portable path; torchvision applies them to uint8 tensors on any device.
    """
    from torchvision import transforms as T

    return [t for t in pre.transform(augment=True).transforms if not isinstance(t, (T.ToTensor, T.Normalize))]


def preprocess_tensors(
    images: list[torch.Tensor], pre: Preprocess, dtype: torch.dtype, augment: bool = False
) -> torch.Tensor:
    """Resize (shortest edge, antialiased bicubic), centre-crop and normalise uint8 images.

    Args:
        images: `(3, H, W)` uint8 tensors, any sizes, on the target device.
        pre: the model's preprocessing.
        dtype: output dtype.
        augment: random resized crop and flip (training) instead of resize and centre crop;
            random numbers come from torch's global generator, so a seeded run repeats.
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    interp = InterpolationMode.BICUBIC if pre.interpolation == 3 else InterpolationMode.BILINEAR
    geometry = augment_geometry(pre) if augment else []
    out = []
    for img in images:
        if augment:
            for t in geometry:
                img = t(img)
        else:
            img = TF.resize(img, [pre.resize], interpolation=interp, antialias=True)
            img = TF.center_crop(img, list(pre.crop))
        out.append(img)
    batch = torch.stack(out).to(torch.float32).div_(255)
    mean = torch.tensor(pre.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=batch.device).view(1, 3, 1, 1)
    return ((batch - mean) / std).to(dtype)


def default_workers() -> int:
    """Reader threads (or PIL worker processes): all cores but one, at most 16."""
    return max(0, min(16, (os.cpu_count() or 1) - 1))


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
    for batch in tqdm(loader, desc=desc, unit="batch", total=n_batches, disable=desc is None, leave=False):
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


@torch.inference_mode()
def encode_paths(
    model,
    paths: Sequence[str],
    pre: Preprocess,
    device: str | torch.device,
    batch_size: int = 256,
    *,
    num_workers: int | None = None,
    fast: bool = True,
    desc: str | None = "encoding images",
) -> torch.Tensor:
    """L2-normalised image embeddings of image files, `(N, D)` float32 on CPU.

    Args:
        model: a `CLIPModel` (or anything `image_embeddings` accepts), already on `device`.
        paths: image files.
        pre: the model's preprocessing.
        device: where to run.
        batch_size: images per forward pass.
        num_workers: reader threads, or worker processes on the PIL path (None: `default_workers()`).
        fast: decode raw bytes with torchvision on `device` (nvJPEG on CUDA); False: PIL in the workers.
        desc: progress bar label.
    """
    dtype = next(model.parameters()).dtype
    # Results stay on the device until the end: a copy to the host per batch would make the
    # main thread, which also decodes the next batch, wait for the GPU every time.
    chunks = [
        image_embeddings(model, pixels).float()
        for pixels in iter_pixel_batches(paths, pre, device, dtype, batch_size, num_workers=num_workers, fast=fast,
                                         desc=desc)
    ]
    dim = model.visual_projection.out_features
    return torch.cat(chunks).cpu() if chunks else torch.empty(0, dim)


# --------------------------------------------------------------------------- cache


@torch.no_grad()
def model_fingerprint(model) -> str:
    """A short hash of a model's config and of every weight tensor.

    Each tensor contributes its sum, its sum of squares and a position-weighted sum, computed
    where the weights live (one fast pass even for ViT-L/14 on a GPU, no copy to the host):
    any fine-tuning or in-place edit changes them, so a stale cache entry is never reused.
    """
    h = hashlib.sha256(model.config.to_json_string().encode())
    for name, param in sorted(model.state_dict().items()):
        x = param.detach().flatten().double()
        ramp = torch.linspace(1.0, 2.0, x.numel(), device=x.device, dtype=torch.float64)
        stats = torch.stack([x.sum(), (x * x).sum(), (x * ramp).sum()]).cpu().numpy()
        h.update(name.encode() + str(tuple(param.shape)).encode() + stats.tobytes())
    return h.hexdigest()[:16]


def cache_key(model, dataset: ImageListDataset, pre: Preprocess, fast: bool) -> dict:
    """Everything the features depend on, as a JSON-able dict.

    Args:
        model: the encoder.
        dataset: the dataset split.
        pre: the preprocessing.
        fast: whether the device decode path is used.
    """
    files = hashlib.sha256()
    for path, label in dataset.samples:
        st = os.stat(path)
        files.update(f"{path}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return {
        "version": CACHE_VERSION,
        "model": str(model.config.name_or_path or ""),
        "model_fingerprint": model_fingerprint(model),
        "dtype": str(next(model.parameters()).dtype),
        "dataset": dataset.name,
        "split": dataset.split,
        "n": len(dataset),
        "files": files.hexdigest()[:16],
        "preprocess": pre.as_dict(),
        "input_path": "device-decode" if fast else "pil",
    }


def encode_dataset(
    model,
    dataset: ImageListDataset,
    pre: Preprocess,
    device: str | torch.device,
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
    *,
    num_workers: int | None = None,
    fast: bool = True,
) -> Features:
    """Encode a dataset split, reading and writing the feature cache.

    Args:
        model: a `CLIPModel` on `device` (frozen).
        dataset: the split to encode.
        pre: the model's preprocessing.
        device: where to run.
        cache_dir: feature cache folder (None disables caching).
        batch_size: images per forward pass.
        num_workers: reader threads, or worker processes on the PIL path (None: `default_workers()`).
        fast: decode raw bytes with torchvision on `device` (nvJPEG on CUDA); False: PIL in the workers.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from .vram import VramProbe

    paths = [p for p, _ in dataset.samples]
    labels = torch.tensor(dataset.targets, dtype=torch.long)
    file = None
    if cache_dir is not None:
        key = cache_key(model, dataset, pre, fast)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        file = Path(cache_dir) / f"{dataset.name}-{dataset.split}-{digest}.safetensors"
        if file.is_file():
            cached = load_file(file)
            with safe_open(file, "pt") as f:
                encoding = json.loads((f.metadata() or {}).get("encoding", "{}"))
            return Features(cached["embeddings"], cached["labels"], paths, {**encoding, "from_cache": True})
    desc = f"encoding {dataset.name}/{dataset.split}"
    with VramProbe(device, label=desc) as probe:
        embeddings = encode_paths(model, paths, pre, device, batch_size=batch_size, num_workers=num_workers,
                                  fast=fast, desc=desc)
    bad = (~torch.isfinite(embeddings).all(dim=1)).nonzero().flatten().tolist()
    if bad:  # never cache them: every later run would reuse them, and argmax of NaN is class 0
        raise RuntimeError(
            f"encoding {dataset.name}/{dataset.split} gave non-finite embeddings for {len(bad)} of "
            f"{len(paths)} images (first: {paths[bad[0]]}); nothing was cached. Compare with --device cpu, "
            f"and please report it with the model and device."
        )
    encoding = {"seconds": probe.seconds, "peak_vram_mb": probe.peak_allocated_mb,
                "peak_reserved_mb": probe.peak_reserved_mb, "device": str(device)}
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(file) as tmp:
            save_file({"embeddings": embeddings.contiguous(), "labels": labels}, tmp,
                      metadata={"key": json.dumps(key, sort_keys=True), "encoding": json.dumps(encoding)})
    return Features(embeddings, labels, paths, {**encoding, "from_cache": False})
