"""The image preprocessing a CLIP checkpoint expects, on PIL images and on device tensors.

    pre = Preprocess.from_processor(processor)     # read from the processor config, never constants
    tensor = pre.transform()(pil_image)            # the portable (PIL) path
    batch = preprocess_tensors(uint8_images, pre, torch.float16)   # the fast path, on the GPU

Both paths give the pixels of the processor itself, `processor(images=...)["pixel_values"]`,
for every config it takes: shortest-edge resize or a (height, width) squash, or none; a
centre crop or none; rescale and normalise on or off; any of PIL's six filters. In
transformers 5 `CLIPImageProcessor` resizes uint8 tensors with torchvision (antialiased),
so both paths do the same, the PIL path after converting the decoded image to a tensor.
Box and hamming exist only in PIL, and `CLIPImageProcessorPil` resizes everything with
PIL: those resize through PIL (on the CPU). The tiny test model and ViT-L/14 differ in
size, crop, mean and std, so nothing here hard-codes 224 or CLIP's mean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache, partial

import torch
from PIL import Image

from clip_utils.errors import InvalidValue

# PIL resample codes, as processor configs store them, to torchvision's tensor filters, as
# transformers maps them (nearest is PIL's pixel-centre nearest, torchvision's "nearest-exact").
_TENSOR_FILTERS = {0: "nearest-exact", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
_PIL_ONLY_FILTERS = (4, 5)  # box, hamming
_PIL_CODES = {**{v: k for k, v in _TENSOR_FILTERS.items()}, "box": 4, "hamming": 5}


@dataclass(frozen=True)
class Preprocess:
    """The image preprocessing a CLIP checkpoint expects, read from its processor config.

    Attributes:
        resize: shortest-edge size (int), `(height, width)` to squash to, or None (no resize).
        crop: `(height, width)` of the centre crop, or None (no crop).
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        interpolation: PIL resample code (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box,
            5 hamming).
        rescale: factor applied to the uint8 values (1/255), or None (no rescale).
        normalize: subtract `mean` and divide by `std`.
        backend: the processor's resize backend, "torchvision" or "pil" (`CLIPImageProcessorPil`).
    """

    resize: int | tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: int = 3
    rescale: float | None = 1 / 255
    normalize: bool = True
    backend: str = "torchvision"

    @classmethod
    def from_processor(cls, processor) -> Preprocess:
        """Read the preprocessing of a `CLIPProcessor` or a CLIP image processor.

        Raises:
            ValueError: a size, filter or backend the processor accepts but this module does
                not reproduce (e.g. `longest_edge`), rather than preprocessing differently.
        """
        ip = getattr(processor, "image_processor", processor)
        size, crop = ip.size, ip.crop_size
        if not ip.do_resize:
            resize = None
        elif size.get("shortest_edge") and not size.get("longest_edge"):
            resize = int(size["shortest_edge"])
        elif size.get("height") and size.get("width") and not size.get("shortest_edge"):
            resize = (int(size["height"]), int(size["width"]))
        else:
            raise InvalidValue(f"unsupported resize size {dict(size)}: need shortest_edge or height and width")
        backend = getattr(ip, "backend", "torchvision")
        if backend not in ("torchvision", "pil"):
            raise InvalidValue(f"unsupported image processor backend {backend!r}")
        return cls(
            resize=resize,
            crop=(int(crop["height"]), int(crop["width"])) if ip.do_center_crop else None,
            mean=tuple(float(v) for v in ip.image_mean),
            std=tuple(float(v) for v in ip.image_std),
            interpolation=_pil_code(ip.resample),
            rescale=float(ip.rescale_factor) if ip.do_rescale else None,
            normalize=bool(ip.do_normalize),
            backend=backend,
        )

    @property
    def size(self) -> tuple[int, int] | None:
        """`(height, width)` of every output; None where it follows the image (no crop, no squash)."""
        return self.crop or (self.resize if isinstance(self.resize, tuple) else None)

    def as_dict(self) -> dict:
        """Every field, JSON-able (part of the feature cache key)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def transform(self, augment: bool = False):
        """A transform from RGB PIL image to a preprocessed `(3, H, W)` float32 tensor.

        Args:
            augment: training augmentation (`augment_geometry`) instead of the processor's
                resize and crop.
        """
        from torchvision import transforms as T

        geometry = [T.PILToTensor(), *augment_geometry(self)] if augment else [partial(_resize_and_crop, pre=self)]
        return T.Compose([*geometry, partial(_normalize, pre=self, dtype=torch.float32)])


def _pil_code(resample) -> int:
    # Configs store PIL codes; a processor built in code may hold a torchvision mode instead.
    value = getattr(resample, "value", resample)
    code = 2 if value is None else _PIL_CODES.get(value, value)  # None: both backends use bilinear
    if not isinstance(code, int) or not 0 <= code <= 5:
        raise InvalidValue(f"unsupported resample {resample!r}")
    return code


def _output_size(pre: Preprocess, height: int, width: int) -> tuple[int, int]:
    if isinstance(pre.resize, tuple):
        return pre.resize
    # As transformers' get_resize_output_image_size: the long side is truncated, not rounded.
    if width <= height:
        return int(pre.resize * height / width), pre.resize
    return pre.resize, int(pre.resize * width / height)


