"""Saved heads and LoRA adapters: writing them safely, and loading only what fits.

    classifier = load_classifier(lab, "flowers102", "lora")   # ClipClassifier, eval mode
    probs = classifier(pixels).softmax(-1)

Layout (see DESIGN.md):

    results/<dataset>/linear_probe/head.safetensors
    results/<dataset>/lora/head.safetensors, adapter/ (peft `save_pretrained`)

A head is a safetensors file whose metadata says what it was trained for: dataset, method,
model, number of classes, a hash of the class names, embedding size and epoch. Loading checks
all of them against the current run, so a head or adapter made for another dataset, class
list or model is refused with a message naming both sides instead of silently predicting
nonsense. Nothing is unpickled: weights are safetensors, metadata is JSON.

The adapter folder also records the head's metadata (`clip_lab.json`), so a head and an
adapter from different runs or epochs are never paired.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from .results import atomic_path, method_dir, publish

HEAD_FILE = "head.safetensors"
ADAPTER_DIR = "adapter"
ADAPTER_INFO = "clip_lab.json"
# `predict --method probe` and the results folder name the linear probe differently.
METHOD_DIRS = {"probe": "linear_probe", "linear_probe": "linear_probe", "lora": "lora"}
TRAIN_COMMANDS = {"linear_probe": "probe", "lora": "lora"}


class CheckpointMismatchError(ValueError):
    """A checkpoint exists but was trained for another dataset, class list or model."""


@dataclass(frozen=True)
class HeadInfo:
    """What a head was trained for; stored as safetensors metadata.

    Attributes:
        dataset: dataset name.
        method: `linear_probe` or `lora`.
        model: the CLIP id or folder it was trained on.
        n_classes: number of outputs.
        classes_hash: `classes_hash(class_names)`.
        embed_dim: input size (CLIP's projection dimension).
        epoch: the (best) epoch the weights come from.
    """

    dataset: str
    method: str
    model: str
    n_classes: int
    classes_hash: str
    embed_dim: int
    epoch: int = 0

    def to_metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: Path) -> HeadInfo:
        try:
            values = {f.name: meta[f.name] for f in fields(cls)}
            for name in ("n_classes", "embed_dim", "epoch"):
                values[name] = int(values[name])
        except (KeyError, ValueError) as err:
            raise CheckpointMismatchError(
                f"{path} is not a clip-lab head checkpoint (metadata {err} missing or invalid); "
                f"delete it and retrain"
            ) from err
        return cls(**values)


def classes_hash(class_names: Sequence[str]) -> str:
    """A short hash of the class names in label order (order matters: it is the label map)."""
    return hashlib.sha256("\n".join(class_names).encode()).hexdigest()[:16]


def head_info(*, dataset: str, method: str, model: str, class_names: Sequence[str], embed_dim: int,
              epoch: int = 0) -> HeadInfo:
    """The `HeadInfo` of a run.

    Args:
        dataset: dataset name.
        method: `probe`, `linear_probe` or `lora`.
        model: CLIP id or folder.
        class_names: names in label order.
        embed_dim: CLIP's projection dimension.
        epoch: the epoch the weights come from.
    """
    return HeadInfo(dataset=dataset, method=METHOD_DIRS[method], model=str(model), n_classes=len(class_names),
                    classes_hash=classes_hash(class_names), embed_dim=int(embed_dim), epoch=int(epoch))


# --------------------------------------------------------------------------- heads


def save_head(path: str | Path, head: nn.Linear, info: HeadInfo) -> Path:
    """Write a linear head and its metadata to a safetensors file, atomically.

    Args:
        path: output file (`.../head.safetensors`).
        head: the linear layer (`info.embed_dim -> info.n_classes`).
        info: what it was trained for.
    """
    from safetensors.torch import save_file

    tensors = {"weight": head.weight.detach().float().cpu().contiguous(),
               "bias": head.bias.detach().float().cpu().contiguous()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=info.to_metadata())
    return Path(path)


def read_head(path: str | Path) -> tuple[nn.Linear, HeadInfo]:
    """Load a head file without checking what it was made for.

    Args:
        path: a file written by `save_head`.
    """
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        info = HeadInfo.from_metadata(f.metadata() or {}, path)
        weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head, info


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_head(info: HeadInfo, expected: HeadInfo, path: Path) -> None:
    """Raise `CheckpointMismatchError` unless `info` fits the run described by `expected`.

    Args:
        info: metadata read from the checkpoint.
        expected: the current run (its `epoch` is ignored).
        path: the checkpoint, for the message.
    """
    problems = []
    if info.dataset != expected.dataset:
        problems.append(f"dataset {info.dataset!r}, not {expected.dataset!r}")
    if info.method != expected.method:
        problems.append(f"method {info.method!r}, not {expected.method!r}")
    if not _same_model(info.model, expected.model):
        problems.append(f"model {info.model!r}, not {expected.model!r}")
    if info.n_classes != expected.n_classes:
        problems.append(f"{info.n_classes} classes, not {expected.n_classes}")
    elif info.classes_hash != expected.classes_hash:
        problems.append("a different class list (names or order)")
    if info.embed_dim != expected.embed_dim:
        problems.append(f"embedding size {info.embed_dim}, not {expected.embed_dim}")
    if problems:
        command = TRAIN_COMMANDS.get(expected.method, "probe")
        raise CheckpointMismatchError(
            f"{path} was trained for {'; '.join(problems)} (this run: dataset {expected.dataset!r}, "
            f"model {expected.model!r}, {expected.n_classes} classes). Retrain it with "
            f"`python -m clip_utils {command} --dataset {expected.dataset} --model {expected.model}`, "
            f"or point --results-dir at the results of the matching run."
        )


def load_head(path: str | Path, expected: HeadInfo) -> tuple[nn.Linear, HeadInfo]:
    """Load a head, checking it was made for the run described by `expected`.

    Args:
        path: the head file.
        expected: dataset, method, model, classes and embedding size of this run.

    Raises:
        FileNotFoundError: no such file (the message names the command that creates it).
        CheckpointMismatchError: made for another dataset, class list, model or method.
    """
    path = Path(path)
    if not path.is_file():
        raise missing_checkpoint(path, expected.dataset, expected.method)
    head, info = read_head(path)
    check_head(info, expected, path)
    return head, info


def missing_checkpoint(path: Path, dataset: str, method: str) -> FileNotFoundError:
    """The error for a checkpoint that is not there, naming the command that creates it."""
    command = TRAIN_COMMANDS[METHOD_DIRS[method]]
    return FileNotFoundError(
        f"no {METHOD_DIRS[method].replace('_', ' ')} checkpoint for {dataset}: expected {path}. "
        f"Train one with `python -m clip_utils {command} --dataset {dataset}` (or run Task2.ipynb) "
        f"with the same --results-dir."
    )


# --------------------------------------------------------------------------- adapters


def save_adapter(folder: str | Path, peft_model, info: HeadInfo) -> Path:
    """Save a peft adapter with `save_pretrained` and swap it into `folder` atomically.

    The adapter is written to a temporary sibling folder first; a crash mid-write leaves
    the previous adapter intact.

    Args:
        folder: the adapter folder (`.../lora/adapter`).
        peft_model: the `PeftModel` wrapping the vision encoder.
        info: the matching head's metadata, recorded in `clip_lab.json`.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    old = folder.with_name(f".{folder.name}.old")
    try:
        peft_model.save_pretrained(str(tmp))
        (tmp / ADAPTER_INFO).write_text(json.dumps(asdict(info), indent=1) + "\n")
        publish(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------- classifiers


def checkpoint_paths(results_dir: str | Path, dataset: str, method: str) -> dict[str, Path]:
    """`{"head": ..., "adapter": ...}` of a method's run (adapter only used by LoRA).

    Args:
        results_dir: the results root.
        dataset: dataset name.
        method: `probe`, `linear_probe` or `lora`.
    """
    if method not in METHOD_DIRS:
        raise ValueError(f"unknown method {method!r}: choose probe or lora")
    folder = method_dir(results_dir, dataset, METHOD_DIRS[method])
    return {"head": folder / HEAD_FILE, "adapter": folder / ADAPTER_DIR}


def load_classifier(lab, dataset: str, method: str):
    """The trained classifier of a dataset, ready for prediction: a `ClipClassifier` in eval mode.

    The linear probe shares the lab's frozen CLIP; LoRA gets a fresh copy of the vision
    encoder with the saved adapter attached (attaching it to the shared model would change
    zero-shot predictions made later in the same process).

    Args:
        lab: the run context (model, results folder, device).
        dataset: dataset name.
        method: `probe` (or `linear_probe`) or `lora`.

    Raises:
        FileNotFoundError: not trained yet (the message names the command to run).
        CheckpointMismatchError: trained for another dataset, class list or model.
    """
    from peft import PeftModel

    from .data import class_names
    from .lab import inference_dtype
    from .lora import quiet_peft
    from .models import ClipClassifier, load_clip

    paths = checkpoint_paths(lab.results_dir, dataset, method)
    if not paths["head"].is_file():
        raise missing_checkpoint(paths["head"], dataset, method)
    head, info = read_head(paths["head"])
    lora = METHOD_DIRS[method] == "lora"
    if lora:
        if not (paths["adapter"] / "adapter_config.json").is_file():
            raise missing_checkpoint(paths["adapter"], dataset, method)
        clip, _ = load_clip(lab.model, lab.device, dtype=inference_dtype(lab.device))
    else:
        clip, _ = lab.clip()
    expected = head_info(dataset=dataset, method=method, model=lab.model,
                         class_names=class_names(dataset, lab.data_root),
                         embed_dim=clip.visual_projection.out_features)
    check_head(info, expected, paths["head"])
    vision = clip.vision_model
    if lora:
        check_adapter(paths["adapter"], info)
        with quiet_peft():
            vision = PeftModel.from_pretrained(vision, str(paths["adapter"])).to(lab.device)
    # The head stays float32 beside an fp16 encoder: ClipClassifier casts the embedding up.
    return ClipClassifier(vision, clip.visual_projection, head.float().to(lab.device)).eval()


def check_adapter(folder: Path, info: HeadInfo) -> None:
    """Raise unless the adapter in `folder` was saved together with the head described by `info`.

    Args:
        folder: the adapter folder.
        info: the metadata of the head beside it.
    """
    file = folder / ADAPTER_INFO
    if not file.is_file():
        raise CheckpointMismatchError(f"{folder} has no {ADAPTER_INFO}: it was not saved by clip-lab; retrain")
    recorded = HeadInfo(**json.loads(file.read_text()))
    if recorded != info:
        raise CheckpointMismatchError(
            f"the adapter in {folder} (dataset {recorded.dataset}, epoch {recorded.epoch}) does not belong "
            f"to the head beside it (dataset {info.dataset}, epoch {info.epoch}): it comes from another run "
            f"or the run was interrupted while saving. Retrain with "
            f"`python -m clip_utils lora --dataset {info.dataset}` (add --resume to continue)."
        )
