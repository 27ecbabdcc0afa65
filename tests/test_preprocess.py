"""Preprocessing against the processor's own pixels: every config, both paths, crop offsets, zero-shot."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from clip_utils.data import load_dataset, open_rgb
from clip_utils.model import preprocess
from clip_utils.model.clip import load_clip
from clip_utils.model.features import encode_paths
from clip_utils.model.preprocess import Preprocess, preprocess_tensors
from clip_utils.prompts import build_text_classifier

CROP = {"height": 21, "width": 17}
CONFIGS = {
    "shortest-edge+crop": dict(size={"shortest_edge": 24}, crop_size=CROP),
    "crop-larger-than-image": dict(size={"shortest_edge": 16}, crop_size=CROP),
    "squash": dict(size={"height": 24, "width": 19}, do_center_crop=False),
    "squash+crop": dict(size={"height": 24, "width": 19}, crop_size=CROP),
    "no-crop": dict(size={"shortest_edge": 24}, do_center_crop=False),
    "no-resize": dict(do_resize=False, crop_size={"height": 30, "width": 23}),
    "nearest": dict(size={"shortest_edge": 24}, crop_size=CROP, resample=0),
    "lanczos": dict(size={"shortest_edge": 24}, crop_size=CROP, resample=1),
    "bilinear": dict(size={"height": 24, "width": 19}, do_center_crop=False, resample=2),
    "box": dict(size={"shortest_edge": 24}, crop_size=CROP, resample=4),
    "hamming": dict(size={"height": 24, "width": 19}, do_center_crop=False, resample=5),
    "rescale-off": dict(size={"shortest_edge": 24}, crop_size=CROP, do_rescale=False),
    "normalize-off": dict(size={"shortest_edge": 24}, crop_size=CROP, do_normalize=False),
    "both-off": dict(size={"shortest_edge": 24}, crop_size=CROP, do_rescale=False, do_normalize=False),
    "other-scale": dict(size={"shortest_edge": 24}, crop_size=CROP, rescale_factor=1 / 127.5,
                        image_mean=[1.0, 1.0, 1.0], image_std=[1.0, 1.0, 1.0]),
}
# transformers' torchvision backend (`CLIPImageProcessor`) raises for box and hamming, which
# torch does not have; only the PIL backend takes them.
CASES = [(name, backend) for name in CONFIGS for backend in ("torchvision", "pil")
         if backend == "pil" or name not in ("box", "hamming")]
SIZES = [(37, 53), (64, 31), (101, 100), (1, 40), (40, 1), (13, 29), (31, 64)]


def _processor(name: str, backend: str):
    return (CLIPImageProcessor if backend == "torchvision" else CLIPImageProcessorPil)(**CONFIGS[name])


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _reference(ip, array: np.ndarray) -> torch.Tensor:
    return ip(images=Image.fromarray(array), return_tensors="pt")["pixel_values"][0].float()


def _levels(ours: torch.Tensor, theirs: torch.Tensor, pre: Preprocess) -> float:
    """The largest difference in uint8 levels, per channel: one level is `rescale / std`."""
    level = torch.full((3, 1, 1), pre.rescale or 1.0)
    if pre.normalize:
        level = level / torch.tensor(pre.std).view(3, 1, 1)
    return ((ours.float() - theirs) / level).abs().max().item()


@pytest.mark.parametrize(("name", "backend"), CASES)
def test_pil_path_matches_the_processor(name, backend):
    ip = _processor(name, backend)
    pre = Preprocess.from_processor(ip)
    for height, width in SIZES:
        array = _image(height, width)
        theirs = _reference(ip, array)
        ours = pre.transform()(Image.fromarray(array))
        assert ours.shape == theirs.shape, (height, width)
        assert _levels(ours, theirs, pre) <= 1, (height, width)


@pytest.mark.parametrize(("name", "backend"), CASES)
def test_tensor_path_matches_the_processor(name, backend):
    ip = _processor(name, backend)
    pre = Preprocess.from_processor(ip)
    for height, width in SIZES:
        array = _image(height, width)
        theirs = _reference(ip, array)
        # channels-last as the PIL fallback decoder hands it over, and contiguous as decode_jpeg
        hwc = torch.from_numpy(array).permute(2, 0, 1)
        for tensor in (hwc, hwc.contiguous()):
            ours = preprocess_tensors([tensor], pre, torch.float32)[0]
            assert ours.shape == theirs.shape, (height, width)
            # Measured on CPU: the same uint8 values as the processor (it runs the same
            # torchvision kernel, or PIL for the PIL backend); what remains is float32 rounding
            # of the PIL backend's unfused rescale-then-normalise, under 2e-5 of a level.
            assert _levels(ours, theirs, pre) < 1e-3, (height, width)


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize(("height", "width"), [(35, 39), (29, 30), (36, 27), (40, 32)])
def test_crop_offsets_are_the_processors(backend, height, width):
    """A one-pixel marker lands where the processor puts it, margins odd, even and negative."""
    ip = (CLIPImageProcessor if backend == "torchvision" else CLIPImageProcessorPil)(
        do_resize=False, crop_size={"height": 32, "width": 32}, do_rescale=False, do_normalize=False)
    pre = Preprocess.from_processor(ip)
    for row, col in [(1, 3), (height // 2, width // 2), (height - 2, width - 1)]:
        array = np.zeros((height, width, 3), dtype=np.uint8)
        array[row, col] = 255
        theirs = _reference(ip, array)
        assert torch.equal(pre.transform()(Image.fromarray(array)), theirs)
        assert torch.equal(preprocess_tensors([torch.from_numpy(array).permute(2, 0, 1)], pre, torch.float32)[0],
                           theirs)


def test_torchvision_center_crop_is_off_by_one_where_the_processor_is_not():
    """Margin 3 (and 7): torchvision rounds 1.5 to 2, transformers truncates to 1."""
    from torchvision.transforms.v2 import functional as TF

    ip = CLIPImageProcessor(do_resize=False, crop_size={"height": 32, "width": 32}, do_rescale=False,
                            do_normalize=False)
    array = np.zeros((35, 39, 3), dtype=np.uint8)
    array[1, 3] = 255  # the processor's crop starts at (1, 3)
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    assert _reference(ip, array)[:, 0, 0].tolist() == [255] * 3
    assert preprocess_tensors([tensor], Preprocess.from_processor(ip), torch.float32)[0, :, 0, 0].tolist() == [255] * 3
    assert TF.center_crop(tensor, [32, 32]).max() == 0


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_shortest_edge_size_truncates_the_long_side(backend):
    # 24 * 64 / 31 = 49.55: the processor makes 49, rounding would make 50.
    ip = (CLIPImageProcessor if backend == "torchvision" else CLIPImageProcessorPil)(
        size={"shortest_edge": 24}, do_center_crop=False)
    pre = Preprocess.from_processor(ip)
    for height, width in [(31, 64), (64, 31), (33, 50), (7, 10), (3, 200), (100, 101), (1, 5), (24, 24)]:
        array = _image(height, width)
        expected = tuple(_reference(ip, array).shape)
        assert tuple(pre.transform()(Image.fromarray(array)).shape) == expected
        assert tuple(preprocess_tensors([torch.from_numpy(array).permute(2, 0, 1)], pre, torch.float32)[0].shape) \
            == expected
    assert tuple(pre.transform()(Image.fromarray(_image(31, 64))).shape) == (3, 24, 49)


def test_from_processor_reads_every_setting():
    from torchvision.transforms import InterpolationMode

    pre = Preprocess.from_processor(CLIPImageProcessor(
        size={"height": 40, "width": 30}, do_center_crop=False, do_rescale=False, do_normalize=False, resample=5,
        image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]))
    assert (pre.resize, pre.crop, pre.size, pre.rescale, pre.normalize) == ((40, 30), None, (40, 30), None, False)
    assert (pre.interpolation, pre.mean, pre.std, pre.backend) == (5, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "torchvision")
    for code in range(6):
        assert Preprocess.from_processor(CLIPImageProcessorPil(resample=code)).interpolation == code
    assert Preprocess.from_processor(CLIPImageProcessor(resample=InterpolationMode.LANCZOS)).interpolation == 1
    assert Preprocess.from_processor(CLIPImageProcessorPil()).backend == "pil"
    # the cache key: every field, JSON-able
    assert set(pre.as_dict()) == {f.name for f in fields(Preprocess)}
    assert json.loads(json.dumps(pre.as_dict())) == pre.as_dict()
    with pytest.raises(ValueError, match="longest_edge"):
        Preprocess.from_processor(CLIPImageProcessor(size={"shortest_edge": 24, "longest_edge": 40}))


def test_normalisation_constants_are_made_once_per_device():
    pre = Preprocess.from_processor(CLIPImageProcessor(**CONFIGS["shortest-edge+crop"]))
    images = [torch.from_numpy(_image(37, 53)).permute(2, 0, 1)]
    preprocess._normalisation_constants.cache_clear()
    for _ in range(3):
        preprocess_tensors(images, pre, torch.float16)
        pre.transform()(Image.fromarray(_image(20, 30)))
    assert preprocess._normalisation_constants.cache_info().misses == 1


@pytest.mark.parametrize("name", ["shortest-edge+crop", "squash", "nearest", "box", "lanczos"])
def test_augmentation_gives_the_model_input_size(name):
    pre = Preprocess.from_processor(CLIPImageProcessorPil(**CONFIGS[name]))
    torch.manual_seed(0)
    array = _image(37, 53)
    assert tuple(pre.transform(augment=True)(Image.fromarray(array)).shape) == (3, *pre.size)
    batch = preprocess_tensors([torch.from_numpy(array).permute(2, 0, 1)] * 2, pre, torch.float32, augment=True)
    assert tuple(batch.shape) == (2, 3, *pre.size)


def test_augmentation_refuses_a_preprocessing_without_a_fixed_size():
    pre = Preprocess.from_processor(CLIPImageProcessor(**CONFIGS["no-crop"]))
    with pytest.raises(ValueError, match="fixed input size"):
        pre.transform(augment=True)


# --------------------------------------------------------------------------- end to end


def _model_with_image_config(kit, tmp_path, **changes):
    folder = tmp_path / "model"
    shutil.copytree(kit["model"], folder)
    path = folder / "processor_config.json"  # transformers 5 saves the image processor in here
    config = json.loads(path.read_text())
    config["image_processor"].update(changes)
    path.write_text(json.dumps(config, indent=1))
    return folder


@torch.inference_mode()
def _reference_embeddings(folder, paths: list[str]) -> torch.Tensor:
    """The textbook loop: `CLIPProcessor` on PIL images, then `get_image_features`."""
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    chunks = []
    for i in range(0, len(paths), 64):
        pixels = processor(images=[open_rgb(p) for p in paths[i : i + 64]], return_tensors="pt")["pixel_values"]
        chunks.append(model.get_image_features(pixel_values=pixels).pooler_output)
    return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)


@pytest.mark.parametrize("changes", [
    # squash straight to the 32 px input, no crop
    dict(size={"height": 32, "width": 32}, do_center_crop=False),
    # squash then crop 32 px with margins 3 and 7, where torchvision's centre crop is off by one
    dict(size={"height": 35, "width": 39}, crop_size={"height": 32, "width": 32}, resample=2),
], ids=["squash-no-crop", "squash-odd-crop"])
def test_zero_shot_predictions_agree_with_the_processor(kit, tmp_path, changes):
    folder = _model_with_image_config(kit, tmp_path, **changes)
    clip = load_clip(folder)
    assert clip.preprocess.resize == (changes["size"]["height"], changes["size"]["width"])
    dataset = load_dataset("flowers102", kit["data"], "test")
    paths = [p for p, _ in dataset.samples[::20]]  # 308 images over all 102 classes
    classifier = build_text_classifier(clip.model, clip.tokenizer, dataset.classes, ["a photo of a {}."], "cpu",
                                       progress=False)
    reference = _reference_embeddings(folder, paths)
    for fast in (True, False):
        ours = encode_paths(clip.model, paths, clip.preprocess, "cpu", batch_size=128, num_workers=0, fast=fast,
                            desc=None)
        agree = ((ours @ classifier).argmax(1) == (reference @ classifier).argmax(1)).float().mean().item()
        assert agree >= 0.995, (fast, agree)
    # the PIL path decodes like the reference, so its embeddings are the same up to float rounding
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
