"""The shared context of a run: which model, data, device and results folder, loaded once.

    lab = Lab(model="openai/clip-vit-large-patch14", data_root="data", results_dir="results")
    feats = lab.features("flowers102", "test")      # encoded once, cached on disk

Notebook cells and CLI commands receive a `Lab` instead of a dozen loose arguments, and the
model, processor and encoded features are loaded lazily and shared by everything that runs
in the same process (every prompt set, the probe, the photo predictions).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import ImageListDataset, load_dataset
from .features import Features, encode_dataset
from .models import DEFAULT_MODEL, Preprocess, load_clip


def default_device() -> str:
    """`$CLIP_DEVICE`, else `cuda` when available, else `cpu`."""
    return os.environ.get("CLIP_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def inference_dtype(device: str | torch.device) -> torch.dtype:
    """fp16 weights on CUDA (about 8x fp32 on an H200, same predictions), fp32 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


@dataclass
class Lab:
    """Run settings plus lazily loaded model, processor and features.

    Args:
        model: Hugging Face CLIP id or local folder.
        data_root: dataset root.
        results_dir: results root.
        device: `cuda`, `cpu`, ... (None: `default_device()`).
        batch_size: images per batch (the training batch of the probe and LoRA).
        encode_batch_size: images per forward pass when encoding frozen features (None:
            `max(batch_size, 128)`: inference keeps no activations for a backward pass, so a
            batch larger than training's fits in the same memory and keeps the GPU busy).
        seed: random seed for training and sampling.
        download: download missing datasets.
        num_workers: file reader threads, or worker processes on the PIL path (None: all cores but one).
    """

    model: str = DEFAULT_MODEL
    data_root: Path | str = "data"
    results_dir: Path | str = "results"
    device: str | None = None
    batch_size: int = 128
    encode_batch_size: int | None = None
    seed: int = 0
    download: bool = True
    num_workers: int | None = None
    _clip: tuple | None = field(default=None, init=False, repr=False)
    _features: dict = field(default_factory=dict, init=False, repr=False)
    _text: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_root = Path(self.data_root)
        self.results_dir = Path(self.results_dir)
        self.device = self.device or default_device()
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"unknown device {self.device!r}: use cuda, cuda:N, cpu or mps") from None
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device {self.device!r} requested but CUDA is not available here; "
                f"use --device cpu (or CLIP_DEVICE=cpu)"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch size must be positive, got {self.batch_size}")
        if self.encode_batch_size is None:
            self.encode_batch_size = max(self.batch_size, 128)
        if self.encode_batch_size < 1:
            raise ValueError(f"encoding batch size must be positive, got {self.encode_batch_size}")

    @property
    def cache_dir(self) -> Path:
        return self.results_dir / "cache" / "features"

    def clip(self):
        """The frozen CLIP model and processor (fp16 on CUDA), loaded on first use."""
        if self._clip is None:
            self._clip = load_clip(self.model, self.device, dtype=inference_dtype(self.device))
        return self._clip

    def unload(self) -> None:
        """Free the loaded model and processor (features and text classifiers stay); `clip()`
        loads them again."""
        self._clip = None

    def text_classifier(self, dataset: str, prompt_set: str) -> torch.Tensor:
        """`(D, C)` zero-shot class weights of a prompt set, built once per lab and shared by
        every user (zero-shot evaluation, `auto`'s selection, photos, the heads' initialisation).

        Args:
            dataset: `flowers102` or `cub200`.
            prompt_set: a set of `prompts.prompt_sets(dataset)`.
        """
        from .data import class_names
        from .prompts import build_text_classifier, prompt_sets

        if (dataset, prompt_set) not in self._text:
            sets = prompt_sets(dataset)
            if prompt_set not in sets:
                raise ValueError(f"unknown prompt set {prompt_set!r} for {dataset}: choose from {', '.join(sets)}")
            model, processor = self.clip()
            self._text[dataset, prompt_set] = build_text_classifier(
                model, processor.tokenizer, class_names(dataset, self.data_root), sets[prompt_set], self.device,
                self.batch_size)
        return self._text[dataset, prompt_set]

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_processor(self.clip()[1])

    def dataset(self, name: str, split: str, transform=None) -> ImageListDataset:
        """A dataset split (downloaded when missing and `download` is set)."""
        return load_dataset(name, self.data_root, split, transform=transform, download=self.download)

    def features(self, name: str, split: str) -> Features:
        """Frozen-encoder embeddings of a split: from memory, the disk cache, or encoded now."""
        if (name, split) not in self._features:
            model, _ = self.clip()
            self._features[name, split] = encode_dataset(
                model, self.dataset(name, split), self.preprocess, self.device,
                cache_dir=self.cache_dir, batch_size=self.encode_batch_size, num_workers=self.num_workers,
            )
        return self._features[name, split]
