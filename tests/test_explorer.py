"""The photo explorer driven from Python as a browser drives it, its charts, and its CLI counterpart `--method all`."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_utils import registry
from clip_utils.app import explorer as explorer_module
from clip_utils.app.cli import main
from clip_utils.app.explorer import UPLOADED, photo_explorer
from clip_utils.app.photos import PhotoError, compare_photos, load_photo, predict_photos
from clip_utils.figures import predictions as plots
from clip_utils.methods import lora, probe

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "my_photo"
BIRD, FLOWER = PHOTOS / "bird.jpg", PHOTOS / "flower.png"
ALL = ("zeroshot", "linear_probe", "lora")  # what the task2_runs fixture has a checkpoint of


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
    return {r["photo"]: {m: [t["name"] for t in e["top_k"]] for m, e in r["methods"].items() if "top_k" in e}
            for r in explorer.results if "methods" in r}


def same(top: list[dict], expected: list[dict]) -> bool:
    """The same classes in the same order with the same probabilities (to float noise)."""
    return ([t["label"] for t in top] == [t["label"] for t in expected]
            and [t["prob"] for t in top] == pytest.approx([t["prob"] for t in expected], abs=1e-6))


def pngs(explorer) -> int:
    return sum("image/png" in o["data"] for o in explorer.view)


def texts(explorer) -> list[str]:
    return [o["data"]["text/plain"] for o in explorer.view if "image/png" not in o["data"]]


@pytest.fixture
def loads(monkeypatch):
    """Counts the trained classifiers' loads per (method, dataset)."""
    counts: dict[tuple[str, str], int] = {}
    for module in (probe, lora):
        original = module.load_classifier

        def counted(lab, dataset, *args, _original=original, _method=module.METHOD, **kwargs):
            key = (_method, getattr(dataset, "name", dataset))
            counts[key] = counts.get(key, 0) + 1
            return _original(lab, dataset, *args, **kwargs)

        monkeypatch.setattr(module, "load_classifier", counted)
    return counts


@pytest.fixture
def work(monkeypatch):
    """Counts what costs: the model's forward passes (`top_classes`) and the charts drawn."""
    counts = {"forward": 0, "charts": 0}
    forward, draw = explorer_module.top_classes, plots.chart_image

    def counted_forward(*args, **kwargs):
        counts["forward"] += 1
        return forward(*args, **kwargs)

    def counted_draw(*args, **kwargs):
        counts["charts"] += 1
        return draw(*args, **kwargs)

    monkeypatch.setattr(explorer_module, "top_classes", counted_forward)
    monkeypatch.setattr(plots, "chart_image", counted_draw)
    return counts


def test_it_shows_the_first_photo_once_beside_a_chart_per_method(task2_runs, work):
    lab = task2_runs["lab"]
    ex = photo_explorer(lab, ["cub200", "flowers102"], methods=ALL, photo_dir=PHOTOS)
    assert ex.photo.value == str(BIRD) and ex.dataset.value == "cub200" and not ex.reasons
    (result,) = ex.results
    assert result["photo"] == "bird.jpg" and list(result["methods"]) == list(ALL)
    for method, entry in result["methods"].items():  # the notebook's and the CLI's predictions
        (expected,) = predict_photos(lab, [BIRD], "cub200", method=method)
        assert same(entry["top_k"], expected["top_k"])
    # One image for the photo: the photo once, the three charts beside it; no text table.
    (row,) = ex.images
    assert [o["data"]["text/plain"] for o in ex.view] == ["bird.jpg (cub200)"] and pngs(ex) == 1
    px = plots.EXPLORER_DPI
    assert row.width == round((2 * plots.MARGIN_IN + plots.PHOTO_IN + 3 * (plots.GAP_IN + plots.CHART_IN)) * px)
    assert work == {"forward": 3, "charts": 3}


