"""The photo explorer driven from Python as a browser drives it, and its CLI counterpart `--method all`."""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_utils import registry
from clip_utils.app import explorer as explorer_module
from clip_utils.app.cli import main
from clip_utils.app.explorer import UPLOADED, photo_explorer
from clip_utils.app.photos import compare_photos, predict_photos
from clip_utils.methods import lora, probe

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "my_photo"
BIRD, FLOWER = PHOTOS / "bird.jpg", PHOTOS / "flower.png"
ALL = ("zeroshot", "linear_probe", "lora")


def upload(explorer, *files: tuple[str, bytes]) -> None:
    """Set the FileUpload's value as ipywidgets 8 does when a browser uploads `files`."""
    now = dt.datetime.now(dt.timezone.utc)
    explorer.upload.value = tuple({"name": name, "type": "image/jpeg", "size": len(data),
                                   "content": memoryview(data), "last_modified": now} for name, data in files)


def jpeg(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **save)
    return buffer.getvalue()


def shown(explorer) -> dict[str, dict[str, list[str]]]:
    """`{photo: {method: [class names]}}` of what the explorer shows now."""
    return {r["photo"]: {m: [t["name"] for t in e["top_k"]] for m, e in r["methods"].items()}
            for r in explorer.results if "methods" in r}


def same(top: list[dict], expected: list[dict]) -> bool:
    """The same classes in the same order with the same probabilities (to float noise)."""
    return ([t["label"] for t in top] == [t["label"] for t in expected]
            and [t["prob"] for t in top] == pytest.approx([t["prob"] for t in expected], abs=1e-6))


def pngs(explorer) -> int:
    return sum("image/png" in o["data"] for o in explorer.output.outputs if o["output_type"] == "display_data")


@pytest.fixture
def loads(monkeypatch):
    """Counts the trained classifiers' loads per (method, dataset)."""
    counts: dict[tuple[str, str], int] = {}
    for module in (probe, lora):
        original = module.load_classifier

        def counted(lab, dataset, *args, _original=original, _method=module.METHOD, **kwargs):
            counts[_method, dataset] = counts.get((_method, dataset), 0) + 1
            return _original(lab, dataset, *args, **kwargs)

        monkeypatch.setattr(module, "load_classifier", counted)
    return counts


def test_it_shows_the_first_photo_under_every_method_at_once(task2_runs):
    lab = task2_runs["lab"]
    ex = photo_explorer(lab, ["cub200", "flowers102"], methods=ALL, photo_dir=PHOTOS)
    assert ex.photo.value == str(BIRD) and ex.dataset.value == "cub200" and not ex.reasons
    (result,) = ex.results
    assert result["photo"] == "bird.jpg" and list(result["methods"]) == list(ALL)
    for method, entry in result["methods"].items():  # the notebook's and the CLI's predictions
        (expected,) = predict_photos(lab, [BIRD], "cub200", method=method)
        assert same(entry["top_k"], expected["top_k"])
    titles = [f.get_suptitle() for f in ex.figures]
    assert titles == ["bird.jpg (cub200, zero-shot)", "bird.jpg (cub200, linear probe)", "bird.jpg (cub200, LoRA)"]
    assert pngs(ex) == 3
    table = ex.output.outputs[0]["data"]["text/plain"]
    assert "zero-shot" in table and "linear probe" in table and "LoRA" in table


def test_top_k_methods_and_dataset_reuse_what_is_loaded(task2_runs, loads):
    ex = photo_explorer(task2_runs["lab"], ["cub200", "flowers102"], methods=ALL, photo_dir=PHOTOS)
    before = shown(ex)["bird.jpg"]
    ex.top_k.value = 3
    assert {m: len(names) for m, names in shown(ex)["bird.jpg"].items()} == dict.fromkeys(ALL, 3)
    assert shown(ex)["bird.jpg"] == {m: names[:3] for m, names in before.items()}

    ex.method_boxes["lora"].value = False
    assert list(shown(ex)["bird.jpg"]) == ["zeroshot", "linear_probe"] and pngs(ex) == 2

    ex.dataset.value = "flowers102"  # the kit trained nothing on flowers102
    assert ex.method_boxes["linear_probe"].disabled and ex.method_boxes["lora"].disabled
    assert ex.reasons["linear_probe"] == ("no linear probe checkpoint for flowers102: train it with "
                                          "python -m clip_utils probe --dataset flowers102")
    assert "python -m clip_utils lora --dataset flowers102" in ex.method_boxes["lora"].tooltip
    assert "linear probe unavailable" in ex.notes.value and "LoRA unavailable" in ex.notes.value
    assert list(shown(ex)["bird.jpg"]) == ["zeroshot"] and len(shown(ex)["bird.jpg"]["zeroshot"]) == 3

    ex.dataset.value = "cub200"  # back: both enabled and on again, nothing reloaded
    assert not ex.reasons and list(shown(ex)["bird.jpg"]) == list(ALL)
    ex.photo.value = str(FLOWER)
    assert list(shown(ex)) == ["flower.png"] and pngs(ex) == 3
    assert loads == {("linear_probe", "cub200"): 1, ("lora", "cub200"): 1}


