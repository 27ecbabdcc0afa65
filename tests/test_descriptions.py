"""Class descriptions (CuPL sentences, DCLIP descriptors) and WaffleCLIP as prompt sets, end to end."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import pytest

from clip_utils.app.cli import main
from clip_utils.data import dataset_spec
from clip_utils.lab import Lab
from clip_utils.methods.zeroshot import run_zeroshot
from clip_utils.prompts import build_text_classifier, prompt_sets
from clip_utils.prompts.descriptions import (
    DescriptionsError,
    description_prompt,
    match_descriptions,
    read_descriptions,
)


@pytest.mark.parametrize("description, prompt", [
    ("a long, hooked bill", "Laysan Albatross, which is a long, hooked bill"),      # DCLIP: a/an -> which is
    ("has webbed feet", "Laysan Albatross, which has webbed feet"),                 # has/often/... -> which
    ("often seen over the open ocean", "Laysan Albatross, which often seen over the open ocean"),
    ("all white head", "Laysan Albatross, which has all white head"),               # whole words, not letters
    ("used to gliding", "Laysan Albatross, which is used to gliding"),
    ("The Laysan albatross nests on Midway.", "The Laysan albatross nests on Midway."),   # CuPL: names it
    ("A laysan_albatross in flight.", "A laysan_albatross in flight."),
    ("This seabird has a dark back.", "Laysan Albatross: This seabird has a dark back."),  # a sentence, unnamed
])
def test_each_description_becomes_one_prompt(description, prompt):
    assert description_prompt("Laysan Albatross", description) == prompt


def test_classes_are_found_by_curated_or_original_name_in_any_case():
    names, originals = ["Black-footed Albatross", "Chuck-will's-widow", "Brewer's Blackbird"], [
        "Black footed Albatross", "Chuck will Widow", "Brewer Blackbird"]
    file = {"BLACK-FOOTED ALBATROSS": ["dark plumage"],   # curated, upper case
            "chuck_will_widow": ["a nightjar"],           # original, snake case
            "Brewers Blackbird": ["glossy black feathers", "glossy black feathers", " "],  # letters alone
            "Dodo": ["extinct"]}                          # not a class: ignored
    found = match_descriptions(file, names, originals)
    assert [d for _, d in found] == [["dark plumage"], ["a nightjar"], ["glossy black feathers"]]  # repeats, blanks out


def test_classes_without_descriptions_are_listed_in_one_error():
    names = [f"bird {i}" for i in range(25)]
    with pytest.raises(DescriptionsError, match=r"no descriptions for 24 of 25 classes: bird 1, bird 2, .*"
                                                r"bird 20 and 4 more"):
        match_descriptions({"bird 0": ["small"]}, names, names)
    with pytest.raises(DescriptionsError, match=r"1 of 2 classes: Sooty Albatross \(Sooty_Albatross_x\)"):
        match_descriptions({"Laysan Albatross": ["white"]}, ["Laysan Albatross", "Sooty Albatross"],
                           ["Laysan Albatross", "Sooty_Albatross_x"])


@pytest.mark.parametrize("content, message", [("{not json", "not a JSON file"), ("[1, 2]", "one JSON object"),
                                              ('{"rose": "red"}', "list of strings")])
def test_unusable_files_are_named(tmp_path, content, message):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(DescriptionsError, match=message):
        read_descriptions(path)
    with pytest.raises(FileNotFoundError, match="descriptions file not found"):
        read_descriptions(tmp_path / "nope.json")


# --------------------------------------------------------------------------- on the test kit


def write_descriptions(lab: Lab, path, skip: int | None = None):
    """A DCLIP/CuPL-style file for the kit's CUB: half the keys curated, half original snake case."""
    names, originals = lab.class_names("cub200"), lab.label_map("cub200")
    content = {}
    for i, (name, original) in enumerate(zip(names, originals, strict=True)):
        if i == skip:
            continue
        key = original.lower().replace(" ", "_") if i % 2 else name
        content[key] = ["a long, hooked bill", "black and white plumage", f"A {name} glides over the sea."]
    path.write_text(json.dumps(content, indent=1))
    return path