def test_the_trained_methods_are_offered_and_an_untrained_one_says_why_on_hover(task2_runs):
    lab = task2_runs["lab"]
    # by default zero-shot and the methods trained for one of the datasets: no box that can never work
    assert list(photo_explorer(lab, ["cub200"], photo_dir=PHOTOS).method_boxes) == list(ALL)
    ex = photo_explorer(lab, ["cub200"], methods=[m.name for m in registry.methods()], photo_dir=PHOTOS)
    assert list(ex.method_boxes) == [m.name for m in registry.methods()]
    untrained = [m.name for m in registry.methods() if m.name not in ALL]
    assert set(ex.reasons) == set(untrained) and list(shown(ex)["bird.jpg"]) == list(ALL)
    for name in untrained:
        box, why = ex.method_boxes[name], ex.reasons[name]
        assert box.disabled and not box.value and box.tooltip == why
        # the checkbox's own title is its description: the reason rides on the label
        assert box.description_allow_html and f'title="{why}"' in box.description.replace("&#x27;", "'")
        # the command carries the notebook's model, data root and results folder
        command = why.split("train it with ", 1)[1]
        assert command.startswith(f"python -m clip_utils {registry.get(name).command} --dataset cub200 ")
        for option, value in (("--model", lab.model), ("--data-root", lab.data_root),
                              ("--results-dir", lab.results_dir)):
            assert f"{option} {value}" in command


def test_top_k_and_method_boxes_answer_from_what_is_kept(task2_runs, work):
    ex = photo_explorer(task2_runs["lab"], ["cub200"], methods=ALL, photo_dir=PHOTOS)
    upload(ex, ("bird.jpg", BIRD.read_bytes()), ("flower.png", FLOWER.read_bytes()))
    assert [r["photo"] for r in ex.results] == ["bird.jpg", "flower.png"] and len(ex.images) == pngs(ex) == 2
    before, counts = shown(ex), dict(work)
    timings = {}
    for k in (3, 1, 5, 2):
        start = time.perf_counter()
        ex.top_k.value = k
        timings[f"top-k {k}"] = time.perf_counter() - start
        assert all(len(names) == k for r in shown(ex).values() for names in r.values())
        assert shown(ex) == {p: {m: names[:k] for m, names in r.items()} for p, r in before.items()}
        heights = {image.height for image in ex.images}
        assert len(ex.images) == pngs(ex) == 2 and heights  # still one image per photo
    for method in ("lora", "linear_probe"):
        start = time.perf_counter()
        ex.method_boxes[method].value = False
        timings[f"{method} off"] = time.perf_counter() - start
    assert [list(r) for r in shown(ex).values()] == [["zeroshot"], ["zeroshot"]] and pngs(ex) == 2
    ex.method_boxes["lora"].value = True
    assert [list(r) for r in shown(ex).values()] == [["zeroshot", "lora"]] * 2
    for k in (12, 20):
        start = time.perf_counter()
        ex.top_k.value = k
        timings[f"top-k {k}"] = time.perf_counter() - start
    assert work == counts  # no forward pass and no chart drawn: kept rankings, kept charts cut to size
    print("explorer updates (2 photos, 3 methods):", {what: f"{s * 1000:.0f} ms" for what, s in timings.items()})
    assert max(timings.values()) < 1.0, timings  # about 0.05 s; generous for a busy machine


def test_the_dataset_and_the_photo_reuse_what_is_loaded(task2_runs, loads):
    ex = photo_explorer(task2_runs["lab"], ["cub200", "flowers102"], methods=ALL, photo_dir=PHOTOS, top_k=3)
    ex.dataset.value = "flowers102"  # the kit trained nothing on flowers102
    assert ex.method_boxes["linear_probe"].disabled and ex.method_boxes["lora"].disabled
    assert ex.reasons["linear_probe"].startswith("no linear probe checkpoint for flowers102: train it with "
                                                 "python -m clip_utils probe --dataset flowers102 --model ")
    assert "python -m clip_utils lora --dataset flowers102" in ex.method_boxes["lora"].tooltip
    assert "linear probe unavailable" in ex.notes.value and "LoRA unavailable" in ex.notes.value
    assert list(shown(ex)["bird.jpg"]) == ["zeroshot"] and len(shown(ex)["bird.jpg"]["zeroshot"]) == 3

    ex.dataset.value = "cub200"  # back: both enabled and on again, nothing reloaded
    assert not ex.reasons and list(shown(ex)["bird.jpg"]) == list(ALL)
    ex.photo.value = str(FLOWER)
    assert list(shown(ex)) == ["flower.png"] and pngs(ex) == 1
    assert loads == {("linear_probe", "cub200"): 1, ("lora", "cub200"): 1}


