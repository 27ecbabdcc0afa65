"""The shared context of a run: which model, data, device and results folder, loaded once.

    lab = Lab(model="openai/clip-vit-large-patch14", data_root="data", results_dir="results")
    flowers = lab.resolve("flowers102")               # the typed dataset every stage takes
    feats = lab.features(flowers, "test")             # encoded once, cached on disk
    other = lab.replace(model="openai/clip-vit-base-patch16")   # a new lab, nothing shared

Notebook cells and CLI commands receive a `Lab` instead of a dozen loose arguments. A lab is
immutable: its model, processor, resolved datasets, encoded features and text classifiers
are loaded lazily and shared by everything that runs with it (every prompt set, the probe, the photo
predictions), and a change of model, data root or device means a new lab, so no cache can
ever serve something it was not computed for.

The checkpoint is read from disk once per lab (`checkpoint()`, on the CPU in float32;
`model.clip.load_clip` says each load in a line on stderr) and its weights are never changed:
the inference model (`clip()`, fp16 on CUDA) and the models a method changes (LoRA's
adapters: `model_copy()`) are copies of it, so zero-shot, the probe, LoRA's training and
test, photos and the explorer cost one read between them, and `unload()` frees the GPU
without a second read later. The price is host memory: the checkpoint stays there for the
lab's life (1.7 GB for ViT-L/14, per process under torchrun).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from clip_utils.config import CLASS_NAMING, DEFAULT_MODEL, INFERENCE_BATCH_SIZE
from clip_utils.config import OFFICIAL_SPLIT, SPLIT_SOURCES
from clip_utils.data import Dataset, ImageListDataset, resolve
from clip_utils.data.classnames import check_naming
from clip_utils.errors import InvalidValue, MissingFile
from clip_utils.model.clip import Clip, load_clip, load_preprocess
from clip_utils.model.features import Features, encode_dataset
from clip_utils.model.preprocess import Preprocess
from clip_utils.prompts import DESCRIPTIONS, PromptSet, build_text_classifier, prompt_sets, select_prompt_set
from clip_utils.prompts.descriptions import description_set
from clip_utils.runtime import distributed


def default_device() -> str:
    """`$CLIP_DEVICE`, else `cuda` when available, else `cpu`."""
    return os.environ.get("CLIP_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def inference_dtype(device: str | torch.device) -> torch.dtype:
    """fp16 weights on CUDA (about 8x fp32 on an H200, same predictions), fp32 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def check_device(device: str) -> None:
    """Raise `ValueError` (one line naming the fix) unless `device` names a usable device.

    Args:
        device: e.g. `cuda`, `cuda:1`, `cpu`, `mps`.
    """
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise InvalidValue(f"unknown device {device!r}: use cuda, cuda:N, cpu or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise InvalidValue(f"device {device!r} requested but CUDA is not available here; "
                         f"use --device cpu (or CLIP_DEVICE=cpu)")


@dataclass
class _Loaded:
    """What a lab has loaded so far; private to one lab, never copied to another."""

    checkpoint: Clip | None = None
    datasets: dict[str, Dataset] = field(default_factory=dict)
    clip: Clip | None = None
    preprocess: Preprocess | None = None
    features: dict[tuple[Dataset, str], Features] = field(default_factory=dict)
    text: dict[tuple[Dataset, str], torch.Tensor] = field(default_factory=dict)
    prompt_sets: dict[Dataset, dict[str, PromptSet]] = field(default_factory=dict)
    logit_scale: float | None = None
    logit_bias: float | None = None


