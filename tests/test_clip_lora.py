"""LoRA on the text tower and on both (CLIP-LoRA): exact counts, CLIP's own classifier, resume, reload, preset."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import pytest
import torch
from transformers import CLIPTextConfig, CLIPVisionConfig

from clip_utils import config
from clip_utils.app.cli import _parse, build_parser, main
from clip_utils.app.photos import classifier_for
from clip_utils.config import LoraSettings
from clip_utils.methods.lora import run_lora
from clip_utils.methods.lora_adapters import TextTowerClassifier, attach_adapter, class_tokens
from clip_utils.model.clip import load_clip
from clip_utils.model.heads import count_parameters
from clip_utils.model.inputs import iter_labelled_batches
from clip_utils.model.lora import add_lora, lora_trainable_params
from clip_utils.model.training import predict
from clip_utils.prompts import build_text_classifier
from clip_utils.results.checkpoints import HeadInfo

VIT_L14 = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
VIT_L14_TEXT = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)


def test_clip_lora_count_on_vit_l14_is_both_towers_adapters_and_no_head():
    # q, k, v at r=2: A (2 x d) and B (d x 2) per projection, in 24 vision and 12 text layers.
    vision, text = 24 * 3 * 2 * (1024 + 1024), 12 * 3 * 2 * (768 + 768)
    assert (vision, text) == (294_912, 110_592)
    count = lora_trainable_params(VIT_L14, config.CLIP_LORA_SETTINGS, 102, 768, VIT_L14_TEXT)
    assert count == vision + text  # CLIP's own classifier: no head to train
    text_only = LoraSettings(rank=4, targets=("fc1", "fc2", "out_proj"), encoders="text")
    assert lora_trainable_params(VIT_L14, text_only, 200, 768, VIT_L14_TEXT) == 12 * 4 * (2 * (768 + 3072) + 2 * 768)
    with pytest.raises(ValueError, match="text config"):
        lora_trainable_params(VIT_L14, config.CLIP_LORA_SETTINGS, 102, 768)
    with pytest.raises(ValueError, match="vision, text, both"):
        LoraSettings(encoders="image")


def _text_classifier(model, tokenizer, names, settings: LoraSettings) -> TextTowerClassifier:
    model.requires_grad_(False)
    vision = add_lora(model.vision_model, settings) if settings.adapts_vision else model.vision_model
    text = add_lora(model.text_model, settings)
    tokens = class_tokens(tokenizer, names, ["a photo of a {}, a type of bird."], 77)
    return TextTowerClassifier(vision, model.visual_projection, text, model.text_projection, tokens, 50.0)


@pytest.mark.parametrize("settings", [LoraSettings(encoders="both"),
                                      LoraSettings(rank=3, targets=("k_proj", "out_proj", "fc2"), encoders="text")])
def test_count_from_config_matches_the_model_for_the_text_tower(kit, settings):
    clip = load_clip(kit["model"])
    classifier = _text_classifier(clip.model, clip.tokenizer, ["rose", "tulip", "daisy"], settings)
    trainable, _ = count_parameters(classifier)
    config_ = clip.model.config
    assert trainable == lora_trainable_params(config_.vision_config, settings, 3, config_.projection_dim,
                                              config_.text_config)


def test_clip_lora_classifier_is_zeroshot_clip_then_learns_through_the_text_tower(kit):
    clip = load_clip(kit["model"])
    names = ["Laysan Albatross", "Sooty Albatross", "Crested Auklet"]
    zeroshot = build_text_classifier(clip.model, clip.tokenizer, names, ["a photo of a {}, a type of bird."], "cpu",
                                     progress=False)
    torch.manual_seed(0)
    classifier = _text_classifier(clip.model, clip.tokenizer, names, LoraSettings(encoders="both", dropout=0.0))
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    classifier.eval()
    with torch.no_grad():  # B = 0 at initialisation: exactly zero-shot CLIP at the logit scale
        images = torch.nn.functional.normalize(
            clip.model.visual_projection(clip.model.vision_model(pixel_values=pixels).pooler_output), dim=-1)
        torch.testing.assert_close(classifier(pixels), 50.0 * images @ zeroshot, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(classifier.frozen_head()(images), classifier(pixels), atol=1e-5, rtol=1e-5)
    classifier.train()
    loss = torch.nn.functional.cross_entropy(classifier(pixels), torch.tensor([0, 1, 2, 0]))
    loss.backward()  # the class embeddings are recomputed in the graph: the text adapters get gradients
    text_grads = [p.grad for n, p in classifier.text_model.named_parameters() if "lora_A" in n or "lora_B" in n]
    assert text_grads and all(g is not None for g in text_grads)
    assert any(g.abs().sum() > 0 for g in text_grads)


# --------------------------------------------------------------------------- a real run on the kit


def test_both_encoders_train_with_an_exact_count_and_save_both_adapters(both_lora_run, tiny_clip):
    metrics, folder = both_lora_run["metrics"], both_lora_run["results"] / "cub200" / "lora"
    model, _ = tiny_clip
    expected = lora_trainable_params(model.config.vision_config, both_lora_run["settings"], 20,
                                     model.config.projection_dim, model.config.text_config)
    assert metrics["trainable_params"] == expected
    assert metrics["config"]["lora_encoders"] == "both" and metrics["config"]["lora_targets"][-1] == "fc1"
    for name in ("adapter/adapter_config.json", "text_adapter/adapter_config.json", "head.safetensors",
                 "curves.json", "predictions.csv"):
        assert (folder / name).is_file(), name
    for tower in ("adapter", "text_adapter"):  # each adapter knows the head (and epoch) it belongs with
        recorded = json.loads((folder / tower / "clip_lab.json").read_text())
        assert recorded["encoders"] == "both" and recorded["epoch"] == metrics["best_epoch"]
    assert metrics["peak_vram_mb"] is None  # the probe ran (CPU: no CUDA statistics)


def _test_logits(classifier, lab):
    ds = lab.dataset("cub200", "test")
    batches = iter_labelled_batches([p for p, _ in ds.samples], torch.tensor(ds.targets), lab.preprocess, "cpu",
                                    torch.float32, 64, num_workers=0)
    return predict(classifier, batches, torch.device("cpu"))[0]


def _saved_preds(folder):
    with open(folder / "predictions.csv") as f:
        return [int(row["pred"]) for row in csv.DictReader(f)]


def test_both_encoders_best_checkpoint_reloads_for_test_and_predict(both_lora_run, kit):
    lab, folder = both_lora_run["lab"], both_lora_run["results"] / "cub200" / "lora"
    classifier = classifier_for(lab, "cub200", "lora")
    assert _test_logits(classifier, lab).argmax(1).tolist() == _saved_preds(folder)
    # The head is CLIP's classifier of the best epoch: the domain prompts through the saved text adapter.
    clip = load_clip(kit["model"])
    info = HeadInfo(**json.loads((folder / "text_adapter" / "clip_lab.json").read_text()))
    attach_adapter(clip.model.text_model, folder / "text_adapter", info, "cpu").eval()
    text = build_text_classifier(clip.model, clip.tokenizer, lab.class_names("cub200"),
                                 lab.prompt_sets("cub200")["domain"], "cpu", progress=False)
    torch.testing.assert_close(classifier.head.weight, (text.T * clip.logit_scale).float(), atol=1e-5, rtol=1e-5)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["predict", "my_photo/bird.jpg", "--dataset", "cub200", "--method", "lora", "--json", "--top-k",
                     "3", "--model", str(kit["model"]), "--data-root", str(kit["data"]),
                     "--results-dir", str(both_lora_run["results"]), "--device", "cpu"])
    assert code == 0 and len(json.loads(out.getvalue())[0]["top_k"]) == 3


def test_both_encoders_resume_after_an_interruption_ends_as_the_uninterrupted_run(both_lora_run, tmp_path):
    lab = both_lora_run["lab"].replace(results_dir=tmp_path)
    cfg, settings = both_lora_run["cfg"], both_lora_run["settings"]

    def interrupt(epoch, entry):
        raise KeyboardInterrupt  # Ctrl-C right after epoch 1 was saved

    with pytest.raises(KeyboardInterrupt):
        run_lora(lab, "cub200", cfg, settings, callbacks=[interrupt])
    folder = tmp_path / "cub200" / "lora"
    assert (folder / "resume.pt").is_file() and (folder / "text_adapter" / "adapter_config.json").is_file()
    resumed = run_lora(lab, "cub200", cfg, settings, resume=True)
    uninterrupted = both_lora_run["metrics"]
    curves = [json.loads((f / "cub200" / "lora" / "curves.json").read_text())
              for f in (tmp_path, both_lora_run["results"])]
    for a, b in zip(*curves, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert (a["val_loss"], a["val_acc"]) == pytest.approx((b["val_loss"], b["val_acc"]), rel=1e-5)
    assert resumed["best_epoch"] == uninterrupted["best_epoch"] and resumed["top1"] == uninterrupted["top1"]
    assert _saved_preds(folder) == _saved_preds(both_lora_run["results"] / "cub200" / "lora")


# --------------------------------------------------------------------------- the CLI and the preset


def test_clip_lora_preset_epochs_follow_its_iterations_per_shot():
    assert config.clip_lora_epochs(1020, 102) == 157   # Flowers102: 10 shots, 5000 iterations
    assert config.clip_lora_epochs(5394, 200) == 48    # CUB: capped at 16 shots, 8000 iterations
    assert config.clip_lora_epochs(60600, 101) == 5    # Food-101
    assert config.clip_lora_epochs(10, 1000) == 16     # fewer images than classes still trains


def test_preset_sets_clip_loras_settings_and_explicit_options_win():
    def parse(*extra):
        argv = ["lora", "--dataset", "cub200", "--preset", "clip-lora", *extra]
        return vars(_parse(argv)[1])

    preset = parse()
    assert (preset["rank"], preset["alpha"], preset["dropout"], preset["targets"], preset["encoders"]) == (
        2, 1, 0.25, ["q_proj", "k_proj", "v_proj"], "both")
    assert (preset["lr"], preset["batch_size"], preset["epochs"]) == (2e-4, 32, None)  # epochs: per dataset
    chosen = parse("--rank", "4", "--encoders", "text", "--epochs", "3")
    assert (chosen["rank"], chosen["encoders"], chosen["epochs"], chosen["alpha"]) == (4, "text", 3, 1)


@pytest.mark.parametrize("towers", [["--encoders", "text"], ["--encoders", "both"], ["--preset", "clip-lora"]])
def test_a_head_rate_for_a_run_without_a_head_is_a_usage_error(towers, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["lora", "--dataset", "cub200", *towers, "--head-lr", "0.01", "--device", "cpu"])
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error: --head-lr" in line]
    assert exit_.value.code == 2 and "leave --head-lr out" in line
    # with the vision tower, or left at its default, it is an ordinary option
    assert "head_lr" in build_parser().parse_args(["lora", "--dataset", "cub200", "--head-lr", "0.01"]).given
    assert not hasattr(build_parser().parse_args(["lora", "--dataset", "cub200", "--encoders", "text"]), "given")


def test_cli_text_tower_only_with_the_preset(kit, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["lora", "--dataset", "cub200", "--preset", "clip-lora", "--encoders", "text", "--epochs", "1",
                     "--targets", "q_proj,fc2", "--model", str(kit["model"]), "--data-root", str(kit["data"]),
                     "--results-dir", str(tmp_path), "--device", "cpu", "--workers", "0", "--no-download"])
    assert code == 0, err.getvalue()
    folder = tmp_path / "cub200" / "lora"
    metrics = json.loads((folder / "metrics.json").read_text())
    model = load_clip(kit["model"]).model
    text = model.config.text_config
    assert metrics["trainable_params"] == text.num_hidden_layers * 2 * (2 * text.hidden_size
                                                                       + text.intermediate_size + text.hidden_size)
    assert metrics["config"]["lora_rank"] == 2 and metrics["config"]["warmup"] == 0.0
    assert not (folder / "adapter").exists() and (folder / "text_adapter" / "adapter_config.json").is_file()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["predict", "my_photo/bird.jpg", "--dataset", "cub200", "--method", "all", "--json",
                     "--model", str(kit["model"]), "--data-root", str(kit["data"]), "--results-dir", str(tmp_path),
                     "--device", "cpu"])
    methods = json.loads(out.getvalue())[0]["methods"]
    assert code == 0 and "top_k" in methods["lora"]  # no vision adapter, and still a trained classifier
    assert "error" in methods["linear_probe"]
    # base-to-new's new-class scoring (`score_new`) through the adapted text tower: given the run's
    # own classes, the logits of its own classifier, and not zero-shot CLIP's
    from clip_utils import prompts, registry
    from clip_utils.lab import Lab

    lab = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path, device="cpu", batch_size=32,
              num_workers=0, download=False)
    cub = lab.resolve("cub200")
    logits = registry.get("lora").score_new(lab, cub, cub, shots=None, seed=None, run=metrics)
    torch.testing.assert_close(logits, _test_logits(classifier_for(lab, "cub200", "lora"), lab), atol=1e-5, rtol=0)
    test = lab.features(cub, "test")
    zeroshot = prompts.zeroshot_logits(test.embeddings, lab.text_classifier(cub, "domain"), lab.logit_scale,
                                       lab.logit_bias)
    assert (logits - zeroshot).abs().max() > 5e-5  # one epoch at the preset's rate moves the tiny model's logits a little

def test_both_encoders_few_shot_run_has_its_own_folder_sample_and_reload(kit, tmp_path):
    from clip_utils.lab import Lab
    from clip_utils.methods.lora import load_classifier

    lab = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path, device="cpu", batch_size=32,
              num_workers=0, download=False)
    settings = LoraSettings(encoders="both", rank=2, alpha=1, targets=("q_proj", "v_proj"))
    metrics = run_lora(lab, "cub200", config.TrainConfig(epochs=1, lr=0.02, seed=1), settings, shots=2)
    folder = tmp_path / "cub200" / "lora" / "shots_2" / "seed_1"
    assert (metrics["shots"], metrics["seed"], metrics["head_init"]) == (2, 1, "text")
    samples = json.loads((folder / "samples.json").read_text())
    assert metrics["n_train"] == len(samples["train"]) == 2 * 20 and metrics["n_val"] == len(samples["val"])
    for name in ("samples.json", "metrics.json", "head.safetensors", "adapter/adapter_config.json",
                 "text_adapter/adapter_config.json"):
        assert (folder / name).is_file(), name
    model = load_clip(kit["model"]).model
    assert metrics["trainable_params"] == lora_trainable_params(model.config.vision_config, settings, 20,
                                                                model.config.projection_dim, model.config.text_config)
    classifier = load_classifier(lab, "cub200", shots=2, seed=1)
    assert _test_logits(classifier, lab).argmax(1).tolist() == _saved_preds(folder)
    assert not (tmp_path / "cub200" / "lora" / "metrics.json").exists()  # the full-data run is another folder


def test_both_encoders_score_any_class_set_as_their_own_classifier_does(both_lora_run):
    """Base-to-new's new-class scoring (`score_new`) through the adapted towers: given the run's
    own classes, it reproduces the run's test accuracy (the same prompts through the same towers)."""
    from clip_utils import registry
    from clip_utils.app.base2new import top1

    lab, metrics = both_lora_run["lab"], both_lora_run["metrics"]
    cub = lab.resolve("cub200")
    logits = registry.get("lora").score_new(lab, cub, cub, shots=None, seed=None, run=metrics)
    assert top1(logits, lab.features(cub, "test").labels) == pytest.approx(100 * metrics["top1"], abs=1e-6)
