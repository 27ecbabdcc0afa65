"""The image preprocessing a CLIP checkpoint expects, on PIL images and on device tensors.

    pre = Preprocess.from_processor(processor)     # read from the processor config, never constants
    tensor = pre.transform()(pil_image)            # the portable (PIL) path
    batch = preprocess_tensors(uint8_images, pre, torch.float16)   # the fast path, on the GPU

The tiny test model and ViT-L/14 differ in size, crop, mean and std, so nothing here
hard-codes 224 or CLIP's mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
