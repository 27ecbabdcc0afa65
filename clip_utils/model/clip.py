"""Loading a CLIP-style checkpoint: the model, its processor and what is read off them once.

    from clip_utils.model.clip import load_clip
    clip = load_clip("openai/clip-vit-large-patch14", device="cuda", dtype=torch.float16)
    clip.model, clip.tokenizer, clip.preprocess, clip.logit_scale, clip.fingerprint
    clip.backbone.name        # "clip", "siglip" or "metaclip_2" (`backbones`)

Any Hugging Face id or local folder of a supported family works: CLIP (also MetaCLIP 1 and
OpenCLIP checkpoints in HF format), SigLIP (also SigLIP 2 at a fixed resolution) and
MetaCLIP 2. The family comes from the checkpoint's `config.json` (`model_type`), read before
any weight: another kind of checkpoint is refused in one line (`backbones.UnsupportedModel`).

Loading never waits on a network that is not there: a model that is neither a folder nor
in the local cache is fetched only after a quick reachability check, and
`HF_HUB_OFFLINE=1` is honoured, so an offline machine gets a
`ModelUnavailableError` naming the model within seconds instead of minutes of retries.
Each load says so in one line (`loaded NAME (427.6M parameters, float32) in 3.1 s`): on stderr
from the command line, on stdout in a notebook (`progress.info`).

Preprocessing always comes from the model's own processor configuration (resize, crop,
mean, std), never from constants: the tiny test model and ViT-L/14 differ in all four.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from clip_utils.config import DEFAULT_MODEL
from clip_utils.errors import UserError
from clip_utils.model.backbones import Backbone, config_backbone
from clip_utils.model.heads import logit_bias, logit_scale
from clip_utils.model.preprocess import Preprocess
from clip_utils.runtime import distributed
from clip_utils.runtime.env import TRUE
from clip_utils.runtime.files import regular_file
from clip_utils.runtime.network import reachable
from clip_utils.runtime.progress import info, quiet_loading


class ModelUnavailableError(UserError, RuntimeError):
    """The model is not on disk and cannot be downloaded now."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE


def _looks_like_path(name: str) -> bool:
    # Hub ids are `name` or `org/name`; anything else with a separator is meant as a folder.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _unavailable(name: str, why: str) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"cannot load model {name!r}: {why}. It is not in the local Hugging Face cache. "
        f"Run once with network access to download it (about 1.7 GB for ViT-L/14), point "
        f"CLIP_MODEL / --model at a local folder holding it, or try the whole pipeline offline "
        f"on the bundled tiny model with `make demo`."
    )


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


