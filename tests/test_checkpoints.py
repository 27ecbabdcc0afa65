"""Heads and adapters: identical predictions after reload, refusing what does not fit, atomic saves."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from clip_utils.app.cli import main
from clip_utils.app.photos import classifier_for
from clip_utils.config import LoraSettings
from clip_utils.lab import Lab
from clip_utils.model.clip import load_clip
from clip_utils.model.heads import ClipClassifier
from clip_utils.model.inputs import iter_labelled_batches
from clip_utils.model.lora import add_lora
from clip_utils.model.preprocess import Preprocess
from clip_utils.model.training import predict
from clip_utils.results import checkpoints
from clip_utils.results.checkpoints import (
    CheckpointMismatchError,
    head_info,
    load_head,
    read_head,
    save_adapter,
    save_head,
)

ROOT = Path(__file__).resolve().parents[1]

NAMES = [f"class {i}" for i in range(5)]


def info(**changes):
    base = head_info(dataset="cub200", method="probe", model="some/clip", class_names=NAMES, embed_dim=8, epoch=3)
    return replace(base, **changes)


def random_head(dim: int = 8, classes: int = 5, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(dim, classes)


def test_head_round_trip_gives_identical_logits(tmp_path):
    head, x = random_head(), torch.randn(10, 8)
    save_head(tmp_path / "head.safetensors", head, info())
    loaded, meta = load_head(tmp_path / "head.safetensors", info(epoch=0))
    assert torch.equal(loaded(x), head(x))
    assert meta == info() and meta.method == "linear_probe"


@pytest.mark.parametrize("change, message", [
    (dict(dataset="flowers102"), "dataset 'cub200', not 'flowers102'"),
    (dict(model="other/clip"), "model 'some/clip', not 'other/clip'"),
    (dict(n_classes=102), "5 classes, not 102"),
    (dict(classes_hash="0" * 16), "different class list"),
    (dict(embed_dim=768), "embedding size 8, not 768"),
])
def test_a_head_made_for_something_else_is_refused(tmp_path, change, message):
    save_head(tmp_path / "head.safetensors", random_head(), info())
    with pytest.raises(CheckpointMismatchError, match=message) as err:
        load_head(tmp_path / "head.safetensors", info(**change))
    assert "python -m clip_utils probe --dataset" in str(err.value)


def test_a_file_without_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(5, 8), "bias": torch.zeros(5)}, str(tmp_path / "head.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="not a clip-lab head"):
        read_head(tmp_path / "head.safetensors")


def test_missing_checkpoint_names_the_path_and_the_command(kit, tmp_path):
    lab = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path, device="cpu", download=False)
    with pytest.raises(FileNotFoundError, match=r"linear_probe/head.safetensors.*python -m clip_utils probe "
                                                r"--dataset cub200"):
        classifier_for(lab, "cub200", "probe")
    with pytest.raises(FileNotFoundError, match="python -m clip_utils lora --dataset flowers102"):
        classifier_for(lab, "flowers102", "lora")


def test_a_failed_save_keeps_the_previous_head(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "head.safetensors"
    save_head(path, random_head(seed=1), info())
    before = path.read_bytes()

    def dies_mid_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_head(path, random_head(seed=2), info())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["head.safetensors"]


# --------------------------------------------------------------------------- classifiers on the kit


def _test_logits(classifier, lab, dataset="cub200"):
    ds = lab.dataset(dataset, "test")
    pre = Preprocess.from_processor(lab.clip().processor)
    batches = iter_labelled_batches([p for p, _ in ds.samples], torch.tensor(ds.targets), pre, "cpu",
                                    torch.float32, 64, num_workers=0)
    return predict(classifier, batches, torch.device("cpu"))[0]


def _saved_preds(folder):
    with open(folder / "predictions.csv") as f:
        return [int(row["pred"]) for row in csv.DictReader(f)]


@pytest.mark.parametrize("method, folder", [("probe", "linear_probe"), ("lora", "lora")])
def test_reloaded_classifier_reproduces_the_saved_predictions(task2_runs, method, folder):
    lab = task2_runs["lab"]
    first = _test_logits(classifier_for(lab, "cub200", method), lab)
    again = _test_logits(classifier_for(lab, "cub200", method), lab)
    assert torch.equal(first, again)
    assert first.argmax(1).tolist() == _saved_preds(task2_runs["results"] / "cub200" / folder)


def test_lora_adapter_saved_and_reloaded_gives_identical_logits(kit, tmp_path):
    lab = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path, device="cpu", download=False)
    model = load_clip(kit["model"]).model
    vision = add_lora(model.requires_grad_(False).vision_model, LoraSettings())
    with torch.no_grad():  # a trained-looking adapter: B is zero after initialisation
        for name, p in vision.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    names = lab.dataset("cub200", "test").classes
    trained = ClipClassifier(vision, model.visual_projection, random_head(16, len(names))).eval()
    meta = head_info(dataset="cub200", method="lora", model=lab.model, class_names=names, embed_dim=16, epoch=4)
    folder = tmp_path / "cub200" / "lora"
    save_adapter(folder / "adapter", vision, meta)
    save_head(folder / "head.safetensors", trained.head, meta)

    reloaded = classifier_for(lab, "cub200", "lora")
    assert not reloaded.training
    torch.testing.assert_close(_test_logits(reloaded, lab), _test_logits(trained, lab), rtol=0, atol=1e-6)

    # An adapter from another epoch (or run) beside this head is never paired with it.
    save_adapter(folder / "adapter", vision, replace(meta, epoch=5))
    with pytest.raises(CheckpointMismatchError, match="does not belong to the head"):
        classifier_for(lab, "cub200", "lora")


def test_a_head_copied_to_another_dataset_is_refused(task2_runs, tmp_path):
    lab = task2_runs["lab"]
    target = tmp_path / "flowers102" / "linear_probe"
    target.mkdir(parents=True)
    shutil.copy(task2_runs["results"] / "cub200" / "linear_probe" / "head.safetensors", target)
    other = Lab(model=lab.model, data_root=lab.data_root, results_dir=tmp_path, device="cpu", download=False)
    with pytest.raises(CheckpointMismatchError, match=r"dataset 'cub200', not 'flowers102'.*20 classes, not 102"
                                                      r".*python -m clip_utils probe --dataset flowers102"):
        classifier_for(other, "flowers102", "probe")


def test_predict_with_the_probe_and_lora_from_the_cli(task2_runs, kit):
    for method in ("probe", "lora"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["predict", "my_photo/bird.jpg", "--dataset", "cub200", "--method", method, "--json",
                         "--top-k", "3", "--model", str(kit["model"]), "--data-root", str(kit["data"]),
                         "--results-dir", str(task2_runs["results"]), "--device", "cpu"])
        assert code == 0
        (result,) = json.loads(out.getvalue())
        probs = [r["prob"] for r in result["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_method_names(tmp_path):
    assert checkpoints.checkpoint_paths(tmp_path, "cub200", "probe")["head"].parent.name == "linear_probe"
    with pytest.raises(ValueError, match="choose probe or lora"):
        checkpoints.checkpoint_paths(tmp_path, "cub200", "zeroshot")


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_a_damaged_head_is_one_line_naming_the_file_and_the_fix(task2_runs, kit, tmp_path, capsys, damage):
    results = tmp_path / "results"
    shutil.copytree(task2_runs["results"], results, ignore=shutil.ignore_patterns("cache", "figures"))
    head = results / "cub200" / "linear_probe" / "head.safetensors"
    data = head.read_bytes()
    if damage == "truncate":
        head.write_bytes(data[: len(data) // 2])
    else:  # the weights' bytes overwritten with NaN patterns, the header intact
        head.write_bytes(data[: len(data) - 64] + b"\xff" * 64)
    code = main(["predict", str(ROOT / "my_photo" / "bird.jpg"), "--dataset", "cub200", "--method", "probe",
                 "--model", str(kit["model"]), "--data-root", str(kit["data"]), "--results-dir", str(results),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert str(head) in err and "damaged" in err and "python -m clip_utils probe --dataset cub200" in err


def test_a_damaged_lora_adapter_is_one_line_naming_it(task2_runs, kit, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(task2_runs["results"], results, ignore=shutil.ignore_patterns("cache", "figures"))
    (weights,) = (results / "cub200" / "lora" / "adapter").glob("adapter_model.*")
    weights.write_bytes(weights.read_bytes()[:100])  # cut short, as by a full disk
    code = main(["predict", str(ROOT / "my_photo" / "bird.jpg"), "--dataset", "cub200", "--method", "lora",
                 "--model", str(kit["model"]), "--data-root", str(kit["data"]), "--results-dir", str(results),
                 "--device", "cpu"])
    # The adapter is read onto the base model, so the model's load is said first.
    loaded, *errors = capsys.readouterr().err.strip().splitlines()
    err = "\n".join(errors)
    assert code == 1 and "Traceback" not in err and len(errors) == 1 and loaded.startswith("loaded ")
    assert "adapter" in err and "damaged" in err and "python -m clip_utils lora --dataset cub200" in err
