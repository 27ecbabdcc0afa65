"""The torchvision benchmarks on their synthetic layouts: splits, labels, names, prompts, errors.

Every expectation is read from the files the generator wrote (annotation lists, JSON, .mat,
class folders), independently of torchvision, so a wrong label order or a lost split shows.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from clip_utils import data, prompts
from clip_utils.app.cli import main
from clip_utils.data import DatasetNotFoundError, class_names, dataset_spec, load_dataset
from clip_utils.data import images as imagelist
from clip_utils.testkit import benchmarks as testkit_benchmarks

BENCHMARKS = ("pets", "fgvc_aircraft", "dtd", "food101", "eurosat", "stanford_cars")
FOLDERS = {"pets": "oxford-iiit-pet", "fgvc_aircraft": "fgvc-aircraft-2013b", "dtd": "dtd", "food101": "food-101",
           "eurosat": "eurosat", "stanford_cars": "stanford_cars"}
# Which of our splits come from which split of the files: official, carved 80/20, or cut 50/20/30.
OFFICIAL, CARVED = ("fgvc_aircraft", "dtd"), {"pets": "trainval", "food101": "train", "stanford_cars": "train"}
# CLIP's EuroSAT names (openai/CLIP data/prompts.md) for torchvision's class folders.
EUROSAT_CLIP = {"AnnualCrop": "annual crop land", "Forest": "forest", "HerbaceousVegetation": "brushland or shrubland",
                "Highway": "highway or road", "Industrial": "industrial buildings or commercial buildings",
                "Pasture": "pasture land", "PermanentCrop": "permanent crop land",
                "Residential": "residential buildings or homes or apartments", "River": "river",
                "SeaLake": "lake or sea"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("benchmarks")
    testkit_benchmarks.make_benchmarks(root)
    return root


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def _camel(folder: str) -> str:
    return "".join(f" {c}" if c.isupper() and i else c for i, c in enumerate(folder))


def truth(name: str, root: Path) -> tuple[dict[str, dict[str, str]], list[str], list[str]]:
    """What the files say: `({file split: {image path: original class name}}, original names
    in label order, curated names in label order)`; EuroSAT's one file split is `all`."""
    if name == "pets":
        base = root / "oxford-iiit-pet"
        rows = {s: [line.split() for line in _lines(base / "annotations" / f"{s}.txt")] for s in ("trainval", "test")}
        breeds = dict(sorted({(int(r[1]), r[0].rsplit("_", 1)[0]) for rs in rows.values() for r in rs}))
        title = {b: " ".join(w.title() for w in b.split("_")) for b in breeds.values()}  # torchvision's form
        splits = {s: {str(base / "images" / f"{r[0]}.jpg"): title[r[0].rsplit("_", 1)[0]] for r in rs}
                  for s, rs in rows.items()}
        # CLIP's names are the file names' words: cat breeds capitalised, dog breeds not
        return splits, [title[b] for b in breeds.values()], [b.replace("_", " ") for b in breeds.values()]
    if name == "fgvc_aircraft":
        base = root / "fgvc-aircraft-2013b" / "data"
        variants = _lines(base / "variants.txt")
        splits = {s: {str(base / "images" / f"{line.split(' ', 1)[0]}.jpg"): line.split(" ", 1)[1]
                      for line in _lines(base / f"images_variant_{s}.txt")} for s in ("train", "val", "test")}
        return splits, variants, variants
    if name == "dtd":
        base = root / "dtd" / "dtd"
        splits = {s: {str(base / "images" / rel): rel.split("/")[0] for rel in _lines(base / "labels" / f"{s}1.txt")}
                  for s in ("train", "val", "test")}
        classes = sorted({c for s in splits.values() for c in s.values()})
        return splits, classes, classes
    if name == "food101":
        base = root / "food-101"
        meta = {s: json.loads((base / "meta" / f"{s}.json").read_text()) for s in ("train", "test")}
        splits = {s: {str(base / "images" / f"{rel}.jpg"): c.replace("_", " ") for c, rels in m.items() for rel in rels}
                  for s, m in meta.items()}
        classes = [c.replace("_", " ") for c in sorted(meta["train"])]
        return splits, classes, classes
    if name == "eurosat":
        base = root / "eurosat" / "2750"
        folders = sorted(p.name for p in base.iterdir() if p.is_dir())
        splits = {"all": {str(p): _camel(f) for f in folders for p in (base / f).glob("*.jpg")}}
        return splits, [_camel(f) for f in folders], [EUROSAT_CLIP[f] for f in folders]
    if name == "stanford_cars":
        from scipy.io import loadmat

        base = root / "stanford_cars"
        meta = loadmat(base / "devkit" / "cars_meta.mat")["class_names"][0]
        classes = [str(c[0]) for c in meta]
        splits = {}
        for s, mat in (("train", base / "devkit" / "cars_train_annos.mat"),
                       ("test", base / "cars_test_annos_withlabels.mat")):
            annos = loadmat(mat)["annotations"][0]
            splits[s] = {str(base / f"cars_{s}" / str(a["fname"][0])): classes[int(a["class"][0, 0]) - 1] for a in annos}
        return splits, classes, classes
    raise KeyError(name)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_label_is_the_class_its_files_say_and_the_splits_are_the_declared_ones(bench, name):
    files, original, _ = truth(name, bench)
    every = {path: cls for split in files.values() for path, cls in split.items()}
    ds = {s: load_dataset(name, bench, s) for s in data.SPLITS}
    paths = {s: {p for p, _ in d.samples} for s, d in ds.items()}
    for split, d in ds.items():
        assert d.classes == original, split  # label order, the same in every split
        assert all(d.classes[label] == every[path] for path, label in d.samples), split
        assert len(paths[split]) == len(d) > 0  # no sample twice
    assert not paths["train"] & paths["val"] and not paths["train"] & paths["test"] and not paths["val"] & paths["test"]
    if name in OFFICIAL:
        assert all(paths[s] == set(files[s]) for s in data.SPLITS)
    elif name in CARVED:
        assert paths["train"] | paths["val"] == set(files[CARVED[name]]) and paths["test"] == set(files["test"])
    else:  # EuroSAT: every image in one of the three
        assert paths["train"] | paths["val"] | paths["test"] == set(files["all"])


