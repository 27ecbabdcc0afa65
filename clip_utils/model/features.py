"""Frozen image embeddings of a dataset split, with an on-disk cache.

    feats = encode_dataset(clip.model, dataset, clip.preprocess, device="cuda", cache_dir="results/cache")
    feats.embeddings  # (N, D) L2-normalised CLIP image embeddings, float32 on CPU

Zero-shot evaluation under any number of prompt sets and the linear probe only need the
frozen image embeddings, so each (model, dataset, split, preprocessing) is encoded once
and stored; every prompt set and every later run reuses it. The cache key hashes the
model's family (`backbones`), its config and a fingerprint of its weights, the dataset's
files (path, label, size, modification time), the preprocessing and the input path, so a
change to any of them encodes again instead of reusing stale features. Images reach the model through the input
path of `inputs`.

Under torchrun (`distributed`) each rank encodes its contiguous shard of the images and
the embeddings are gathered in dataset order; rank 0 alone reads and writes the cache,
sending what it read to the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clip_utils.data import ImageListDataset
from clip_utils.model.backbones import backbone_of
from clip_utils.model.clip import model_fingerprint
from clip_utils.model.heads import image_embeddings
from clip_utils.model.inputs import iter_pixel_batches
from clip_utils.model.preprocess import Preprocess
from clip_utils.model.vram import VramProbe
from clip_utils.runtime import distributed
from clip_utils.runtime.files import atomic_path

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

    def subset(self, indices: Sequence[int] | None) -> Features:
        """The features of some images only (a few-shot sample), in `indices` order; None: all.

        Args:
            indices: positions in this split.
        """
        if indices is None:
            return self
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return Features(self.embeddings[idx], self.labels[idx], [self.paths[i] for i in indices], self.encoding)

    def of_classes(self, classes: Sequence[int]) -> Features:
        """The images of some classes only, relabelled from 0 in `classes` order (a class
        subset such as the base-to-new protocol's halves).

        Args:
            classes: labels of this split's classes.
        """
        relabel = {int(c): i for i, c in enumerate(classes)}
        new = torch.tensor([relabel.get(y, -1) for y in self.labels.tolist()], dtype=torch.long)
        rows = (new >= 0).nonzero().flatten()
        return Features(self.embeddings[rows], new[rows], [self.paths[i] for i in rows.tolist()], self.encoding)


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
    return torch.cat(chunks).cpu() if chunks else torch.empty(0, backbone_of(model).embed_dim(model))


# --------------------------------------------------------------------------- cache


def cache_key(model, dataset: ImageListDataset, pre: Preprocess, fast: bool, fingerprint: str | None = None) -> dict:
    """Everything the features depend on, as a JSON-able dict.

    Args:
        model: the encoder.
        dataset: the dataset split.
        pre: the preprocessing.
        fast: whether the device decode path is used.
        fingerprint: `model.clip.model_fingerprint(model)` when already known (a pass over every
            weight otherwise).
    """
    files = hashlib.sha256()
    for path, label in dataset.samples:
        st = os.stat(path)
        files.update(f"{path}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return {
        "version": CACHE_VERSION,
        "backbone": backbone_of(model).name,
        "model": str(model.config.name_or_path or ""),
        "model_fingerprint": fingerprint or model_fingerprint(model),
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
    fingerprint: str | None = None,
) -> Features:
    """Encode a dataset split, reading and writing the feature cache.

    A cache file that is cut short or damaged (its checksum no longer matches) is reported
    in one warning, removed and encoded again: the run ends as it would on a clean cache.

    Args:
        model: a `CLIPModel` on `device` (frozen).
        dataset: the split to encode.
        pre: the model's preprocessing.
        device: where to run.
        cache_dir: feature cache folder (None disables caching).
        batch_size: images per forward pass.
        num_workers: reader threads, or worker processes on the PIL path (None: `default_workers()`).
        fast: decode raw bytes with torchvision on `device` (nvJPEG on CUDA); False: PIL in the workers.
        fingerprint: `model.clip.model_fingerprint(model)` when already known.
    """
    paths = [p for p, _ in dataset.samples]
    labels = torch.tensor(dataset.targets, dtype=torch.long)
    file = None
    if cache_dir is not None:
        key = cache_key(model, dataset, pre, fast, fingerprint)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        file = Path(cache_dir) / f"{dataset.name}-{dataset.split}-{digest}.safetensors"
        cached = distributed.on_main(_read_if_cached, file, len(paths))  # rank 0 reads, every rank gets it
        if cached is not None:
            embeddings, cached_labels, encoding = cached
            return Features(embeddings, cached_labels, paths, {**encoding, "from_cache": True})
    desc = f"encoding {dataset.name}/{dataset.split}"
    part = distributed.shard(len(paths))  # all of them in one process
    with VramProbe(device, label=desc) as probe:
        embeddings = encode_paths(model, paths[part], pre, device, batch_size=batch_size, num_workers=num_workers,
                                  fast=fast, desc=desc if distributed.is_main() else None)
        embeddings = distributed.gather_rows(embeddings, len(paths))
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
        distributed.on_main(_write_cache, file, embeddings, labels, key, encoding)
    return Features(embeddings, labels, paths, {**encoding, "from_cache": False})


def _read_if_cached(file: Path, n: int) -> tuple[torch.Tensor, torch.Tensor, dict] | None:
    return read_cached(file, n) if file.is_file() else None


def _write_cache(file: Path, embeddings: torch.Tensor, labels: torch.Tensor, key: dict, encoding: dict) -> None:
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(file) as tmp:
        tensors = {"embeddings": embeddings.contiguous(), "labels": labels}
        save_file(tensors, tmp, metadata={"key": json.dumps(key, sort_keys=True), "encoding": json.dumps(encoding),
                                          "sha256": _checksum(tensors)})


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def read_cached(file: Path, n: int) -> tuple[torch.Tensor, torch.Tensor, dict] | None:
    """`(embeddings, labels, encoding)` from a cache file, or None after removing a damaged one.

    Args:
        file: the cache file.
        n: the number of images it must hold.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in ("embeddings", "labels")}
        why = None
        if meta.get("sha256") != _checksum(tensors):
            why = "its checksum does not match" if "sha256" in meta else "it has no checksum"
        elif len(tensors["labels"]) != n or len(tensors["embeddings"]) != n:
            why = f"it holds {len(tensors['labels'])} images, not {n}"
        encoding = json.loads(meta.get("encoding", "{}"))
    except Exception as err:  # safetensors raises its own error types for cut-short files
        why = f"it cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    if why is not None:
        warnings.warn(f"feature cache {file} is damaged ({why}): removed, encoding again", stacklevel=3)
        file.unlink(missing_ok=True)
        return None
    return tensors["embeddings"], tensors["labels"], encoding