def test_uploads_are_read_like_files_and_bad_ones_answered_in_the_widget(task2_runs, tmp_path, monkeypatch):
    lab = task2_runs["lab"]
    ex = photo_explorer(lab, ["cub200"], methods=["zeroshot"], photo_dir=PHOTOS)
    pixels = np.zeros((30, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (220, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, as phones do: upright it is portrait
    sideways = jpeg(Image.fromarray(pixels), exif=exif)
    cmyk = jpeg(Image.new("CMYK", (32, 32), (255, 0, 0, 0)))
    upload(ex, ("IMG_0001.jpg", sideways), ("print.jpg", cmyk), ("notes.jpg", b"shopping list: milk, eggs"))

    assert ex.photo.value == UPLOADED and ex.photo.label == "uploaded: 3 photos"
    assert ex.upload.value == ()  # read, then cleared: the same files can be uploaded again
    assert [r["photo"] for r in ex.results] == ["IMG_0001.jpg", "print.jpg", "notes.jpg"]
    assert ex.results[2]["error"].startswith("cannot read notes.jpg: not an image file")
    errors = [o["data"]["text/plain"] for o in ex.output.outputs if "cannot read" in o["data"].get("text/plain", "")]
    assert errors == ["notes.jpg: " + ex.results[2]["error"]]
    height, width = ex.figures[0].axes[0].images[0].get_array().shape[:2]
    assert height > width  # EXIF rotation applied
    assert tuple(ex.figures[1].axes[0].images[0].get_array()[16, 16]) == pytest.approx((0, 255, 255), abs=60)
    for name, data in (("IMG_0001.jpg", sideways), ("print.jpg", cmyk)):  # same answer as the same file
        (tmp_path / name).write_bytes(data)
        (expected,) = predict_photos(lab, [tmp_path / name], "cub200")
        assert same(next(r for r in ex.results if r["photo"] == name)["methods"]["zeroshot"]["top_k"],
                    expected["top_k"])

    with monkeypatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # so a 32x32 upload counts as a decompression bomb
        upload(ex, ("huge.jpg", cmyk))
    assert "huge.jpg is too large to decode safely" in ex.results[0]["error"]

    upload(ex, ("empty.png", b""))
    assert ex.photo.label == "uploaded: empty.png" and "error" in ex.results[0] and not ex.figures
    ex.photo.value = str(BIRD)  # the folder's photos stay in the menu
    assert list(shown(ex)) == ["bird.jpg"]


def test_a_damaged_checkpoint_is_disabled_with_its_reason(task2_runs, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(task2_runs["results"] / "cub200", results / "cub200")
    head = results / "cub200" / "lora" / "head.safetensors"
    head.write_bytes(head.read_bytes()[:100])
    ex = photo_explorer(task2_runs["lab"].replace(results_dir=results), ["cub200"], methods=ALL, photo_dir=PHOTOS)
    assert ex.method_boxes["lora"].disabled and "damaged" in ex.reasons["lora"]
    assert list(ex.results[0]["methods"]) == list(ALL) and "error" in ex.results[0]["methods"]["lora"]
    assert pngs(ex) == 2  # zero-shot and the probe still shown
    ex.top_k.value = 2  # from now on LoRA is simply off
    assert list(shown(ex)["bird.jpg"]) == ["zeroshot", "linear_probe"]


def test_no_photo_folder_and_an_unexpected_error_are_messages(task2_runs, tmp_path, monkeypatch):
    ex = photo_explorer(task2_runs["lab"], ["cub200", "flowers102"], methods=["zeroshot"], photo_dir=tmp_path / "none")
    assert ex.results == [] and "no photo yet" in ex.output.outputs[0]["data"]["text/plain"]
    ex.method_boxes["zeroshot"].value = False
    assert "choose at least one method" in ex.output.outputs[-1]["data"]["text/plain"]
    ex.method_boxes["zeroshot"].value = True

    def broken(*args, **kwargs):
        raise RuntimeError("out of luck")

    monkeypatch.setattr(explorer_module, "top_classes", broken)
    upload(ex, ("bird.jpg", BIRD.read_bytes()))  # a callback: its exception must reach the widget
    assert ex.output.outputs[-1]["data"]["text/plain"] == "error: RuntimeError: out of luck"


# --------------------------------------------------------------------------- predict --method all


def said(err: str) -> list[str]:
    """The CLI's own lines on stderr (progress bars left out)."""
    return [line for line in err.splitlines() if line.startswith(("warning:", "error:"))]


def _args(task2_runs, dataset="cub200"):
    lab = task2_runs["lab"]
    return ["--dataset", dataset, "--model", lab.model, "--data-root", str(lab.data_root),
            "--results-dir", str(lab.results_dir), "--device", "cpu", "--no-download"]


def test_predict_all_prints_the_methods_side_by_side(task2_runs, capsys):
    assert main(["predict", str(BIRD), str(FLOWER), "--method", "all", "--top-k", "3", *_args(task2_runs)]) == 0
    out, err = capsys.readouterr()
    # the methods not trained for cub200 (the adapters) are skipped in one line
    (skipped,) = said(err)
    assert skipped.startswith("warning: skipped, not trained for cub200: Tip-Adapter") and "LoRA" not in skipped
    lines = out.splitlines()
    assert lines[0] == str(BIRD) and lines[5] == str(FLOWER) and len(lines) == 10
    assert lines[1].split() == ["zero-shot", "linear", "probe", "LoRA"]
    expected = {m: predict_photos(task2_runs["lab"], [BIRD], "cub200", method=m, top_k=3)[0]["top_k"] for m in ALL}
    for rank, line in enumerate(lines[2:5]):
        assert line.startswith(f"   {rank + 1}. ")
        for method in ALL:  # each column holds that method's class at this rank
            top = expected[method][rank]
            assert f"{top['name']}" in line and f"{100 * top['prob']:5.1f}%" in line


def test_predict_all_skips_untrained_methods_in_one_line(task2_runs, capsys):
    code = main(["predict", str(BIRD), "--method", "all", "--json", *_args(task2_runs, "flowers102")])
    out, err = capsys.readouterr()
    assert code == 0
    (result,) = json.loads(out)
    assert result["photo"] == str(BIRD) and list(result["methods"]) == [m.name for m in registry.methods()]
    assert len(result["methods"]["zeroshot"]["top_k"]) == 5
    assert result["methods"]["lora"] == {
        "error": "no LoRA checkpoint for flowers102: train it with python -m clip_utils lora --dataset flowers102"}
    (line,) = said(err)
    assert line.startswith("warning: skipped, not trained for flowers102: linear probe, LoRA, Tip-Adapter")
    assert "python -m clip_utils METHOD --dataset flowers102" in line

    assert main(["predict", str(BIRD), "--method", "all", *_args(task2_runs, "flowers102")]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["zero-shot"]


def test_predict_all_fails_on_a_damaged_checkpoint_and_still_shows_the_others(task2_runs, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(task2_runs["results"], results, ignore=shutil.ignore_patterns("cache", "figures"))
    (results / "cub200" / "linear_probe" / "head.safetensors").write_bytes(b"not a head")
    args = _args(task2_runs)
    args[args.index("--results-dir") + 1] = str(results)
    code = main(["predict", str(BIRD), "--method", "all", "--json", *args])
    out, err = capsys.readouterr()
    (result,) = json.loads(out)
    assert code == 1 and "top_k" in result["methods"]["zeroshot"] and "top_k" in result["methods"]["lora"]
    (line,) = [line for line in said(err) if line.startswith("error")]  # an error, not a skip: the file is broken
    assert line.startswith("error: linear probe: ") and "damaged" in line


def test_predict_all_keeps_predicts_exit_codes(task2_runs, tmp_path, capsys):
    code = main(["predict", str(BIRD), str(tmp_path / "gone.jpg"), "--method", "all", "--json", *_args(task2_runs)])
    results = json.loads(capsys.readouterr().out)
    assert code == 1 and set(results[1]) == {"photo", "error"} and "photo not found" in results[1]["error"]
    assert all("top_k" in results[0]["methods"][m] for m in ALL)
    # Nothing readable: answered before any model loads (this model path cannot load).
    broken = [*_args(task2_runs)]
    broken[broken.index("--model") + 1] = str(tmp_path / "no-model")
    assert main(["predict", str(tmp_path / "gone.jpg"), "--method", "all", *broken]) == 1
    out, err = capsys.readouterr()
    assert "photo not found" in out and said(err) == []
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(BIRD), "--method", "everything", *_args(task2_runs)])
    assert exit_.value.code == 2


def test_compare_photos_names_each_missing_method_and_loads_no_model_for_it(task2_runs, loads):
    (result,) = compare_photos(task2_runs["lab"], [BIRD], "flowers102", methods=["probe", "lora"])
    assert list(result["methods"]) == ["linear_probe", "lora"] and all("error" in e for e in result["methods"].values())
    assert loads == {}