@pytest.fixture(scope="module")
def described(kit, tmp_path_factory):
    """zero-shot `waffle`, `descriptions` and `auto` on the kit's CUB, with a generated file."""
    root = tmp_path_factory.mktemp("described")
    plain = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=root / "results", device="cpu",
                num_workers=0, download=False)
    lab = plain.replace(descriptions=write_descriptions(plain, root / "cub.json"))
    return lab, run_zeroshot(lab, "cub200", ["waffle", "descriptions", "auto"])


def test_descriptions_and_waffle_are_recorded_with_their_exact_prompts(described):
    lab, results = described
    names = lab.class_names("cub200")
    saved = {name: json.loads((lab.results_dir / "cub200" / "zeroshot" / name / "metrics.json").read_text())
             for name in ("waffle", "descriptions", "auto")}
    assert saved["waffle"]["templates"] == prompt_sets(dataset_spec("cub200"), seed=lab.seed)["waffle"]
    per_class = saved["descriptions"]["templates"]
    assert list(per_class) == names  # one entry per class, in label order
    assert per_class[names[1]] == [f"{names[1]}, which is a long, hooked bill",
                                   f"{names[1]}, which has black and white plumage",
                                   f"A {names[1]} glides over the sea."]
    assert per_class == lab.prompt_sets("cub200")["descriptions"]
    # the saved predictions are those of the class-specific classifier
    clip = lab.clip()
    W = build_text_classifier(clip.model, clip.tokenizer, names, per_class, "cpu", progress=False)
    with open(lab.results_dir / "cub200" / "zeroshot" / "descriptions" / "predictions.csv", newline="") as f:
        saved_preds = [int(row["pred"]) for row in csv.DictReader(f)]
    assert (lab.features("cub200", "test").embeddings @ W).argmax(1).tolist() == saved_preds
    assert results["descriptions"]["n"] == len(saved_preds)


def test_auto_chooses_among_descriptions_and_waffle_on_validation(described):
    lab, results = described
    auto = results["auto"]
    assert {"waffle", "descriptions", "default", "domain"} <= set(auto["val_top1"])
    assert auto["selected_set"] in auto["val_top1"] and auto["selected_on"] == "val"
    chosen = lab.prompt_sets("cub200")[auto["selected_set"]]
    assert auto["templates"] == chosen  # the winner's exact prompts, per class when it is `descriptions`


def test_another_file_is_another_lab(described, tmp_path):
    lab, _ = described
    other = lab.replace(descriptions=write_descriptions(lab, tmp_path / "other.json"))
    assert other._loaded is not lab._loaded and not other._loaded.text  # nothing shared, nothing built yet


def _cli(kit, tmp_path, *argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([*argv, "--dataset", "cub200", "--model", str(kit["model"]), "--data-root", str(kit["data"]),
                         "--results-dir", str(tmp_path), "--device", "cpu", "--no-download"])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def test_cli_descriptions_errors(kit, tmp_path, described):
    code, _, err = _cli(kit, tmp_path, "zeroshot", "--prompts", "descriptions")
    assert code == 2 and "--descriptions FILE" in err
    code, _, err = _cli(kit, tmp_path, "zeroshot", "--descriptions", str(tmp_path / "nope.json"))
    assert code == 1 and "descriptions file not found" in err
    lab, _ = described
    partial = write_descriptions(lab, tmp_path / "partial.json", skip=3)
    code, _, err = _cli(kit, tmp_path, "zeroshot", "--descriptions", str(partial), "--prompts", "descriptions")
    assert code == 1 and len(err.strip().splitlines()) == 1 and lab.class_names("cub200")[3] in err


def test_cli_predict_with_the_descriptions_set(kit, tmp_path, described):
    code, out, err = _cli(kit, tmp_path, "predict", "my_photo/bird.jpg", "--descriptions",
                          str(described[0].descriptions), "--prompts", "descriptions", "--json", "--top-k", "2")
    assert code == 0, err
    assert len(json.loads(out)[0]["top_k"]) == 2