@dataclass(frozen=True)
class Clip:
    """A loaded CLIP-style checkpoint.

    Attributes:
        name: the id or folder it was loaded from.
        model: the family's model (`CLIPModel`, `SiglipModel`, `MetaClip2Model`), in eval mode.
        processor: its processor.
        backbone: its family (`backbones.Backbone`): text padding, logit bias, probabilities,
            LoRA targets, the class it exports with.
    """

    name: str
    model: Any
    processor: Any
    backbone: Backbone

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @cached_property
    def preprocess(self) -> Preprocess:
        """The image preprocessing of the processor config."""
        return Preprocess.from_processor(self.processor)

    @cached_property
    def logit_scale(self) -> float:
        """CLIP's temperature, `exp(model.logit_scale)`."""
        return logit_scale(self.model)

    @cached_property
    def logit_bias(self) -> float:
        """SigLIP's logit bias (`scale * cos + bias`); 0 for families without one."""
        return logit_bias(self.model)

    @cached_property
    def fingerprint(self) -> str:
        """`model_fingerprint` of the weights as loaded, computed once (the model is frozen)."""
        return model_fingerprint(self.model)

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def copy(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Clip:
        """A copy of the model, its own to change (adapters), on `device` in `dtype`.

        The same numbers as loading the checkpoint again with that device and dtype, without
        reading it from disk; the processor is shared (nothing changes it).

        Args:
            device: where to put the copy.
            dtype: its floating-point dtype (None: this model's).
        """
        # Each tensor is cast straight into its copy (deepcopy's memo hands them to the new
        # modules): a whole fp32 duplicate first would double the host memory a copy needs.
        memo: dict[int, torch.Tensor] = {}
        for t in (*self.model.parameters(), *self.model.buffers()):
            new = t.detach().to(device, dtype if t.is_floating_point() else None, copy=True)
            memo[id(t)] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
        model = copy.deepcopy(self.model, memo).eval()
        if dtype is not None:
            # As `from_pretrained(dtype=...)` records it: the config is part of the fingerprint.
            config = model.config
            for part in (config, *(getattr(config, name) for name in getattr(config, "sub_configs", {}))):
                part.dtype = dtype
        return Clip(name=self.name, model=model, processor=self.processor, backbone=self.backbone)


def load_clip(
    name_or_path: str | Path = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Clip:
    """Load a CLIP-style model and its processor, failing fast when it cannot be fetched.

    The family is read from `config.json` first (`checkpoint_backbone`): the weights load
    with the family's own class, and a checkpoint of no supported family is refused before
    any weight is read.

    Args:
        name_or_path: Hugging Face model id or a local folder saved with `save_pretrained`.
        device: where to put the model.
        dtype: parameter dtype (None keeps the checkpoint's, float32 for OpenAI CLIP).

    Returns:
        The `Clip`: model in eval mode on `device`, its processor and its family.

    Raises:
        ModelUnavailableError: not on disk and the hub cannot be reached (or offline mode).
        UnsupportedModel: a `model_type` of no supported family (SigLIP 2 NaFlex included).
    """
    name = str(name_or_path)
    start = time.perf_counter()
    backbone = checkpoint_backbone(name)

    def load(name: str, local_only: bool):
        # A `Loading weights` bar per load adds nothing (seconds from disk) and clutters
        # notebooks and logs; quiet_loading keeps the hub's download bars.
        with quiet_loading():
            model = backbone.load_model_class().from_pretrained(name, dtype=dtype, local_files_only=local_only)
        return model, backbone.load_processor_class().from_pretrained(name, local_files_only=local_only)

    model, processor = _from_pretrained(name, load)
    clip = Clip(name=name, model=model.to(device).eval(), processor=processor, backbone=backbone)
    if distributed.is_main():
        # One line per load: on ViT-L/14 a load is 1.7 GB and seconds, worth seeing (and counting).
        n = sum(p.numel() for p in clip.model.parameters())
        info(f"loaded {name} ({n / 1e6:.1f}M parameters, {str(clip.dtype).removeprefix('torch.')}) "
             f"in {time.perf_counter() - start:.1f} s")
    return clip


def load_preprocess(name_or_path: str | Path = DEFAULT_MODEL) -> Preprocess:
    """The image preprocessing of a checkpoint, read from its processor config alone (no weights).

    Args:
        name_or_path: Hugging Face model id or a local folder.

    Raises:
        ModelUnavailableError, UnsupportedModel: as `load_clip`.
    """
    image_processor = checkpoint_backbone(str(name_or_path)).load_image_processor_class()

    def load(name: str, local_only: bool):
        return image_processor.from_pretrained(name, local_files_only=local_only)

    return Preprocess.from_processor(_from_pretrained(str(name_or_path), load, weights=False))


def checkpoint_backbone(name_or_path: str | Path) -> Backbone:
    """The family of a checkpoint, from its `config.json` alone (fetched from the hub, a few
    hundred bytes, only when it is not on disk).

    Args:
        name_or_path: Hugging Face model id or a local folder.

    Raises:
        ModelUnavailableError: as `load_clip`.
        UnsupportedModel: a `model_type` of no supported family, in one line.
    """
    name = str(name_or_path)

    def read(name: str, local_only: bool) -> Backbone:
        from transformers.utils import cached_file

        path = cached_file(name, "config.json", local_files_only=local_only)
        if path is None:  # a folder without one: transformers answers None rather than raising
            raise FileNotFoundError(f"no config.json in {name}")
        return config_backbone(path, name)

    return _from_pretrained(name, read, weights=False)


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_weights(folder: Path) -> None:
    """Refuse a model folder whose weights are cut short, damaged or a pickle, naming the file.

    Every `*.safetensors` file's header is read (`safe_open` checks it covers the whole file,
    so a copy cut short is caught before any tensor is built); weights saved only as a pickle
    (`pytorch_model.bin`) are never unpickled: without this, the library loads the model with
    random weights and a table of missing keys.

    Args:
        folder: a model folder (`--model FOLDER`, an exported classifier).

    Raises:
        ModelUnavailableError: one line naming the file and the way out.
    """
    from safetensors import safe_open

    weights = sorted(folder.glob("*.safetensors"))
    for path in weights:
        try:
            with safe_open(str(regular_file(path, "model weights file")), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ModelUnavailableError(f"{path} is cut short or damaged ({str(err).splitlines()[0]}): delete it "
                                        f"and download or save the model again") from None
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
    if not weights and pickled:
        raise ModelUnavailableError(f"{folder} holds its weights as a pickle ({', '.join(pickled)}), which is "
                                    f"never loaded (unpickling runs code); delete it and save the model again "
                                    f"with save_pretrained (safetensors), or download it again")


def _from_pretrained(name: str, load: Callable[[str, bool], Any], weights: bool = True) -> Any:
    """`load(name, local_only)` from disk first, then from the hub only when it can answer.

    `weights`: the load reads the model's weights, so a folder's are checked first
    (`check_weights`); reading its config or processor alone (the family, the
    preprocessing) does not touch them, so that an unsupported model is said first.
    """
    is_folder = Path(name).is_dir()
    if not is_folder and Path(name).exists():
        raise ModelUnavailableError(f"model path {name!r} exists but is not a folder")
    if not is_folder and _looks_like_path(name):
        raise ModelUnavailableError(
            f"model folder {name!r} does not exist (from {os.getcwd()}): check the path, or give a "
            f"Hugging Face id such as {DEFAULT_MODEL}"
        )
    if is_folder and weights:
        check_weights(Path(name))
    try:
        return load(name, True)
    except SafetensorError as err:  # a hub cache's copy cut short: the folder check above covers --model FOLDER
        raise ModelUnavailableError(f"the weights of {name} are cut short or damaged ({err}): delete the model's "
                                    f"folder in the Hugging Face cache and download it again") from None
    except OSError as err:
        if is_folder:
            raise ModelUnavailableError(f"folder {name!r} does not hold a CLIP model: {err}") from err
        if _offline():
            raise _unavailable(name, "HF_HUB_OFFLINE is set") from err
        from huggingface_hub import constants

        ok, why = reachable(constants.ENDPOINT)
        if not ok:
            raise _unavailable(name, f"the Hugging Face hub is unreachable ({why})") from err
        return load(name, False)