@pytest.mark.parametrize("name,shares", [("pets", {"train": 0.8, "val": 0.2}), ("food101", {"train": 0.8, "val": 0.2}),
                                         ("stanford_cars", {"train": 0.8, "val": 0.2}),
                                         ("eurosat", {"train": 0.5, "val": 0.2, "test": 0.3})])
def test_carved_splits_are_stratified_seeded_and_sized_as_coop(bench, name, shares):
    ds = {s: load_dataset(name, bench, s) for s in shares}
    total = sum(len(d) for d in ds.values())
    n_classes = len(ds["train"].classes)
    per_class = Counter(label for d in ds.values() for label in d.targets)
    for split, d in ds.items():
        counts = Counter(d.targets)
        assert set(counts) == set(range(n_classes)), split  # every class in every part
        for label, n in counts.items():  # each class cut in the declared shares (to the image)
            assert abs(n - shares[split] * per_class[label]) < 1, (split, label)
        assert abs(len(d) - shares[split] * total) <= n_classes
        assert load_dataset(name, bench, split).samples == d.samples  # seeded: the same on every call


@pytest.mark.parametrize("name", BENCHMARKS)
def test_class_names_from_metadata_in_both_namings(bench, name, monkeypatch):
    _, original, curated = truth(name, bench)
    monkeypatch.setattr(imagelist, "reachable", lambda url: pytest.fail("must not touch the network"))
    assert class_names(name, bench, "original") == original == load_dataset(name, bench, "test").classes
    assert class_names(name, bench, "curated") == class_names(name, bench) == curated


def test_curated_names_where_clip_renamed_the_classes(bench):
    assert class_names("pets", bench)[:2] == ["Abyssinian", "american bulldog"]  # CLIP's own spelling
    assert class_names("pets", bench, "original")[:2] == ["Abyssinian", "American Bulldog"]  # torchvision's
    assert class_names("eurosat", bench, "original") == ["Annual Crop", "Herbaceous Vegetation", "Highway", "Sea Lake"]
    assert class_names("eurosat", bench) == ["annual crop land", "brushland or shrubland", "highway or road",
                                             "lake or sea"]
    from clip_utils.data.classnames import PETS_CLIP, curated_eurosat, curated_pets

    # the full tables: all 37 breeds from torchvision's title-cased names; all ten EuroSAT folders
    titled = [" ".join(w.title() for w in n.split()) for n in PETS_CLIP]
    assert curated_pets(titled) == list(PETS_CLIP) and len(set(PETS_CLIP)) == 37
    assert curated_eurosat([_camel(f) for f in EUROSAT_CLIP]) == list(EUROSAT_CLIP.values())