def _resize(img: Image.Image | torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """Resize a PIL image or `(3, H, W)` uint8 tensor as the processor does; a uint8 tensor."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    height, width = TF.get_size(img)
    size = _output_size(pre, height, width)
    if pre.backend == "pil" or pre.interpolation in _PIL_ONLY_FILTERS:
        pil = img if isinstance(img, Image.Image) else TF.to_pil_image(img.cpu())
        out = TF.pil_to_tensor(pil.resize(size[::-1], resample=pre.interpolation))
        return out if isinstance(img, Image.Image) else out.to(img.device)
    tensor = TF.pil_to_tensor(img) if isinstance(img, Image.Image) else img
    mode = InterpolationMode(_TENSOR_FILTERS[pre.interpolation])
    if mode == InterpolationMode.LANCZOS and tensor.device.type != "cpu":
        # torch has lanczos on the CPU only; transformers falls back to bicubic elsewhere,
        # which would no longer be the processor's (CPU) pixels.
        return TF.resize(tensor.cpu(), list(size), interpolation=mode, antialias=True).to(tensor.device)
    return TF.resize(tensor, list(size), interpolation=mode, antialias=True)


def _center_crop(img: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    (height, width), (crop_h, crop_w) = img.shape[-2:], pre.crop
    # transformers starts the crop at half the margin truncated, torchvision's center_crop
    # rounds it (half to even: one pixel further when the margin is 3 mod 4). An image
    # smaller than the crop is zero-padded (`crop` pads outside the image); the two backends
    # put the odd padding row on opposite sides, hence trunc against floor.
    if pre.backend == "pil":
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
    else:
        top, left = int((height - crop_h) / 2), int((width - crop_w) / 2)
    return TF.crop(img, top, left, crop_h, crop_w)


def _resize_and_crop(img: Image.Image | torch.Tensor, pre: Preprocess) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    if pre.resize is not None:
        img = _resize(img, pre)
    elif isinstance(img, Image.Image):
        img = TF.pil_to_tensor(img)
    return _center_crop(img, pre) if pre.crop is not None else img


@lru_cache(maxsize=32)
def _normalisation_constants(pre: Preprocess, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made on the device once per (preprocessing, device), not copied from the host per batch.
    # Rescale is fused into mean and std, as transformers' torchvision backend does, so the
    # floats are that processor's to the last bit.
    scale = 1.0 if pre.rescale is None else 1.0 / pre.rescale
    with torch.inference_mode(False):  # first made while encoding, later reused by training
        mean = (torch.tensor(pre.mean, device=device) * scale).view(-1, 1, 1)
        std = (torch.tensor(pre.std, device=device) * scale).view(-1, 1, 1)
    return mean, std


def _normalize(pixels: torch.Tensor, pre: Preprocess, dtype: torch.dtype) -> torch.Tensor:
    """Rescale and normalise uint8 pixels (`(3, H, W)` or `(B, 3, H, W)`) to `dtype`."""
    if pre.normalize:
        mean, std = _normalisation_constants(pre, pixels.device)
        return pixels.to(torch.float32).sub_(mean).div_(std).to(dtype)
    if pre.rescale is not None:
        return (pixels.to(torch.float32) * pre.rescale).to(dtype)
    return pixels.to(dtype)


def augment_geometry(pre: Preprocess) -> list:
    """The random geometric transforms of `pre.transform(augment=True)` (crop, flip).

    They act on uint8 tensors on any device, so the device path and the portable path
    augment alike. The crop is resized to `pre.size`, the model's input size; the filter is
    the processor's where torch has it on every device, else bicubic (augmentation need not
    match the processor).

    Raises:
        ValueError: `pre` has no fixed output size (no crop, no squash).
    """
    from torchvision import transforms as T

    if pre.size is None:
        raise InvalidValue("augmentation needs a fixed input size: the processor neither crops nor squashes")
    mode = _TENSOR_FILTERS.get(pre.interpolation, "bicubic")
    mode = T.InterpolationMode("bicubic" if mode == "lanczos" else mode)
    return [
        T.RandomResizedCrop(pre.size, scale=(0.6, 1.0), interpolation=mode, antialias=True),
        T.RandomHorizontalFlip(),
    ]


def preprocess_tensors(
    images: list[torch.Tensor], pre: Preprocess, dtype: torch.dtype, augment: bool = False
) -> torch.Tensor:
    """Resize, crop and normalise uint8 images as the processor does, where they are.

    On the CPU the pixels are the processor's. On CUDA torchvision resizes uint8 through
    float32 instead of the CPU's uint8 kernel; that float path, run on the CPU, lands within
    one level of it on smooth images (bilinear, bicubic) and up to 5 levels off on pure noise.

    Args:
        images: `(3, H, W)` uint8 tensors, any sizes, on the target device.
        pre: the model's preprocessing. Its filter runs on the images' device, except
            lanczos (CPU-only in torch) and PIL-only resizes (box, hamming, a PIL-backend
            processor), which copy each image to the CPU and back.
        dtype: output dtype.
        augment: random resized crop and flip (training) instead of resize and centre crop;
            random numbers come from torch's global generator, so a seeded run repeats.
    """
    geometry = augment_geometry(pre) if augment else [partial(_resize_and_crop, pre=pre)]
    out = []
    for img in images:
        for t in geometry:
            img = t(img)
        out.append(img)
    return _normalize(torch.stack(out), pre, dtype)
