"""Custom photos: every odd or broken file is either read as a person sees it or refused clearly."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_utils.app import photos
from clip_utils.app.cli import main
from clip_utils.app.photos import PhotoError, format_predictions, load_photo, predict_photos
from clip_utils.data import class_names, dataset_spec
from clip_utils.lab import Lab

ROOT = Path(__file__).resolve().parents[1]
FLOWER = ROOT / "my_photo" / "flower.png"


# --------------------------------------------------------------------------- refused, clearly


def test_missing_path(tmp_path):
    with pytest.raises(PhotoError, match=r"photo not found: .*nope\.jpg"):
        load_photo(tmp_path / "nope.jpg")


def test_folder(tmp_path):
    with pytest.raises(PhotoError, match="is a folder, not a photo.*image files inside"):
        load_photo(tmp_path)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("shopping list: milk, eggs")
    with pytest.raises(PhotoError, match=r"cannot read .*notes\.jpg: not an image"):
        load_photo(path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image(tmp_path, fmt):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(buffer, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(PhotoError, match=rf"cut\.{fmt.lower()}.*truncated or corrupt"):
        load_photo(path)


def _png_claiming_size(path, width, height):
    # A valid 1x1 PNG whose header claims another size: Pillow sees the size without
    # decoding anything, which is how a decompression bomb looks.
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # chunk type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


def test_absurdly_large_image_is_refused_without_decoding(tmp_path):
    path = tmp_path / "huge.png"
    _png_claiming_size(path, 100_000, 100_000)  # 10 gigapixels, 30 GB as RGB
    start = time.perf_counter()
    with pytest.raises(PhotoError, match=r"huge\.png is too large to decode safely.*MAX_IMAGE_PIXELS"):
        load_photo(path)
    assert time.perf_counter() - start < 2


# --------------------------------------------------------------------------- read as people see them


def test_large_phone_jpeg_is_decoded_reduced_and_upright(tmp_path):
    # 4000 x 3000 landscape pixels, stored sideways with EXIF orientation 6 (rotate 90 CW),
    # as phones save portrait photos: red on the left half, blue on the right.
    pixels = np.zeros((3000, 4000, 3), dtype=np.uint8)
    pixels[:, :2000] = (220, 20, 20)
    pixels[:, 2000:] = (20, 20, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "IMG_0001.jpg"
    Image.fromarray(pixels).save(path, quality=85, exif=exif)
    img = load_photo(path)
    assert img.mode == "RGB"
    width, height = img.size
    assert height > width  # upright: portrait
    assert min(img.size) >= photos.DECODE_SIZE and max(img.size) < 4000  # decoded at reduced scale
    top, bottom = np.asarray(img)[5, width // 2], np.asarray(img)[-5, width // 2]
    assert top[0] > 150 and top[2] < 100  # the left (red) half is now on top
    assert bottom[2] > 150 and bottom[0] < 100


def test_transparent_png_is_composited_on_white(tmp_path):
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)  # fully transparent black ...
    rgba[5:15, 5:15] = (200, 30, 30, 255)          # ... around an opaque red square
    rgba[0, 0] = (0, 0, 255, 128)                  # one half-transparent blue pixel
    path = tmp_path / "sticker.png"
    Image.fromarray(rgba, "RGBA").save(path)
    img = np.asarray(load_photo(path))
    assert tuple(img[10, 10]) == (200, 30, 30)
    assert tuple(img[19, 19]) == (255, 255, 255)
    assert tuple(img[0, 0]) == pytest.approx((127, 127, 255), abs=2)


def test_greyscale_with_alpha(tmp_path):
    la = Image.new("LA", (8, 8), (40, 0))
    la.putpixel((0, 0), (40, 255))
    path = tmp_path / "la.png"
    la.save(path)
    img = np.asarray(load_photo(path))
    assert tuple(img[0, 0]) == (40, 40, 40) and tuple(img[4, 4]) == (255, 255, 255)


def test_palette_with_transparent_colour(tmp_path):
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    p.putpixel((3, 3), 1)
    path = tmp_path / "icon.gif"
    p.save(path, transparency=0)
    img = np.asarray(load_photo(path))
    assert tuple(img[3, 3]) == (10, 200, 10) and tuple(img[0, 0]) == (255, 255, 255)


def test_palette_without_transparency(tmp_path):
    path = tmp_path / "palette.png"
    Image.new("RGB", (8, 8), (10, 120, 250)).convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    assert tuple(np.asarray(load_photo(path))[2, 2]) == pytest.approx((10, 120, 250), abs=3)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 16).reshape(16, 64).astype(np.uint16)
    path = tmp_path / "scan16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    img = np.asarray(load_photo(path)).astype(int)
    assert img.shape == (16, 64, 3)
    assert img[0, 0, 0] == 0 and img[-1, -1, 0] == 255
    middle = ramp.flat[ramp.size // 2] / 257
    assert img.reshape(-1, 3)[ramp.size // 2, 0] == pytest.approx(middle, abs=1)


def test_thirty_two_bit_integer_tiff(tmp_path):
    values = np.array([[0, 1000, 65535]], dtype=np.int32)
    path = tmp_path / "depth.tif"
    Image.fromarray(values, "I").save(path)
    img = np.asarray(load_photo(path))[0, :, 0]
    assert list(img) == [0, round(1000 / 257), 255]


def test_greyscale_jpeg(tmp_path):
    path = tmp_path / "bw.jpg"
    Image.new("L", (16, 16), 90).save(path)
    img = load_photo(path)
    assert img.mode == "RGB" and tuple(np.asarray(img)[8, 8]) == pytest.approx((90, 90, 90), abs=2)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(path)  # pure cyan ink
    r, g, b = np.asarray(load_photo(path))[8, 8]
    assert r < 40 and g > 200 and b > 200


def test_the_bundled_photos_load(tmp_path):
    for path in sorted((ROOT / "my_photo").iterdir()):
        img = load_photo(path)
        assert img.mode == "RGB" and min(img.size) > 100


# --------------------------------------------------------------------------- predictions


@pytest.fixture(scope="module")
def lab(kit, tmp_path_factory):
    return Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path_factory.mktemp("photos"),
               device="cpu", num_workers=0)


def test_one_bad_photo_does_not_stop_the_others(lab, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    results = predict_photos(lab, [FLOWER, bad, tmp_path / "missing.jpg", FLOWER], "flowers102", top_k=5,
                             prompt_set="default")
    assert [r["photo"] for r in results] == [str(FLOWER), str(bad), str(tmp_path / "missing.jpg"), str(FLOWER)]
    assert "error" in results[1] and "bad.png" in results[1]["error"]
    assert "not found" in results[2]["error"]
    names = lab.class_names("flowers102")
    for r in (results[0], results[3]):
        top = r["top_k"]
        assert len(top) == 5
        probs = [t["prob"] for t in top]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(t["name"] == names[t["label"]] for t in top)
    assert results[0]["top_k"] == results[3]["top_k"]  # deterministic
    text = format_predictions(results)
    assert str(FLOWER) in text and "error:" in text and "%" in text


def test_top_k_is_clamped_to_the_classes(lab):
    (result,) = predict_photos(lab, [FLOWER], "cub200", top_k=500, prompt_set="domain")
    assert len(result["top_k"]) == 20  # the kit's CUB has 20 classes
    assert sum(t["prob"] for t in result["top_k"]) == pytest.approx(1, abs=1e-4)


def test_prediction_matches_the_zeroshot_pipeline(lab):
    # The photo path (ClipClassifier with a zero-shot head) scores like the dataset path
    # (cached embeddings @ text classifier): same model, same preprocessing.
    from clip_utils import prompts
    from clip_utils.model.heads import image_embeddings

    model, processor = lab.clip().model, lab.clip().processor
    names = lab.class_names("cub200")
    W = prompts.build_text_classifier(model, processor.tokenizer, names, prompts.prompt_sets(dataset_spec("cub200"))["domain"], "cpu")
    with torch.no_grad():
        embedding = image_embeddings(model, lab.preprocess.transform()(load_photo(FLOWER))[None])
    probs = prompts.zeroshot_logits(embedding, W, lab.clip().logit_scale).softmax(-1)[0]
    (result,) = predict_photos(lab, [FLOWER], "cub200", top_k=3, prompt_set="domain")
    assert [t["label"] for t in result["top_k"]] == probs.topk(3).indices.tolist()
    assert [t["prob"] for t in result["top_k"]] == pytest.approx(probs.topk(3).values.tolist(), abs=1e-5)


def test_bad_arguments(lab):
    with pytest.raises(ValueError, match="unknown prompt set 'nice'"):
        predict_photos(lab, [FLOWER], "flowers102", prompt_set="nice")
    with pytest.raises(ValueError, match="unknown method"):
        predict_photos(lab, [FLOWER], "flowers102", method="magic")
    with pytest.raises(ValueError, match="top_k"):
        predict_photos(lab, [FLOWER], "flowers102", top_k=0)


def test_photo_figures(lab, tmp_path):
    results = [{"photo": str(FLOWER), "top_k": [{"label": 0, "name": "pink primrose", "prob": 0.7},
                                                {"label": 1, "name": "hard-leaved pocket orchid", "prob": 0.2}]},
               {"photo": "gone.jpg", "error": "photo not found: gone.jpg"}]
    figures = photos.photo_figures(results, "flowers102", "probe", folder=tmp_path)
    assert len(figures) == 1
    (png,) = tmp_path.glob("photo_*.png")
    # the method by its canonical name, as in every results folder; the title by its label
    assert png.name == "photo_flower_png_flowers102_linear_probe.png" and png.stat().st_size > 5_000
    assert figures[0]._suptitle.get_text() == "flower.png (flowers102, linear probe)"


# --------------------------------------------------------------------------- command line


def _common(kit, tmp_path):
    return ["--dataset", "flowers102", "--model", str(kit["model"]), "--data-root", str(kit["data"]),
            "--results-dir", str(tmp_path), "--device", "cpu"]


def test_cli_predict_json_and_errors(kit, tmp_path, capsys):
    code = main(["predict", str(FLOWER), str(tmp_path / "gone.jpg"), "--json", "--top-k", "3", *_common(kit, tmp_path)])
    results = json.loads(capsys.readouterr().out)
    assert code == 1  # one of the two photos failed: a script must be able to tell
    assert len(results[0]["top_k"]) == 3 and set(results[0]["top_k"][0]) == {"label", "name", "prob"}
    assert set(results[1]) == {"photo", "error"} and results[1]["photo"] == str(tmp_path / "gone.jpg")
    assert results[1]["error"].startswith(f"photo not found: {tmp_path / 'gone.jpg'}")
    assert main(["predict", str(tmp_path), *_common(kit, tmp_path)]) == 1  # nothing could be read
    assert "is a folder" in capsys.readouterr().out


def test_predict_checks_the_photos_before_loading_any_model(tmp_path, capsys):
    # A model path that cannot load: the missing photo must be reported first, and alone.
    code = main(["predict", str(tmp_path / "missing.jpg"), "--dataset", "flowers102", "--model",
                 str(tmp_path / "no-model"), "--results-dir", str(tmp_path), "--device", "cpu", "--no-download"])
    captured = capsys.readouterr()
    assert code == 1 and "photo not found" in captured.out
    assert "model" not in captured.err


def test_python_m_clip_utils_predict_prints_top5(kit, tmp_path):
    # The README's command, as a user types it (the one subprocess test).
    run = subprocess.run(
        [sys.executable, "-m", "clip_utils", "predict", "my_photo/flower.png", *_common(kit, tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0] == "my_photo/flower.png"
    names = set(class_names("flowers102"))
    assert len(lines) == 6
    for rank, line in enumerate(lines[1:], 1):
        number, rest = line.split(".", 1)
        name, prob = rest.rsplit(None, 1)
        assert int(number) == rank and name.strip() in names and prob.endswith("%")


def test_cli_predict_with_an_untrained_method_is_one_line(kit, tmp_path, capsys):
    code = main(["predict", str(FLOWER), "--method", "lora", *_common(kit, tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and "lora" in err and "Traceback" not in err


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "locked.jpg"
    Image.new("RGB", (8, 8)).save(path)

    def denied(fp, *args, **kwargs):  # chmod 0 does not stop root, so fake the OS's answer
        raise PermissionError(13, "Permission denied", str(fp))

    monkeypatch.setattr(photos.Image, "open", denied)
    with pytest.raises(PhotoError, match="locked.jpg: permission denied"):
        load_photo(path)


def test_damaged_exif_keeps_the_picture(tmp_path, monkeypatch):
    from clip_utils.data import images

    path = tmp_path / "odd_exif.jpg"
    Image.new("RGB", (30, 20), (0, 128, 0)).save(path)

    def broken(img):
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(images.ImageOps, "exif_transpose", broken)  # the data layer decodes photos too
    assert load_photo(path).size == (30, 20)
