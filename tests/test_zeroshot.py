"""Zero-shot: scoring maths, metrics against scikit-learn, the feature cache, results files, CLI."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from clip_utils import prompts
from clip_utils.data import dataset_spec, load_dataset
from clip_utils.lab import Lab
from clip_utils.methods import zeroshot
from clip_utils.model import features
from clip_utils.results import evaluation

CONTRACT_KEYS = {"dataset", "split", "method", "model", "n", "top1", "top5", "mean_per_class",
                 "class_names", "seconds", "templates", "prompt_set"}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_is_scaled_cosine_similarity():
    f = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    w = torch.nn.functional.normalize(torch.randn(4, 3), dim=0)
    logits = prompts.zeroshot_logits(f, w, 50.0)
    assert logits.shape == (5, 3)
    for i in range(5):
        for c in range(3):
            assert logits[i, c].item() == pytest.approx(50.0 * float(f[i] @ w[:, c]), rel=1e-5)
    with pytest.raises(ValueError, match="same model"):
        prompts.zeroshot_logits(f, torch.randn(6, 3), 50.0)


def test_select_prompt_set_picks_the_best_on_validation():
    feats = torch.eye(3)
    labels = torch.tensor([0, 1, 2])
    right = torch.eye(3)                  # every image to its own class
    half = torch.eye(3)[:, [0, 2, 1]]     # swaps classes 1 and 2
    best, scores = prompts.select_prompt_set(feats, labels, {"half": half, "right": right}, 10.0)
    assert best == "right"
    assert scores == pytest.approx({"half": 1 / 3, "right": 1.0})
    assert prompts.select_prompt_set(feats, labels, {"a": right, "b": right}, 10.0)[0] == "a"  # ties: first


def test_metrics_match_scikit_learn_and_hand_counts(tmp_path):
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, classification_report, top_k_accuracy_score

    rng = np.random.default_rng(0)
    n, c = 300, 12
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), labels] += rng.uniform(0, 3, n)  # better than chance, not perfect
    names = [f"class {i}" for i in range(c)]
    paths = [str(tmp_path / f"{i}.png") for i in range(4)]
    for p in paths:
        Image.new("RGB", (8, 8), "gray").save(p)
    paths = [paths[i % 4] for i in range(n)]
    m = evaluation.save_evaluation(
        tmp_path / "out", logits=torch.tensor(logits), labels=torch.tensor(labels), paths=paths, class_names=names,
        info={"dataset": "toy", "method": "zeroshot"}, figure_prefix="toy", results_dir=tmp_path,
    )
    pred = logits.argmax(1)
    top5_by_hand = np.mean([labels[i] in np.argsort(-logits[i])[:5] for i in range(n)])
    per_class_by_hand = np.mean([(pred[labels == k] == k).mean() for k in range(c)])
    assert m["top1"] == pytest.approx(accuracy_score(labels, pred)) == pytest.approx((pred == labels).mean())
    assert m["top5"] == pytest.approx(top_k_accuracy_score(labels, logits, k=5)) == pytest.approx(top5_by_hand)
    assert m["mean_per_class"] == pytest.approx(balanced_accuracy_score(labels, pred))
    assert m["mean_per_class"] == pytest.approx(per_class_by_hand)
    assert m["n"] == n and m["class_names"] == names

    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m))
    report = (tmp_path / "out" / "classification_report.txt").read_text()
    assert report == classification_report(labels, pred, target_names=names, zero_division=0, digits=3)
    rows = _rows(tmp_path / "out" / "predictions.csv")
    assert [int(r["pred"]) for r in rows] == pred.tolist()
    assert [r["pred_name"] for r in rows] == [names[k] for k in pred]
    # the most confused pairs are counted by name
    top = m["most_confused"][0]
    count = int(((labels == names.index(top["true"])) & (pred == names.index(top["pred"]))).sum())
    assert top["count"] == count and top["true"] != top["pred"]
    for path in evaluation.figure_paths(tmp_path, "toy").values():
        assert path.stat().st_size > 10_000
    excerpt = evaluation.report_excerpt(tmp_path / "out", rows=3)
    assert "class 2" in excerpt and "class 3 " not in excerpt and "9 more classes" in excerpt
    assert "macro avg" in excerpt


def test_save_evaluation_checks_lengths(tmp_path):
    with pytest.raises(ValueError, match="must match"):
        evaluation.save_evaluation(tmp_path, logits=torch.zeros(3, 2), labels=[0, 1], paths=["a", "b"],
                                   class_names=["x", "y"], info={}, figure_prefix="p", results_dir=tmp_path)


# --------------------------------------------------------------------------- feature cache


@pytest.fixture
def encode_calls(monkeypatch):
    """Spy on features.encode_paths: the list of (n images) it was asked to encode."""
    calls = []
    real = features.encode_paths

    def spy(model, paths, *args, **kwargs):
        calls.append(len(paths))
        return real(model, paths, *args, **kwargs)

    monkeypatch.setattr(features, "encode_paths", spy)
    return calls


def _copy_model(src, dst, edit=None, processor_edit=None):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(src)
    if edit:
        edit(model)
    model.save_pretrained(dst)
    processor = CLIPProcessor.from_pretrained(src)
    if processor_edit:
        processor_edit(processor.image_processor)
    processor.save_pretrained(dst)
    return dst


def test_feature_cache_reused_and_invalidated(kit, tmp_path, encode_calls):
    data = tmp_path / "data"
    shutil.copytree(kit["data"] / "CUB_200_2011", data / "CUB_200_2011")
    results = tmp_path / "results"
    # One model folder, rewritten in place: a changed checkpoint must be noticed by its
    # content, not merely by a new path.
    model = _copy_model(kit["model"], tmp_path / "model")

    def features_of(split="test"):
        lab = Lab(model=str(model), data_root=data, results_dir=results, device="cpu", num_workers=0)
        return lab.features("cub200", split)

    first = features_of()
    n_test = len(load_dataset("cub200", data, "test"))
    assert encode_calls == [n_test]
    again = features_of()  # a new Lab: from the disk cache
    assert encode_calls == [n_test]
    torch.testing.assert_close(again.embeddings, first.embeddings)
    # the cost of the encoding travels with the cache, so a reader reports it, not its own read
    assert first.encoding["from_cache"] is False and again.encoding["from_cache"] is True
    assert first.encoding["seconds"] > 0
    assert {k: v for k, v in again.encoding.items() if k != "from_cache"} == {
        k: v for k, v in first.encoding.items() if k != "from_cache"}

    features_of("val")  # another split
    assert len(encode_calls) == 2

    def new_projection(m):
        with torch.no_grad():
            m.visual_projection.weight.mul_(1.5)

    _copy_model(kit["model"], model, edit=new_projection)
    features_of()
    assert len(encode_calls) == 3

    def new_mean(ip):
        ip.image_mean = [0.5, 0.5, 0.5]

    _copy_model(kit["model"], model, processor_edit=new_mean)
    features_of()
    assert len(encode_calls) == 4

    _copy_model(kit["model"], model)  # back to the first checkpoint: its cached features are valid
    features_of()
    assert len(encode_calls) == 4

    # one test image replaced by another picture: the dataset's files changed
    image = load_dataset("cub200", data, "test").samples[0][0]
    Image.new("RGB", (44, 36), "white").save(image)
    changed_files = features_of()
    assert len(encode_calls) == 5
    assert not torch.allclose(changed_files.embeddings[0], first.embeddings[0])
    torch.testing.assert_close(changed_files.embeddings[1:], first.embeddings[1:], atol=1e-5, rtol=1e-4)

    features_of()  # and that new state is cached in turn
    assert len(encode_calls) == 5


def test_feature_cache_sees_a_change_deep_in_the_vision_tower(kit, tmp_path, encode_calls):
    def new_attention(m):
        with torch.no_grad():
            m.vision_model.encoder.layers[0].self_attn.q_proj.weight.mul_(1.5)

    model = tmp_path / "model"
    for edit in (None, new_attention):
        _copy_model(kit["model"], model, edit=edit)
        Lab(model=str(model), data_root=kit["data"], results_dir=tmp_path / "results", device="cpu",
            num_workers=0).features("cub200", "val")
    assert len(encode_calls) == 2


# --------------------------------------------------------------------------- run_zeroshot


@pytest.fixture(scope="module")
def cub_run(kit, tmp_path_factory):
    results = tmp_path_factory.mktemp("zs_cub")
    lab = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=results, device="cpu", num_workers=0)
    return lab, zeroshot.run_zeroshot(lab, "cub200", ["default", "domain_ensemble", "auto"])


def test_run_zeroshot_writes_the_contract(cub_run):
    lab, results = cub_run
    test = load_dataset("cub200", lab.data_root, "test")
    sets = prompts.prompt_sets(dataset_spec("cub200"))
    assert list(results) == ["default", "domain_ensemble", "auto"]
    for name in results:
        folder = lab.results_dir / "cub200" / "zeroshot" / name
        saved = json.loads((folder / "metrics.json").read_text())
        assert CONTRACT_KEYS <= set(saved)
        assert saved["method"] == "zeroshot" and saved["split"] == "test" and saved["prompt_set"] == name
        assert saved["class_names"] == lab.class_names("cub200") and saved["n"] == len(test)
        assert saved["class_names_source"] == "curated"
        assert saved["templates"] == sets[saved.get("selected_set", name)]
        rows = _rows(folder / "predictions.csv")
        assert list(rows[0])[:3] == ["path", "label", "pred"]
        assert [(r["path"], int(r["label"])) for r in rows] == test.samples
        for path in evaluation.figure_paths(lab.results_dir, f"cub200_zeroshot_{name}").values():
            assert path.is_file()
    auto = results["auto"]
    assert auto["selected_set"] in sets and auto["selected_on"] == "val"
    assert set(auto["val_top1"]) == set(sets)
    assert auto["selected_set"] == max(auto["val_top1"], key=auto["val_top1"].get)
    assert (lab.results_dir / "figures" / zeroshot.COMPARISON_FIGURE).is_file()
    assert all(m["peak_vram_mb"] is None for m in results.values())  # recorded, None on CPU


def test_saved_predictions_are_the_prompt_classifier_argmax(cub_run):
    lab, results = cub_run
    model, processor = lab.clip().model, lab.clip().processor
    names = results["domain_ensemble"]["class_names"]
    templates = prompts.prompt_sets(dataset_spec("cub200"))["domain_ensemble"]
    W = prompts.build_text_classifier(model, processor.tokenizer, names, templates, "cpu")
    feats = lab.features("cub200", "test")
    expected = prompts.zeroshot_logits(feats.embeddings, W, lab.clip().logit_scale).argmax(1)
    rows = _rows(lab.results_dir / "cub200" / "zeroshot" / "domain_ensemble" / "predictions.csv")
    assert [int(r["pred"]) for r in rows] == expected.tolist()


def test_tables_read_the_saved_results(cub_run):
    lab, results = cub_run
    table = zeroshot.prompt_table(lab.results_dir)
    assert table == {"cub200": {name: m["top1"] for name, m in results.items()}}
    frame = zeroshot.results_table(lab.results_dir)
    assert list(frame["prompt_set"]) == list(results)
    assert zeroshot.headline(results) == "auto"
    # never the best on test: domain beats a better-scoring set
    assert zeroshot.headline({"diverse": {"top1": 0.9}, "domain": {"top1": 0.3}}) == "domain"
    assert zeroshot.headline({"b": {"top1": 0.1}, "a": {"top1": 0.3}}) == "b"
    summary = zeroshot.summarise({"cub200": results})
    assert summary["cub200"]["auto"]["selected_set"] == results["auto"]["selected_set"]
    json.dumps(summary)


def test_unknown_prompt_set_is_refused_before_any_work(kit, tmp_path, encode_calls):
    lab = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path, device="cpu")
    with pytest.raises(ValueError, match="unknown prompt set 'fancy'.*domain_ensemble"):
        zeroshot.run_zeroshot(lab, "cub200", ["fancy"])
    assert encode_calls == [] and lab._loaded.clip is None


# --------------------------------------------------------------------------- command line


def test_cli_zeroshot_all_prompt_sets(zeroshot_cli_run, kit):
    results, code, out = zeroshot_cli_run
    assert code == 0
    test = load_dataset("flowers102", kit["data"], "test")
    for name in [*prompts.prompt_sets(dataset_spec("flowers102")), "auto"]:
        folder = results / "flowers102" / "zeroshot" / name
        m = json.loads((folder / "metrics.json").read_text())
        assert CONTRACT_KEYS <= set(m) and m["n"] == len(test) == 6149
        assert m["class_names"][0] == "pink primrose" and len(m["class_names"]) == 102
        assert all("{}" in t for t in m["templates"])
        assert len(_rows(folder / "predictions.csv")) == len(test)
        assert name in out
    domain = json.loads((results / "flowers102" / "zeroshot" / "domain" / "metrics.json").read_text())
    assert domain["templates"] == ["a photo of a {}, a type of flower."]
    assert "top-1" in out


def test_cli_zeroshot_unknown_set_is_a_usage_error(kit, tmp_path, capsys):
    from clip_utils.app.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["zeroshot", "--dataset", "cub200", "--prompts", "fancy", "--model", str(kit["model"]),
              "--data-root", str(kit["data"]), "--results-dir", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "unknown prompt set 'fancy'" in err and "Traceback" not in err


def test_validation_run_leaves_the_test_results_alone(cub_run):
    lab, results = cub_run
    test_metrics = (lab.results_dir / "cub200" / "zeroshot" / "default" / "metrics.json").read_text()
    val = zeroshot.run_zeroshot(lab, "cub200", "default", split="val")["default"]
    assert val["split"] == "val" and val["n"] == len(load_dataset("cub200", lab.data_root, "val"))
    folder = zeroshot.output_dir(lab.results_dir, "cub200", "default", "val")
    assert folder == lab.results_dir / "cub200" / "zeroshot" / "default" / "val"
    assert json.loads((folder / "metrics.json").read_text())["split"] == "val"
    assert all(p.is_file() for p in zeroshot.figures(lab.results_dir, "cub200", "default", "val").values())
    assert (lab.results_dir / "cub200" / "zeroshot" / "default" / "metrics.json").read_text() == test_metrics
    assert zeroshot.prompt_table(lab.results_dir)["cub200"]["default"] == results["default"]["top1"]


def test_results_files_get_the_usual_permissions(tmp_path):
    import os

    from clip_utils.runtime.files import write_json

    umask = os.umask(0o022)
    try:
        path = write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_top5_with_five_classes_or_fewer_is_certain():
    from clip_utils.metrics import compute_metrics

    logits = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    m = compute_metrics(logits, torch.tensor([0, 1, 0]), ["a", "b"])
    assert m["top1"] == pytest.approx(1 / 3) and m["top5"] == 1.0


def test_non_finite_embeddings_are_refused_and_never_cached(kit, tmp_path, monkeypatch):
    real = features.encode_paths

    def poisoned(model, paths, *args, **kwargs):
        out = real(model, paths, *args, **kwargs).clone()
        out[3] = float("nan")
        return out

    monkeypatch.setattr(features, "encode_paths", poisoned)
    lab = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path, device="cpu", num_workers=0)
    test = load_dataset("cub200", kit["data"], "test")
    with pytest.raises(RuntimeError, match="non-finite") as err:
        lab.features("cub200", "test")
    assert f"1 of {len(test)} images (first: {test.samples[3][0]})" in str(err.value)
    assert not list(lab.cache_dir.glob("*.safetensors"))


def test_text_classifiers_are_built_once_per_lab(kit, tmp_path, monkeypatch):
    """run_zeroshot, `auto` and the photos share the lab's classifiers (ViT-L/14's text tower is not free)."""
    from clip_utils import prompts
    from clip_utils.app import photos

    built = []
    real = prompts.build_text_classifier

    def spy(model, tokenizer, names, templates, *args, **kwargs):
        built.append(tuple(templates))
        return real(model, tokenizer, names, templates, *args, **kwargs)

    monkeypatch.setattr("clip_utils.lab.build_text_classifier", spy)
    lab = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path, device="cpu", num_workers=0)
    zeroshot.run_zeroshot(lab, "cub200", "all")
    n_sets = len(prompts.prompt_sets(dataset_spec("cub200")))
    assert len(built) == len(set(built)) == n_sets
    photos.predict_photos(lab, ["my_photo/bird.jpg"], "cub200", prompt_set="auto")
    photos.predict_photos(lab, ["my_photo/bird.jpg"], "cub200", prompt_set="domain")
    assert len(built) == n_sets


def test_tables_of_saved_results_keep_to_one_model_or_say_so(tmp_path):
    for model, top1 in (("model-a", 0.5), ("model-b", 0.9)):
        folder = tmp_path / "cub200" / "zeroshot" / ("domain" if model == "model-a" else "default")
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({
            "dataset": "cub200", "method": "zeroshot", "model": model, "prompt_set": folder.name, "n": 4,
            "top1": top1, "top5": 1.0, "mean_per_class": top1, "templates": ["a photo of a {}."]}))
    only_a = zeroshot.results_table(tmp_path, "model-a")
    assert list(only_a["prompt_set"]) == ["domain"] and "model" not in only_a
    assert zeroshot.prompt_table(tmp_path, "model-b") == {"cub200": {"default": 0.9}}
    with pytest.warns(UserWarning, match="2 models"):
        both = zeroshot.results_table(tmp_path)
    assert sorted(both["model"]) == ["model-a", "model-b"]  # mixed: the column says which is which
