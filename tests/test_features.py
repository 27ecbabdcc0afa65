"""The device-decode input path against the portable PIL path, on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clip_utils.data import UnreadableImageError, load_dataset
from clip_utils.model.features import encode_paths
from clip_utils.model.inputs import decode_batch
from clip_utils.model.preprocess import Preprocess, preprocess_tensors


def test_fast_path_predictions_agree_with_pil_path(tiny_clip, kit):
    model, processor = tiny_clip
    pre = Preprocess.from_processor(processor)
    paths = [p for p, _ in load_dataset("flowers102", kit["data"], "val").samples]
    slow = encode_paths(model, paths, pre, "cpu", batch_size=128, num_workers=0, fast=False, desc=None)
    fast = encode_paths(model, paths, pre, "cpu", batch_size=128, num_workers=0, fast=True, desc=None)
    assert (slow * fast).sum(-1).min() > 0.99  # cosine similarity per image
    # predictions against random class directions: the 99% agreement the issue asks for
    g = torch.Generator().manual_seed(0)
    classes = torch.nn.functional.normalize(torch.randn(slow.shape[1], 102, generator=g), dim=0)
    agree = ((slow @ classes).argmax(1) == (fast @ classes).argmax(1)).float().mean()
    assert agree >= 0.99


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_decode_batch_handles_png_gray_and_cmyk(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    blobs = [
        _encoded(rgb, "JPEG"),
        _encoded(rgb, "PNG"),
        _encoded(rgb.convert("L"), "JPEG"),
        _encoded(rgb.convert("CMYK"), "JPEG"),
        _encoded(rgb.convert("RGBA"), "PNG"),
    ]
    images = decode_batch(blobs, [f"img{i}" for i in range(len(blobs))], torch.device("cpu"))
    assert [tuple(im.shape) for im in images] == [(3, 30, 40)] * len(blobs)
    assert all(im.dtype == torch.uint8 for im in images)
    # PNG is lossless: decoded pixels equal the original
    assert torch.equal(images[1], torch.from_numpy(np.array(rgb)).permute(2, 0, 1))


def test_decode_batch_names_an_unreadable_file():
    with pytest.raises(UnreadableImageError, match=r"broken\.jpg: not an image file Pillow can open; re-download"):
        decode_batch([b"\xff\xd8\xff garbage"], ["broken.jpg"], torch.device("cpu"))


def test_preprocess_tensors_matches_the_pil_transform(tiny_clip):
    _, processor = tiny_clip
    pre = Preprocess.from_processor(processor)
    photo = Image.open("my_photo/flower.png").convert("RGB")
    ours = preprocess_tensors([torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1)], pre, torch.float32)[0]
    reference = pre.transform()(photo)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().mean() < 0.02


@pytest.mark.parametrize("threads", [0, 3])
def test_file_bytes_come_back_in_order_and_in_batches(tmp_path, threads):
    from clip_utils.model.inputs import iter_file_bytes

    paths = []
    for i in range(11):
        (tmp_path / f"f{i}").write_bytes(bytes([i]) * (i + 1))
        paths.append(str(tmp_path / f"f{i}"))
    batches = list(iter_file_bytes(paths, batch_size=4, threads=threads, prefetch=1))
    assert [len(b) for b in batches] == [4, 4, 3]
    assert [blob for batch in batches for blob in batch] == [bytes([i]) * (i + 1) for i in range(11)]


def test_a_missing_file_is_named(tmp_path):
    from clip_utils.model.inputs import iter_file_bytes

    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        list(iter_file_bytes([str(tmp_path / "gone.jpg")], batch_size=2, threads=2))


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_a_damaged_feature_cache_is_removed_and_encoded_again(kit, tmp_path, damage):
    from clip_utils.lab import Lab

    def lab():  # a new lab each time: nothing in memory, only the disk cache
        return Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path, device="cpu",
                   num_workers=0, download=False)

    clean = lab().features("cub200", "val").embeddings
    (file,) = lab().cache_dir.glob("cub200-val-*.safetensors")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-16] + bytes(16))
    with pytest.warns(UserWarning, match=f"feature cache {file} is damaged .*removed, encoding again"):
        again = lab().features("cub200", "val")
    assert not again.encoding["from_cache"] and torch.equal(again.embeddings, clean)
    assert lab().features("cub200", "val").encoding["from_cache"]  # the new file is good