def test_it_says_when_it_is_busy(task2_runs, monkeypatch):
    said: list[str] = []
    ex = photo_explorer(task2_runs["lab"], ["cub200"], methods=ALL, photo_dir=PHOTOS)
    ex.status.observe(lambda change: said.append(change["new"]), "value")
    ex.photo.value = str(FLOWER)  # a new photo: a forward pass per method
    assert any("predicting with" in s for s in said) and said[-1] == ""  # said, then cleared
    said.clear()
    ex.top_k.value = 2  # nothing to wait for
    assert said == []


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
    assert texts(ex) == [ex.results[2]["error"]]  # the photo named once, not "notes.jpg: cannot read notes.jpg"
    assert len(ex.images) == pngs(ex) == 2
    decoded = {name: image for name, image in ex.photos}
    assert decoded["IMG_0001.jpg"].height > decoded["IMG_0001.jpg"].width  # EXIF rotation applied
    assert decoded["print.jpg"].getpixel((16, 16)) == pytest.approx((0, 255, 255), abs=60)
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
    assert ex.photo.label == "uploaded: empty.png" and not ex.images
    assert ex.results == [{"photo": "empty.png", "error": "empty.png is empty (0 bytes): nothing to read; "
                                                          "copy or upload the photo again"}]
    ex.photo.value = str(BIRD)  # the folder's photos stay in the menu
    assert list(shown(ex)) == ["bird.jpg"]


def test_an_empty_file_is_called_empty(tmp_path):
    (tmp_path / "IMG_0002.jpg").write_bytes(b"")
    with pytest.raises(PhotoError, match=r"^.*IMG_0002\.jpg is empty \(0 bytes\)"):
        load_photo(tmp_path / "IMG_0002.jpg")
    (tmp_path / "IMG_0003.HEIC").write_bytes(b"ftypheic" * 8)  # not empty: not an image Pillow reads
    with pytest.raises(PhotoError, match="not an image file Pillow can open"):
        load_photo(tmp_path / "IMG_0003.HEIC")


