"""Loading CLIP, its preprocessing, and the vision-tower-plus-head classifier.

    from clip_utils.models import load_clip
    model, processor = load_clip("openai/clip-vit-large-patch14", device="cuda")

Any Hugging Face CLIP id or local folder works. Loading never waits on a network that is
not there: a model that is neither a folder nor in the local cache is fetched only after a
quick reachability check, and `HF_HUB_OFFLINE=1` is honoured, so an offline machine gets a
`ModelUnavailableError` naming the model within seconds instead of minutes of retries.

Preprocessing always comes from the model's own processor configuration (resize, crop,
mean, std), never from constants: the tiny test model and ViT-L/14 differ in all four.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .net import reachable

DEFAULT_MODEL = "openai/clip-vit-large-patch14"


class ModelUnavailableError(RuntimeError):
    """The model is not on disk and cannot be downloaded now."""


def _offline() -> bool:
    from .params import TRUE

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE


def _unavailable(name: str, why: str) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"cannot load model {name!r}: {why}. It is not in the local Hugging Face cache. "
        f"Run once with network access to download it (about 1.7 GB for ViT-L/14), point "
        f"CLIP_MODEL / --model at a local folder holding it, or try the whole pipeline offline "
        f"on the bundled tiny model with `make demo`."
    )


def load_clip(
    name_or_path: str | Path = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
):
    """Load a CLIP model and its processor, failing fast when it cannot be fetched.

    Args:
        name_or_path: Hugging Face model id or a local folder saved with `save_pretrained`.
        device: where to put the model.
        dtype: parameter dtype (None keeps the checkpoint's, float32 for OpenAI CLIP).

    Returns:
        `(CLIPModel in eval mode, CLIPProcessor)`.

    Raises:
        ModelUnavailableError: not on disk and the hub cannot be reached (or offline mode).
    """
    from transformers import CLIPModel, CLIPProcessor

    name = str(name_or_path)
    is_folder = Path(name).is_dir()
    if not is_folder and Path(name).exists():
        raise ModelUnavailableError(f"model path {name!r} exists but is not a folder")

    def _load(local_only: bool):
        kwargs = {"local_files_only": local_only}
        model = CLIPModel.from_pretrained(name, dtype=dtype, **kwargs)
        processor = CLIPProcessor.from_pretrained(name, **kwargs)
        return model, processor

    try:
        model, processor = _load(local_only=True)
    except OSError as err:
        if is_folder:
            raise ModelUnavailableError(f"folder {name!r} does not hold a CLIP model: {err}") from err
        if _offline():
            raise _unavailable(name, "HF_HUB_OFFLINE is set") from err
        from huggingface_hub import constants

        ok, why = reachable(constants.ENDPOINT)
        if not ok:
            raise _unavailable(name, f"the Hugging Face hub is unreachable ({why})") from err
        model, processor = _load(local_only=False)
    return model.to(device).eval(), processor


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocess:
    """The image preprocessing a CLIP checkpoint expects, read from its processor config.

    Attributes:
        resize: shortest-edge size before cropping.
        crop: (height, width) of the centre crop.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        interpolation: PIL resample code (3 = bicubic for CLIP).
    """

    resize: int
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: int = 3

    @classmethod
    def from_processor(cls, processor) -> Preprocess:
        """Read the preprocessing of a `CLIPProcessor` or `CLIPImageProcessor`."""
        ip = getattr(processor, "image_processor", processor)
        size = ip.size
        resize = size.get("shortest_edge") or min(size.get("height", 0), size.get("width", 0))
        crop = ip.crop_size if getattr(ip, "do_center_crop", True) else size
        resample = getattr(ip, "resample", 3)
        return cls(
            resize=int(resize),
            crop=(int(crop["height"]), int(crop["width"])),
            mean=tuple(float(v) for v in ip.image_mean),
            std=tuple(float(v) for v in ip.image_std),
            interpolation=int(getattr(resample, "value", resample)),
        )

    def as_dict(self) -> dict:
        return {
            "resize": self.resize,
            "crop": list(self.crop),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    def transform(self, augment: bool = False):
        """A torchvision transform from RGB PIL image to a normalised tensor.

        Args:
            augment: training augmentation (random resized crop and horizontal flip)
                instead of resize plus centre crop.
        """
        from torchvision import transforms as T

        interp = T.InterpolationMode.BICUBIC if self.interpolation == 3 else T.InterpolationMode.BILINEAR
        if augment:
            geometry = [
                T.RandomResizedCrop(self.crop, scale=(0.6, 1.0), interpolation=interp),
                T.RandomHorizontalFlip(),
            ]
        else:
            geometry = [T.Resize(self.resize, interpolation=interp), T.CenterCrop(self.crop)]
        return T.Compose([*geometry, T.ToTensor(), T.Normalize(self.mean, self.std)])


# --------------------------------------------------------------------------- image encoder


def image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised CLIP image embeddings (vision tower, then projection).

    Args:
        model: a `CLIPModel` (or anything with `vision_model` and `visual_projection`).
        pixel_values: `(B, 3, H, W)` preprocessed images.
    """
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    return F.normalize(model.visual_projection(pooled), dim=-1)


class ClipClassifier(nn.Module):
    """CLIP's vision tower and projection with a linear head on the normalised embedding.

    The same head serves the linear probe (trained on cached embeddings) and LoRA (trained
    through the adapted tower), so a probe and a LoRA model are scored identically.

    Args:
        vision_model: CLIP vision transformer (possibly wrapped by peft).
        visual_projection: CLIP's image projection.
        head: linear layer from the projection dimension to the classes; float32 even beside
            an fp16 encoder (the embedding is cast to the head's dtype).
    """

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.head = head

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return image_embeddings(self, pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeddings = self.embed(pixel_values)
        # The head runs in its own dtype even under autocast: bf16 logits (8-bit mantissa)
        # would flip close calls between classes, and this matmul is too small to gain.
        with torch.autocast(embeddings.device.type, enabled=False):
            return self.head(embeddings.to(self.head.weight.dtype))


def zeroshot_head(text_classifier: torch.Tensor, logit_scale: float) -> nn.Linear:
    """A linear head initialised to the zero-shot classifier.

    Starting from the text embeddings (times CLIP's logit scale) means training begins at
    zero-shot accuracy instead of chance, which converges faster and generalises better on
    the few examples per class these datasets have.

    Args:
        text_classifier: `(D, C)` normalised class embeddings.
        logit_scale: CLIP's learned temperature (exp of `model.logit_scale`).
    """
    dim, n_classes = text_classifier.shape
    head = nn.Linear(dim, n_classes)
    with torch.no_grad():
        head.weight.copy_(text_classifier.T.float() * logit_scale)
        head.bias.zero_()
    return head


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
