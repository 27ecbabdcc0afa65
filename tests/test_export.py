"""`export`: one folder, loadable with plain transformers + safetensors, predicting as the run did."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from clip_utils.app.cli import main
from clip_utils.app.export import export_classifier, load_exported
from clip_utils.app.photos import classifier_for
from clip_utils.model.inputs import iter_labelled_batches
from clip_utils.model.training import predict

# What a user of the folder writes: transformers, safetensors and Pillow; no clip_utils anywhere.
PLAIN = r'''
import json, sys
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPProcessor

sys.modules["clip_utils"] = None  # importing it would fail: nothing here may need it
listing = json.load(open(sys.argv[1]))
out = {}
for folder in sys.argv[2:]:
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    head, classes = load_file(f"{folder}/head.safetensors"), json.load(open(f"{folder}/classes.json"))["classes"]
    images = [Image.open(path).convert("RGB") for path, _ in listing]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embedding = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        logits = torch.nn.functional.normalize(embedding, dim=-1) @ head["weight"].T + head["bias"]
    preds = logits.argmax(-1).tolist()
    out[folder] = {"top1": sum(p == y for p, (_, y) in zip(preds, listing)) / len(listing), "n_classes": len(classes)}
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def exported(task2_runs, both_lora_run, tmp_path_factory):
    """`{name: (folder, metrics of the run, lab)}`: the probe, vision LoRA and both-encoders LoRA, exported."""
    root = tmp_path_factory.mktemp("exported")
    runs = {"probe": (task2_runs["lab"], "probe", task2_runs["probe"]),
            "lora": (task2_runs["lab"], "lora", task2_runs["lora"]),
            "both": (both_lora_run["lab"], "lora", both_lora_run["metrics"])}
    return {name: (export_classifier(lab, "cub200", method, root / name), metrics, lab)
            for name, (lab, method, metrics) in runs.items()}


def test_the_folder_holds_a_transformers_model_head_classes_and_readme(exported):
    folder, metrics, _ = exported["both"]
    for name in ("config.json", "model.safetensors", "head.safetensors", "classes.json", "README.md"):
        assert (folder / name).is_file(), name
    info = json.loads((folder / "classes.json").read_text())
    assert info["classes"] == metrics["class_names"] and info["encoders"] == "both"
    assert info["test_top1"] == metrics["top1"] and info["epoch"] == metrics["best_epoch"]
    readme = (folder / "README.md").read_text()
    assert "CLIPModel.from_pretrained" in readme and "clip_utils" not in readme
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:  # LoRA merged: plain CLIP weights only
        assert not [k for k in f.keys() if "lora" in k]


def test_a_fresh_process_with_plain_transformers_gets_the_runs_top1(exported, kit, tmp_path):
    lab = exported["probe"][2]
    listing = tmp_path / "test.json"
    listing.write_text(json.dumps(lab.dataset("cub200", "test").samples))
    script = tmp_path / "plain.py"
    script.write_text(PLAIN)
    folders = [str(folder) for folder, _, _ in exported.values()]
    run = subprocess.run([sys.executable, str(script), str(listing), *folders], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr
    scores = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (folder, metrics, _) in exported.items():
        assert scores[str(folder)]["n_classes"] == 20
        assert scores[str(folder)]["top1"] == pytest.approx(metrics["top1"]), name


def _test_logits(classifier, lab):
    ds = lab.dataset("cub200", "test")
    batches = iter_labelled_batches([p for p, _ in ds.samples], torch.tensor(ds.targets), lab.preprocess, "cpu",
                                    torch.float32, 64, num_workers=0)
    return predict(classifier, batches, torch.device("cpu"))[0]


@pytest.mark.parametrize("name", ["probe", "lora", "both"])
def test_merged_predictions_equal_the_unmerged_models(exported, name):
    folder, _, lab = exported[name]
    merged, _ = load_exported(folder)
    unmerged = classifier_for(lab, "cub200", "probe" if name == "probe" else "lora")
    a, b = _test_logits(merged, lab), _test_logits(unmerged, lab)
    # Merging changes only float32 rounding, which the head scales with the logits: vision LoRA's
    # head starts from the probe (LP-FT) and its raw-unit weights run into the hundreds, so the
    # absolute tolerance is 1e-5 of the largest logit (1e-5 where the logits are small).
    torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-5)
    assert torch.equal(a.argmax(1), b.argmax(1))


def test_cli_predict_with_an_exported_classifier_needs_no_dataset(exported, capsys):
    folder = exported["both"][0]
    code = main(["predict", "my_photo/bird.jpg", "my_photo/missing.jpg", "--classifier", str(folder), "--json",
                 "--top-k", "2", "--device", "cpu"])
    good, bad = json.loads(capsys.readouterr().out)
    assert code == 1 and len(good["top_k"]) == 2 and "not found" in bad["error"]  # one bad photo: exit 1
    names = json.loads((folder / "classes.json").read_text())["classes"]
    assert all(t["name"] == names[t["label"]] for t in good["top_k"])
    with pytest.raises(SystemExit) as usage:
        main(["predict", "my_photo/bird.jpg", "--classifier", str(folder), "--dataset", "cub200"])
    assert usage.value.code == 2 and "--classifier" in capsys.readouterr().err


def test_export_refuses_what_it_cannot_or_must_not_do(kit, tmp_path, exported):
    common = ["--model", str(kit["model"]), "--data-root", str(kit["data"]), "--device", "cpu"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # nothing trained in an empty results folder
        code = main(["export", "--dataset", "cub200", "--method", "lora", "--out", str(tmp_path / "x"),
                     "--results-dir", str(tmp_path / "empty"), *common])
    assert code == 1 and "python -m clip_utils lora --dataset cub200" in err.getvalue()
    assert not (tmp_path / "empty").exists()  # export reads results: a mistyped folder is not made
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    lab = exported["probe"][2]
    with pytest.raises(FileExistsError, match="not an exported classifier"):
        export_classifier(lab, "cub200", "probe", precious)
    assert (precious / "todo.txt").read_text() == "keep me"
    first = export_classifier(lab, "cub200", "probe", tmp_path / "again")
    (first / "stale.txt").write_text("from the first export")
    again = export_classifier(lab, "cub200", "probe", first)  # an earlier export is replaced, whole
    assert (again / "model.safetensors").is_file() and not (again / "stale.txt").exists()


def test_cli_export_prints_one_line_and_no_progress_bar(exported, tmp_path, capsys):
    lab = exported["probe"][2]
    code = main(["export", "--dataset", "cub200", "--method", "probe", "--out", str(tmp_path / "cli"),
                 "--model", lab.model, "--data-root", str(lab.data_root), "--results-dir", str(lab.results_dir),
                 "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0 and out.count("\n") == 1 and "classifier ->" in out
    assert "Writing model shards" not in err and "%|" not in err