def test_a_damaged_checkpoint_is_disabled_with_its_reason(task2_runs, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(task2_runs["results"] / "cub200", results / "cub200")
    head = results / "cub200" / "lora" / "head.safetensors"
    head.write_bytes(head.read_bytes()[:100])
    ex = photo_explorer(task2_runs["lab"].replace(results_dir=results), ["cub200"], methods=ALL, photo_dir=PHOTOS)
    assert ex.method_boxes["lora"].disabled and "damaged" in ex.reasons["lora"]
    assert list(ex.results[0]["methods"]) == list(ALL) and "error" in ex.results[0]["methods"]["lora"]
    assert pngs(ex) == 1 and list(shown(ex)["bird.jpg"]) == ["zeroshot", "linear_probe"]  # the others still shown
    ex.top_k.value = 2  # from now on LoRA is simply off
    assert list(shown(ex)["bird.jpg"]) == ["zeroshot", "linear_probe"]


def test_no_photo_folder_and_an_unexpected_error_are_messages(task2_runs, tmp_path, monkeypatch):
    ex = photo_explorer(task2_runs["lab"], ["cub200", "flowers102"], methods=["zeroshot"], photo_dir=tmp_path / "none")
    assert ex.results == [] and "no photo yet" in texts(ex)[0]
    ex.method_boxes["zeroshot"].value = False
    assert "choose at least one method" in texts(ex)[-1]
    ex.method_boxes["zeroshot"].value = True

    def broken(*args, **kwargs):
        raise RuntimeError("out of luck")

    monkeypatch.setattr(explorer_module, "top_classes", broken)
    upload(ex, ("bird.jpg", BIRD.read_bytes()))  # a callback: its exception must reach the widget
    assert texts(ex)[-1] == "error: RuntimeError: out of luck" and ex.status.value == ""


def test_a_static_image_of_the_view_stays_where_the_controls_cannot(task2_runs, monkeypatch):
    import IPython.display

    shown_: list[tuple[dict, dict]] = []

    class Handle:
        def update(self, obj, raw=False):
            shown_[-1] = (obj, {"update": True})

    def display(obj, raw=False, display_id=None):
        shown_.append((obj, {"display_id": display_id}))
        return Handle() if display_id else None

    monkeypatch.setattr(IPython.display, "display", display)
    ex = photo_explorer(task2_runs["lab"], ["cub200"], methods=ALL, photo_dir=PHOTOS)
    ex._ipython_display_()  # what the cell's last line does
    (controls, _), (snapshot, how) = shown_
    assert "application/vnd.jupyter.widget-view+json" in controls and how == {"display_id": True}
    assert controls["text/plain"] == explorer_module.CONTROLS_TEXT  # not a page of repr where widgets cannot show
    png = Image.open(io.BytesIO(base64.b64decode(snapshot["image/png"])))
    assert png.size == ex.images[0].size and snapshot["text/plain"] == "bird.jpg (cub200)"
    # The live widget hides it by a marker inside the PNG: the style names what the base64 holds.
    style = ex.children[-1].value
    assert sum(fragment in snapshot["image/png"] for fragment in explorer_module.marker_fragments(ex._marker)) == 1
    assert all(f'img[src*="{f}"]' in style for f in explorer_module.marker_fragments(ex._marker))
    ex.top_k.value = 2  # where a frontend applies display updates from callbacks, the last view stays
    assert shown_[-1][1] == {"update": True} and shown_[-1][0]["image/png"] != snapshot["image/png"]


# --------------------------------------------------------------------------- charts


def _bars(fig) -> list:
    """The bars of a photo chart (the rectangles other than the axis line)."""
    return [a for a in fig.artists if a.get_width() * fig.get_figwidth() > 1 / 72]


def test_a_bar_keeps_its_height_for_any_top_k():
    image = Image.new("RGB", (400, 300), (90, 140, 60))
    top = [{"name": f"class {i}", "prob": 0.5 / (i + 1)} for i in range(20)]
    heights = {}
    for k in (1, 5, 20):
        fig = plots.plot_photo_predictions(image, top[:k], f"top-{k}")
        bars = _bars(fig)
        assert len(bars) == k
        heights[k] = {round(b.get_height() * fig.get_figheight(), 6) for b in bars}
    assert heights[1] == heights[5] == heights[20] == {plots.BAR_IN}  # inches, whatever k
    # the explorer's chart image: a row per class in whole pixels, so k rows are a crop of 20
    chart = plots.chart_image("zero-shot", top)
    assert chart.height == round(plots.chart_height(20) * plots.EXPLORER_DPI)
    assert round(plots.ROW_IN * plots.EXPLORER_DPI) == plots.ROW_IN * plots.EXPLORER_DPI


def test_class_names_in_other_scripts_warn_once_per_figure():
    assert plots.fallback_fonts(["DejaVu Sans", "Noto Sans Mono", "Noto Sans CJK JP", "cmr10", "Noto Sans"]) == [
        "Noto Sans CJK JP", "Noto Sans"]
    assert plots.font_stack()[: len(plots.matplotlib.rcParams["font.family"])] == list(
        plots.matplotlib.rcParams["font.family"])
    image = Image.new("RGB", (40, 30))
    top = [{"name": "ヒヨドリ", "prob": 0.6}, {"name": "ムクドリ", "prob": 0.3}, {"name": "Сорока", "prob": 0.1}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = plots.plot_photo_predictions(image, top, "野鳥")
        fig.savefig(io.BytesIO(), format="png")
        fig.savefig(io.BytesIO(), format="png", bbox_inches="tight")  # drawn again: no second warning
    said = [str(w.message) for w in caught]
    assert len(said) <= 1  # matplotlib alone: a warning per glyph per draw, 24 here
    if plots.font_stack() == list(plots.matplotlib.rcParams["font.family"]):  # no fallback font installed
        (line,) = said  # DejaVu Sans has Cyrillic, not kana or kanji
        assert "show as boxes" in line and all(c in line for c in "ヒヨドリムクドリ野鳥") and "С" not in line


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