@dataclass(frozen=True)
class Lab:
    """Run settings plus lazily loaded model, processor, features and text classifiers.

    Args:
        model: Hugging Face CLIP id or local folder.
        data_root: dataset root.
        results_dir: results root.
        device: `cuda`, `cpu`, ... (None: `default_device()`).
        batch_size: images per batch (the training batch of the probe and LoRA when their
            config leaves it open).
        encode_batch_size: images per forward pass when encoding frozen features (None:
            `max(batch_size, INFERENCE_BATCH_SIZE)`: inference keeps no activations for a
            backward pass, so a larger batch fits in the same memory and keeps the GPU busy).
        seed: random seed for training and sampling.
        download: download missing datasets.
        num_workers: file reader threads, or worker processes on the PIL path (None: all cores but one).
        class_naming: the class names prompts, tables and figures use: `curated` (CLIP's
            Flowers102 list, CUB's proper bird names) or `original` (the datasets' own).
        domain: a domain phrase for the `domain` prompt sets (`a type of mushroom`), over the
            dataset's own (an image folder's classes.json); None: the dataset's.
        descriptions: a CuPL/DCLIP descriptions file (`{"class name": ["description", ...]}`)
            for the `descriptions` prompt set (see `descriptions`); None: no such set. Read
            once, when the lab first needs a dataset's prompt sets; another file is another lab.
        split_source: where the train/val/test of the datasets it resolves come from: `official`,
            or `coop` for Zhou et al.'s split (`data.splits`).
        split_file: the `split_zhou_*.json` file of `coop` (None: the published one).
    """

    model: str = DEFAULT_MODEL
    data_root: Path = Path("data")
    results_dir: Path = Path("results")
    device: str | None = None
    batch_size: int = INFERENCE_BATCH_SIZE
    encode_batch_size: int | None = None
    seed: int = 0
    download: bool = True
    num_workers: int | None = None
    class_naming: str = CLASS_NAMING
    domain: str | None = None
    descriptions: Path | None = None
    split_source: str = OFFICIAL_SPLIT
    split_file: Path | None = None
    _loaded: _Loaded = field(default_factory=_Loaded, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Normalise once (frozen: set through object.__setattr__, before anyone reads them).
        set_ = object.__setattr__
        # Local folders in one spelling, wherever the run starts: the feature cache, checkpoints,
        # few-shot reuse and reports compare these strings (`results/m` and `/abs/results/m`
        # are one model, not two). A hub id stays as it is.
        model = Path(str(self.model)).expanduser()
        set_(self, "model", str(model.resolve()) if model.is_dir() else str(self.model))
        set_(self, "data_root", Path(self.data_root).expanduser().resolve())
        set_(self, "results_dir", Path(self.results_dir))
        set_(self, "device", self.device or default_device())
        check_device(self.device)
        check_naming(self.class_naming)
        if self.split_file is not None:
            set_(self, "split_file", Path(self.split_file).expanduser())
        if self.split_source not in SPLIT_SOURCES:
            raise InvalidValue(f"unknown split source {self.split_source!r}: choose one of {', '.join(SPLIT_SOURCES)}")
        if self.descriptions is not None:
            set_(self, "descriptions", Path(self.descriptions))
            if not self.descriptions.is_file():  # said now, before any model or dataset loads
                raise MissingFile(f"descriptions file not found: {self.descriptions}")
        if self.batch_size < 1:
            raise InvalidValue(f"batch size must be positive, got {self.batch_size}")
        if self.encode_batch_size is None:
            set_(self, "encode_batch_size", max(self.batch_size, INFERENCE_BATCH_SIZE))
        if self.encode_batch_size < 1:
            raise InvalidValue(f"encoding batch size must be positive, got {self.encode_batch_size}")

    def replace(self, **changes) -> Lab:
        """A new lab with some settings changed and nothing loaded (`dataclasses.replace`)."""
        return replace(self, **changes)

    @property
    def cache_dir(self) -> Path:
        return self.results_dir / "cache" / "features"

    def checkpoint(self) -> Clip:
        """The model as read from disk, on the CPU in float32: read on first use, once per lab;
        its weights are never changed (whatever changes a model works on a `model_copy()`)."""
        if self._loaded.checkpoint is None:
            self._loaded.checkpoint = load_clip(self.model, "cpu", dtype=torch.float32)
        return self._loaded.checkpoint

    def clip(self) -> Clip:
        """The frozen inference model and processor (fp16 on CUDA), made from the checkpoint on
        first use: the checkpoint itself where that is already right (fp32 on the CPU)."""
        if self._loaded.clip is None:
            checkpoint, dtype = self.checkpoint(), inference_dtype(self.device)
            same = torch.device(self.device).type == "cpu" and dtype == checkpoint.dtype
            self._loaded.clip = checkpoint if same else checkpoint.copy(self.device, dtype)
        return self._loaded.clip

    def model_copy(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Clip:
        """A copy of the checkpoint, the caller's own to change (adapters), without reading it again.

        Args:
            device: where (None: the lab's device).
            dtype: floating-point dtype (None: the checkpoint's float32).
        """
        return self.checkpoint().copy(device or self.device, dtype)

    def unload(self) -> None:
        """Free the inference model (the GPU memory it holds); the checkpoint stays in host
        memory, as do features, text classifiers and the logit scale, and `clip()` makes the
        model again from it without reading the disk."""
        self._loaded.clip = None

    @property
    def logit_scale(self) -> float:
        """CLIP's temperature, read once and kept through `unload`: a head built after LoRA freed
        the model (LoRA on a second dataset) must not load the whole model again for one number."""
        if self._loaded.logit_scale is None:
            self._loaded.logit_scale = self.clip().logit_scale
        return self._loaded.logit_scale

    @property
    def logit_bias(self) -> float:
        """SigLIP's logit bias (0 for CLIP), kept through `unload` as the logit scale is."""
        if self._loaded.logit_bias is None:
            self._loaded.logit_bias = self.clip().logit_bias
        return self._loaded.logit_bias

    @property
    def preprocess(self) -> Preprocess:
        """The model's image preprocessing, read from its processor config (no weights loaded)."""
        if self._loaded.preprocess is None:
            clip = self._loaded.clip or self._loaded.checkpoint
            self._loaded.preprocess = clip.preprocess if clip is not None else load_preprocess(self.model)
        return self._loaded.preprocess

    def resolve(self, dataset: str | Dataset) -> Dataset:
        """The `Dataset` of a name, under this lab's data root, class naming and split source:
        resolved once per lab and name (a `Dataset` is returned as it is).

        Args:
            dataset: a registered name, `imagefolder:PATH` or a `Dataset`.

        Raises:
            InvalidValue: a `Dataset` resolved for another data root or class naming (what this
                lab records of its runs would contradict it).
        """
        if isinstance(dataset, Dataset):
            if (dataset.root, dataset.naming) != (self.data_root, self.class_naming):
                raise InvalidValue(f"{dataset.folder} was resolved for data root {dataset.root} and {dataset.naming} "
                                   f"names, this lab has {self.data_root} and {self.class_naming}: resolve it with "
                                   f"lab.resolve(name)")
            return dataset
        if dataset not in self._loaded.datasets:
            # Under torchrun one process per machine downloads; the others then find the files.
            with distributed.local_main_first():
                self._loaded.datasets[dataset] = resolve(dataset, self.data_root, self.class_naming,
                                                         self.split_source, self.split_file, self.download)
        return self._loaded.datasets[dataset]

    def class_names(self, dataset: str | Dataset) -> list[str]:
        """Class names of `dataset` in label order as its naming says (metadata only, no images)."""
        return list(self.resolve(dataset).class_names)

    def label_map(self, dataset: str | Dataset) -> list[str]:
        """The dataset's own class names in label order: what checkpoints are checked against,
        so a head trained under one naming still loads under the other."""
        return list(self.resolve(dataset).original_names)

    def prompt_sets(self, dataset: str | Dataset) -> dict[str, PromptSet]:
        """The prompt sets of `dataset`: `prompts.prompt_sets` with this lab's domain phrase and
        seed (`waffle`), plus `descriptions` (`{class name: prompts}`) when the lab has a file.

        Built once per lab and dataset, so the prompts a text classifier encodes are the ones
        metrics.json records, even if the file changes meanwhile. Returns a copy.
        """
        ds = self.resolve(dataset)
        if ds not in self._loaded.prompt_sets:
            sets: dict[str, PromptSet] = dict(prompt_sets(ds.spec, self.domain, self.seed))
            if self.descriptions is not None:
                sets[DESCRIPTIONS] = description_set(self.descriptions, list(ds.class_names), list(ds.original_names))
            self._loaded.prompt_sets[ds] = sets
        sets = self._loaded.prompt_sets[ds]
        return {name: dict(s) if isinstance(s, dict) else list(s) for name, s in sets.items()}

    def text_classifier(self, dataset: str | Dataset, prompt_set: str) -> torch.Tensor:
        """`(D, C)` zero-shot class weights of a prompt set, built once per lab and shared by
        every user (zero-shot evaluation, `auto`'s selection, photos, the heads' initialisation).

        Args:
            dataset: the dataset (its class names, under its naming and class subset).
            prompt_set: a set of `self.prompt_sets(dataset)`.
        """
        ds = self.resolve(dataset)
        key = (ds, prompt_set)
        if key not in self._loaded.text:
            sets = self.prompt_sets(ds)
            if prompt_set not in sets:
                raise InvalidValue(f"unknown prompt set {prompt_set!r} for {ds.folder}: choose from {', '.join(sets)}")
            clip = self.clip()
            self._loaded.text[key] = build_text_classifier(
                clip.model, clip.tokenizer, list(ds.class_names), sets[prompt_set], self.device,
                self.batch_size, desc=f"encoding {ds.folder} prompts ({prompt_set})",
                text_kwargs=clip.backbone.text_kwargs(clip.model))
        return self._loaded.text[key]

    def choose_prompt_set(self, dataset: str | Dataset, val: Features | None = None) -> tuple[str, dict[str, float]]:
        """`auto`: the prompt set whose zero-shot classifier scores best on validation images.

        Every set of `self.prompt_sets(dataset)` is scored (ties: the first in their order);
        never on test images, so the choice is not made by looking at the test labels.

        Args:
            dataset: the dataset.
            val: the validation features to choose on (a few-shot run's sample; None: the
                whole validation split).

        Returns:
            `(chosen set, {set: validation top-1})`.
        """
        ds = self.resolve(dataset)
        val = self.features(ds, "val") if val is None else val
        classifiers = {name: self.text_classifier(ds, name) for name in self.prompt_sets(ds)}
        return select_prompt_set(val.embeddings, val.labels, classifiers, self.logit_scale)

    def dataset(self, dataset: str | Dataset, split: str, transform=None) -> ImageListDataset:
        """A dataset split (downloaded when missing and `download` is set)."""
        ds = self.resolve(dataset)
        if not self.download:
            return ds.load(split, transform=transform, download=False)
        # Under torchrun one process per machine downloads; the others then find the files.
        with distributed.local_main_first():
            return ds.load(split, transform=transform, download=True)

    def features(self, dataset: str | Dataset, split: str) -> Features:
        """Frozen-encoder embeddings of a split: from memory, the disk cache, or encoded now
        (a class subset's are its classes' rows of the whole dataset's)."""
        ds = self.resolve(dataset)
        if ds.classes is not None:
            return self.features(ds.full, split).of_classes(ds.classes)
        key = (ds, split)
        if key not in self._loaded.features:
            images = self.dataset(ds, split)  # first: a missing dataset is said before a model loads
            clip = self.clip()
            self._loaded.features[key] = encode_dataset(
                clip.model, images, clip.preprocess, self.device,
                cache_dir=self.cache_dir, batch_size=self.encode_batch_size, num_workers=self.num_workers,
                fingerprint=clip.fingerprint,
            )
        return self._loaded.features[key]
