"""The kit's informative pair (`testkit.make_informative_kit`): zero-shot above chance, a probe far above it.

The few-shot methods that start from the zero-shot classifier are tested on this pair: on
the kit's other sets the tiny CLIP is random, so zero-shot is chance and "beats zero-shot"
would say nothing.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from clip_utils import testkit
from clip_utils.data.imagefolder import split_samples
from clip_utils.lab import Lab

torch.set_num_threads(1)

N_CLASSES, COUNTS = 12, (16, 8, 32)  # make_informative_kit's defaults
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def informative(tmp_path_factory) -> dict[str, Path]:
    """`{"model": pretrained tiny CLIP, "dataset": its image folder}`, built once."""
    return testkit.make_informative_kit(tmp_path_factory.mktemp("informative"))


@pytest.fixture(scope="module")
def scores(informative, tmp_path_factory) -> dict:
    """Zero-shot (`default` prompts) and an L-BFGS probe on the informative folder, run once."""
    from clip_utils.methods.probe import run_probe
    from clip_utils.methods.zeroshot import run_zeroshot

    results = tmp_path_factory.mktemp("informative_results")
    lab = Lab(model=str(informative["model"]), data_root=informative["dataset"].parent, results_dir=results,
              device="cpu", num_workers=0, download=False)
    dataset = f"imagefolder:{informative['dataset']}"
    zeroshot = run_zeroshot(lab, dataset, ["default"])["default"]
    probe = run_probe(lab, dataset, solver="lbfgs")
    return {"lab": lab, "dataset": dataset, "zeroshot": zeroshot, "probe": probe}


def test_the_folder_has_16_train_8_val_32_test_images_of_12_named_classes(informative, scores):
    samples, classes = split_samples(informative["dataset"])
    assert len(classes) == N_CLASSES
    for split, count in zip(("train", "val", "test"), COUNTS, strict=True):
        assert Counter(label for _, label in samples[split]) == {k: count for k in range(N_CLASSES)}
    names = scores["lab"].class_names(scores["dataset"])  # the folder names (sorted), as a user's folder's
    assert names == [name.replace("_", " ") for name in classes]
    assert {"Black footed Albatross", "Laysan Albatross", "Yellow headed Blackbird"} <= set(names)
    assert scores["zeroshot"]["templates"] == ["a photo of a {}."]


def test_zero_shot_is_informative_but_imperfect(scores):
    top1 = scores["zeroshot"]["top1"]
    assert 2 / N_CLASSES < top1 < 0.9, top1


def test_a_linear_probe_on_the_same_features_is_far_above_zero_shot(scores):
    probe, zeroshot = scores["probe"]["top1"], scores["zeroshot"]["top1"]
    assert probe >= zeroshot + 0.15, (probe, zeroshot)
    assert probe >= 0.85, probe


def test_the_logit_scale_is_a_sensible_temperature(scores):
    model = scores["lab"].clip().model
    assert model.logit_scale.exp().item() == pytest.approx(10.0)


def test_the_build_is_deterministic(tmp_path):
    small = {"n_classes": 4, "known": 2, "counts": (2, 1, 2), "steps": 5}
    a = testkit.make_informative_kit(tmp_path / "a", **small)
    b = testkit.make_informative_kit(tmp_path / "b", **small)
    assert (a["model"] / "model.safetensors").read_bytes() == (b["model"] / "model.safetensors").read_bytes()
    files = sorted(p.relative_to(a["dataset"]) for p in a["dataset"].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b["dataset"]) for p in b["dataset"].rglob("*") if p.is_file())
    assert all((a["dataset"] / f).read_bytes() == (b["dataset"] / f).read_bytes() for f in files)


def test_the_command_line_builds_it_on_request(tmp_path, monkeypatch, capsys):
    built = []
    monkeypatch.setattr(testkit, "make_informative_kit",
                        lambda folder: built.append(folder) or {"model": Path(folder) / "model",
                                                                "dataset": Path(folder) / "birds"})
    testkit.main([str(tmp_path), "--informative"])
    assert built == [str(tmp_path)]
    assert f"imagefolder:{tmp_path / 'birds'}" in capsys.readouterr().out
    run = subprocess.run([sys.executable, "-m", "clip_utils.testkit", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=False)
    assert run.returncode == 0 and "--informative" in run.stdout, run.stderr
