"""Saved heads and LoRA adapters: writing them safely, and loading only what fits.

    save_head(folder / HEAD_FILE, head, head_info(dataset="flowers102", method="lora", ...))
    head, info = load_head(folder / HEAD_FILE, expected)      # refused unless it fits `expected`

Layout (see DESIGN.md):

    results/<dataset>/linear_probe/head.safetensors (and head_train.safetensors with --solver lbfgs)
    results/<dataset>/lora/head.safetensors, adapter/ (peft `save_pretrained`, the vision tower's),
                           text_adapter/ (the text tower's, `lora --encoders text|both`)

A head is a safetensors file whose metadata says what it was trained for: dataset, method,
model, number of classes, a hash of the class names, embedding size and epoch. Loading checks
all of them against the current run, so a head or adapter made for another dataset, class
list or model is refused with a message naming both sides instead of silently predicting
nonsense. Nothing is unpickled: weights are safetensors, metadata is JSON.

Each adapter folder also records the head's metadata (`clip_lab.json`), so a head and an
adapter from different runs or epochs are never paired; the metadata's `encoders` says
which towers the run adapted, so a missing adapter is noticed rather than silently skipped. A file that is cut short or damaged
is a `CheckpointError` naming it and the command that makes a new one. Putting a head
together with its encoder is each method's job (`probe.load_classifier`,
`lora.load_classifier`); this module only reads and writes files.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from clip_utils import registry
from clip_utils.data import Dataset
from clip_utils.errors import InvalidValue, MissingFile
from clip_utils.results.layout import method_dir
from clip_utils.runtime.files import atomic_folder, atomic_path

HEAD_FILE = "head.safetensors"
# The L-BFGS probe's head fitted on train alone (head.safetensors is refit on train + val):
# what LoRA starts from, so that LoRA's validation split stays unseen.
TRAIN_HEAD_FILE = "head_train.safetensors"
ADAPTER_DIR = "adapter"
TEXT_ADAPTER_DIR = "text_adapter"
ADAPTER_INFO = "clip_lab.json"
# A fitted module (`save_module`): its tensors, and under this metadata key its constructor arguments.
MODULE_FILE = "adapter.safetensors"
MODULE_CONFIG = "module_config"


class CheckpointError(InvalidValue):
    """A checkpoint that cannot be used: damaged, or made for something else."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint exists but was trained for another dataset, class list or model."""


def _retrain(dataset: str, method: str) -> str:
    return f"`python -m clip_utils {registry.get(method).command} --dataset {dataset}`"


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
        encoders: the towers LoRA adapted (`vision`, `text`, `both`; `vision` for a probe, and
            for checkpoints written before text LoRA existed).
    """

    dataset: str
    method: str
    model: str
    n_classes: int
    classes_hash: str
    embed_dim: int
    epoch: int = 0
    encoders: str = "vision"

    def to_metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: Path) -> HeadInfo:
        try:
            # Fields added later have defaults: older checkpoints lack them and still load.
            values = {f.name: meta[f.name] for f in fields(cls) if f.name in meta or f.default is MISSING}
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
              epoch: int = 0, encoders: str = "vision") -> HeadInfo:
    """The `HeadInfo` of a run.

    Args:
        dataset: dataset name.
        method: `probe`, `linear_probe` or `lora`.
        model: CLIP id or folder.
        class_names: names in label order.
        embed_dim: CLIP's projection dimension.
        epoch: the epoch the weights come from.
        encoders: the towers LoRA adapted.
    """
    return HeadInfo(dataset=dataset, method=registry.get(method).name, model=str(model), n_classes=len(class_names),
                    classes_hash=classes_hash(class_names), embed_dim=int(embed_dim), epoch=int(epoch),
                    encoders=encoders)


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
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
    except Exception as err:  # safetensors' own error types for a cut-short or foreign file
        raise CheckpointError(
            f"{path} is damaged ({str(err).splitlines()[0] if str(err) else type(err).__name__}): delete it and "
            f"retrain{_retrain_from(path)}"
        ) from err
    info = HeadInfo.from_metadata(meta, path)
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise CheckpointError(f"{path} is damaged (non-finite weights): delete it and retrain{_retrain_from(path)}")
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head, info


def save_module(path: str | Path, module: nn.Module, config: dict, info: HeadInfo) -> Path:
    """Write a fitted module's tensors, the arguments that rebuild it, and its metadata, atomically.

    safetensors holds tensors only (no pickle): the module is rebuilt from `config` by its
    method's class and gets these tensors with `load_state_dict`.

    Args:
        path: output file (`.../adapter.safetensors`).
        module: the fitted module (its `state_dict`: parameters and buffers).
        config: JSON-able constructor arguments of the module's class.
        info: what it was fitted for.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=info.to_metadata() | {MODULE_CONFIG: json.dumps(config)})
    return Path(path)