CLIP_TEMPLATES = {
    "pets": ["a photo of a {}, a type of pet."],
    "fgvc_aircraft": ["a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."],
    "dtd": [f"a photo of {a} {{}} {w}." for a in ("a", "the") for w in ("texture", "pattern", "thing", "object")],
    "food101": ["a photo of {}, a type of food."],
    "eurosat": ["a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."],
    "stanford_cars": ["a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
                      "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.",
                      "a photo of my old {}."],
}
DOMAINS = {"pets": "a type of pet", "fgvc_aircraft": "a type of aircraft", "dtd": None, "food101": "a type of food",
           "eurosat": None, "stanford_cars": "a type of car"}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_prompt_sets_carry_clips_templates(name):
    sets = prompts.prompt_sets(dataset_spec(name))
    spec = data.dataset_spec(name)
    assert spec.clip_templates == tuple(CLIP_TEMPLATES[name]) and spec.domain == DOMAINS[name]
    phrase = DOMAINS[name]
    assert sets["default"] == ["a photo of a {}."]
    assert sets["domain"] == ([f"a photo of a {{}}, {phrase}."] if phrase else ["a photo of a {}."])
    assert ("domain_ensemble" in sets) == bool(phrase)
    assert all(phrase in t for t in sets.get("domain_ensemble", []))
    # CLIP's templates are a set of their own unless they are the domain set already (Pets)
    assert sets.get("clip", sets["domain"]) == CLIP_TEMPLATES[name]
    assert prompts.resolve("all", dataset_spec(name))[-1] == "auto"


def test_flowers_keep_their_sets():
    assert list(prompts.prompt_sets(dataset_spec("flowers102"))) == ["default", "domain", "diverse", "domain_ensemble", "waffle"]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_missing_dataset_names_its_folder_and_how_to_get_it(tmp_path, name, monkeypatch):
    monkeypatch.setattr(imagelist, "reachable", lambda url: pytest.fail("must not touch the network"))
    folder = str(tmp_path / FOLDERS[name])
    for missing in (lambda: load_dataset(name, tmp_path, "test"), lambda: class_names(name, tmp_path)):
        with pytest.raises(DatasetNotFoundError) as err:
            missing()
        assert folder in str(err.value)
        if data.dataset_spec(name).downloadable:
            assert "--no-download" in str(err.value) and "download=True" in str(err.value)


def test_stanford_cars_says_how_to_put_it_in_place_and_never_downloads(tmp_path, monkeypatch):
    assert not data.dataset_spec("stanford_cars").downloadable
    assert all(data.dataset_spec(n).downloadable for n in BENCHMARKS if n != "stanford_cars")
    monkeypatch.setattr(imagelist, "reachable", lambda url: pytest.fail("must not touch the network"))
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("stanford_cars", tmp_path, "train", download=True)
    message = str(err.value)
    assert str(tmp_path / "stanford_cars") in message and "cannot be downloaded" in message
    for part in ("devkit/", "cars_meta.mat", "cars_train_annos.mat", "cars_train/", "cars_test/",
                 "cars_test_annos_withlabels.mat"):
        assert part in message


@pytest.mark.parametrize("name", [n for n in BENCHMARKS if n != "stanford_cars"])
def test_download_offline_fails_fast_and_clearly(tmp_path, name, monkeypatch):
    monkeypatch.setattr(imagelist, "reachable", lambda url: (False, "no route to host"))
    with pytest.raises(DatasetNotFoundError, match="unreachable.*no route to host"):
        load_dataset(name, tmp_path, "test", download=True)


def test_an_incomplete_dataset_says_which_file_is_missing(bench, tmp_path):
    shutil.copytree(bench / "oxford-iiit-pet", tmp_path / "oxford-iiit-pet")
    (tmp_path / "oxford-iiit-pet" / "annotations" / "test.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"incomplete: .*annotations/test\.txt is missing"):
        load_dataset("pets", tmp_path, "test", download=True)  # present: no download is tried


def test_zeroshot_cli_runs_on_pets(kit, bench, tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["zeroshot", "--dataset", "pets", "--prompts", "default,domain", "--model", str(kit["model"]),
                     "--data-root", str(bench), "--results-dir", str(tmp_path), "--device", "cpu", "--no-download"])
    assert code == 0, out.getvalue()
    metrics = json.loads((tmp_path / "pets" / "zeroshot" / "domain" / "metrics.json").read_text())
    assert metrics["n"] == len(load_dataset("pets", bench, "test"))
    assert metrics["class_names"] == class_names("pets", bench)
    assert metrics["templates"] == ["a photo of a {}, a type of pet."]
    assert "domain" in out.getvalue()
