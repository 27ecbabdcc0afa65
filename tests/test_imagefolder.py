"""Your own images as a dataset: `imagefolder:PATH` in both layouts, end to end, and its errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from clip_utils import prompts, testkit
from clip_utils.app.cli import main
from clip_utils.data import class_names, dataset_spec, load_dataset, results_name
from clip_utils.data.imagefolder import PREFIX


def _splits(folder):
    return {s: load_dataset(f"{PREFIX}{folder}", "unused", s) for s in ("train", "val", "test")}


def test_class_folders_alone_are_split_50_20_30_per_class_stratified_and_seeded(image_folders):
    folder = image_folders["flat"]
    splits = _splits(folder)
    paths = {s: {p for p, _ in ds.samples} for s, ds in splits.items()}
    assert not (paths["train"] & paths["val"] or paths["train"] & paths["test"] or paths["val"] & paths["test"])
    assert len(set().union(*paths.values())) == 5 * 12
    for split, share in (("train", 0.5), ("val", 0.2), ("test", 0.3)):
        counts = Counter(label for _, label in splits[split].samples)
        assert set(counts) == set(range(5))  # every class in every split
        assert abs(len(splits[split]) - share * 60) <= 5
    assert _splits(folder)["val"].samples == splits["val"].samples  # the same split on every call
    folders = sorted(f"class{'_' if k % 2 == 0 else '-'}{k:02d}" for k in range(5))  # label order
    assert splits["test"].classes == folders
    assert class_names(f"{PREFIX}{folder}") == [f.replace("_", " ").replace("-", " ") for f in folders]
    assert splits["test"].name == results_name(f"{PREFIX}{folder}") == "mushrooms_flat"


def test_split_folders_are_the_splits_and_a_missing_val_is_carved_from_train(image_folders, tmp_path):
    splits = _splits(image_folders["splits"])
    assert [len(splits[s]) for s in ("train", "val", "test")] == [5 * 6, 5 * 3, 5 * 3]
    folder = testkit.make_imagefolder(tmp_path / "no_val", layout="train-test", per_class=20)
    carved = _splits(folder)
    assert len(carved["test"]) == 5 * 5 and len(carved["train"]) + len(carved["val"]) == 5 * 15
    assert set(Counter(y for _, y in carved["val"].samples)) == set(range(5))
    assert not {p for p, _ in carved["val"].samples} & {p for p, _ in carved["train"].samples}


def test_classes_json_names_the_classes_and_the_domain(tmp_path):
    folder = testkit.make_imagefolder(tmp_path / "fungi", n_classes=3, per_class=5)
    (folder / "classes.json").write_text(json.dumps({"classes": {"class_00": "fly agaric"},
                                                     "domain": "a type of mushroom"}))
    name = f"{PREFIX}{folder}"
    assert class_names(name, naming="original") == ["class-01", "class_00", "class_02"]
    assert class_names(name) == ["class 01", "fly agaric", "class 02"]
    sets = prompts.prompt_sets(dataset_spec(name))
    assert sets["domain"] == ["a photo of a {}, a type of mushroom."] and "domain_ensemble" in sets
    assert prompts.prompt_sets(dataset_spec(name), "a kind of fungus")["domain"] == ["a photo of a {}, a kind of fungus."]
    (folder / "classes.json").unlink()
    assert prompts.prompt_sets(dataset_spec(name))["domain"] == prompts.prompt_sets(dataset_spec(name))["default"]  # no phrase: the default
    assert dataset_spec(f"{PREFIX}{tmp_path}/./fungi").name == name  # one dataset, however it is spelt


def _common(kit, results, *extra):
    return ["--model", str(kit["model"]), "--results-dir", str(results), "--device", "cpu", "--no-download",
            "--workers", "0", *extra]


@pytest.mark.parametrize("layout", ["flat", "splits"])
def test_the_whole_pipeline_runs_on_an_image_folder(kit, image_folders, tmp_path, capsys, layout):
    dataset = f"{PREFIX}{image_folders[layout]}"
    results = tmp_path / "results"
    args = ["--dataset", dataset, *_common(kit, results)]
    assert main(["zeroshot", "--prompts", "default,domain,auto", "--domain", "a type of mushroom", *args]) == 0
    assert main(["probe", "--solver", "adamw", "--epochs", "20", "--lr", "0.3", *args]) == 0
    if layout == "splits":  # LoRA reads images like any method: one layout shows it (the notebooks run flat)
        assert main(["lora", "--epochs", "1", *args]) == 0
    photo = str(next((image_folders[layout] / ("test" if layout == "splits" else "")).rglob("*.jpg")))
    assert main(["predict", photo, "--method", "probe", "--json", *args]) == 0
    assert main(["report", "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    folder = results / f"mushrooms_{layout}"
    probe = json.loads((folder / "linear_probe" / "metrics.json").read_text())
    assert probe["dataset"] == dataset_spec(dataset).name and probe["class_names"] == class_names(dataset)
    assert probe["top1"] > 2 / 5  # learns: chance is 1/5
    domain = json.loads((folder / "zeroshot" / "domain" / "metrics.json").read_text())
    assert domain["templates"] == ["a photo of a {}, a type of mushroom."]
    assert json.loads(out[out.index("[\n"):out.index("\n]") + 2])[0]["top_k"][0]["name"] in probe["class_names"]
    summary = (results / "summary.csv").read_text().splitlines()
    rows = [line for line in summary if line.startswith(f"mushrooms_{layout},")]
    assert len(rows) == (3 if layout == "splits" else 2)  # zero-shot, probe (and LoRA)
    assert (results / "figures" / f"mushrooms_{layout}_linear_probe_confusion.png").is_file()


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d.mkdir(), "no class folders in"),
    (lambda d: testkit.make_imagefolder(d, per_class=2), "fewer than 3 images"),
    (lambda d: (testkit.make_imagefolder(d, layout="splits"), (d / "val").rename(d / "unused"),
                [p.unlink() for p in (d / "test" / "class_00").iterdir()]), "without images"),
    (lambda d: (testkit.make_imagefolder(d, layout="splits"), (d / "test" / "class_00").rename(d / "test" / "x")),
     "other classes than"),
    (lambda d: None, "image folder not found"),
])
def test_bad_image_folders_are_one_line_naming_the_problem(kit, tmp_path, capsys, make, message):
    folder = tmp_path / "mine"
    make(folder)
    code = main(["zeroshot", "--dataset", f"{PREFIX}{folder}", "--prompts", "default", *_common(kit, tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and message in err and str(folder) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_an_unreadable_image_is_named(kit, tmp_path, capsys):
    folder = testkit.make_imagefolder(tmp_path / "mine", per_class=6)
    broken = folder / "class_00" / "img_000.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    code = main(["probe", "--dataset", f"{PREFIX}{folder}", "--solver", "adamw", "--epochs", "1", *_common(kit, tmp_path)])  # every split
    err = capsys.readouterr().err
    assert code == 1 and str(broken) in err and "Traceback" not in err


def test_two_folders_of_one_name_do_not_share_a_results_folder(kit, tmp_path, capsys):
    first = testkit.make_imagefolder(tmp_path / "v1" / "mushrooms", n_classes=3, per_class=4)
    second = testkit.make_imagefolder(tmp_path / "v2" / "mushrooms", n_classes=4, per_class=4)
    run = ["zeroshot", "--prompts", "default", *_common(kit, tmp_path / "results")]
    assert main([*run, "--dataset", f"{PREFIX}{first}"]) == 0
    saved = (tmp_path / "results" / "mushrooms" / "zeroshot" / "default" / "metrics.json").read_text()
    capsys.readouterr()
    assert main([*run, "--dataset", f"{PREFIX}{second}"]) == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert f"holds the results of {PREFIX}{first}" in line and "use another --results-dir" in line
    assert (tmp_path / "results" / "mushrooms" / "zeroshot" / "default" / "metrics.json").read_text() == saved
    assert main([*run, "--dataset", f"{PREFIX}{first}"]) == 0  # the same folder again is a rerun