def read_module(path: str | Path, build: Callable[..., nn.Module]) -> tuple[nn.Module, HeadInfo]:
    """Rebuild a module saved by `save_module`, without checking what it was fitted for.

    Args:
        path: the file.
        build: the module's class (or any callable taking its saved config as keyword arguments).

    Raises:
        CheckpointError: damaged, not such a file, or tensors that do not fit the module.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors' own error types for a cut-short or foreign file
        raise CheckpointError(
            f"{path} is damaged ({str(err).splitlines()[0] if str(err) else type(err).__name__}): delete it and "
            f"retrain{_retrain_from(path)}"
        ) from err
    info = HeadInfo.from_metadata(meta, path)
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise CheckpointError(f"{path} is damaged (non-finite weights): delete it and retrain{_retrain_from(path)}")
    try:
        module = build(**json.loads(meta[MODULE_CONFIG]))
        module.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} does not hold a {info.method} module this version can rebuild ({err}): "
                              f"delete it and retrain{_retrain_from(path)}") from err
    return module, info


def _retrain_from(path: Path) -> str:
    # The damaged file's own metadata is unreadable: its folder names the dataset and method.
    folder = path.parent
    try:
        return f" with {_retrain(folder.parent.name, folder.name)}"
    except ValueError:
        return ""


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_head(info: HeadInfo, expected: HeadInfo, path: Path) -> None:
    """Raise `CheckpointMismatchError` unless `info` fits the run described by `expected`.

    Args:
        info: metadata read from the checkpoint.
        expected: the current run (its `epoch` and `encoders` are ignored).
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
        command = registry.get(expected.method).command
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


def missing_checkpoint(path: Path, dataset: Dataset, method: str, shots: int | None = None,
                       seed: int | None = None) -> MissingFile:
    """The error for a checkpoint that is not there, naming the command that creates it.

    Args:
        path: the missing file or folder.
        dataset: the resolved dataset.
        method: a registered method.
        shots: a few-shot run's images per class (None: the full-data run).
        seed: that run's seed.
    """
    args, name = shlex.join(dataset.command_args), dataset.folder
    if shots is not None:
        command = f"`python -m clip_utils {registry.get(method).command} {args} --shots {shots} --seed {seed}`"
        return MissingFile(f"no {shots}-shot {registry.get(method).label} checkpoint for {name} with seed "
                                 f"{seed}: expected {path}. Train one with {command} (or the fewshot command) with "
                                 f"the same --results-dir.")
    return MissingFile(
        f"no {registry.get(method).label} checkpoint for {name}: expected {path}. "
        f"Train one with `python -m clip_utils {registry.get(method).command} {args}` (or run Task2.ipynb) with "
        f"the same --results-dir."
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
    with atomic_folder(folder) as tmp:
        peft_model.save_pretrained(str(tmp))
        (tmp / ADAPTER_INFO).write_text(json.dumps(asdict(info), indent=1) + "\n")
    return folder


# --------------------------------------------------------------------------- classifiers


def checkpoint_paths(results_dir: str | Path, dataset: Dataset | str, method: str) -> dict[str, Path]:
    """`{"head": ..., "adapter": ..., "text_adapter": ...}` of a method's run (adapters: LoRA's).

    Args:
        results_dir: the results root.
        dataset: the resolved dataset, or its results folder's name.
        method: `probe`, `linear_probe` or `lora`.
    """
    m = registry.get(method)
    if not m.trained:
        raise InvalidValue(f"{m.label} trains nothing and has no checkpoint: choose probe or lora")
    folder = method_dir(results_dir, dataset, m.folder)
    return {"head": folder / HEAD_FILE, "adapter": folder / ADAPTER_DIR, "text_adapter": folder / TEXT_ADAPTER_DIR}


def check_adapter(folder: Path, info: HeadInfo) -> None:
    """Raise unless the adapter in `folder` was saved together with the head described by `info`.

    Args:
        folder: the adapter folder.
        info: the metadata of the head beside it.
    """
    file = folder / ADAPTER_INFO
    if not file.is_file():
        raise CheckpointMismatchError(f"{folder} has no {ADAPTER_INFO}: it was not saved by clip-lab; retrain "
                                      f"with {_retrain(info.dataset, info.method)}")
    try:
        recorded = HeadInfo(**json.loads(file.read_text()))  # a file without `encoders`: vision
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{file} is damaged ({err}): delete {folder} and retrain with "
                              f"{_retrain(info.dataset, info.method)}") from err
    if recorded != info:
        raise CheckpointMismatchError(
            f"the adapter in {folder} (dataset {recorded.dataset}, epoch {recorded.epoch}) does not belong "
            f"to the head beside it (dataset {info.dataset}, epoch {info.epoch}): it comes from another run "
            f"or the run was interrupted while saving. Retrain with "
            f"`python -m clip_utils lora --dataset {info.dataset}` (add --resume to continue)."
        )
