"""Every supported family (CLIP, SigLIP, MetaCLIP 2) through zero-shot, the probe, LoRA, export and
photos, checked against the family's own transformers classes called as its model card calls them.

The checkpoints are the test kit's tiny random ones with the real processor and tokenizer classes:
SigLIP with a Gemma tokenizer (SigLIP 2's fixed-resolution layout; a SiglipTokenizer variant runs
where transformers can build that class, which needs protobuf), MetaCLIP 2 with an XLM-R tokenizer.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from clip_utils import testkit
from clip_utils.config import LoraSettings, TrainConfig
from clip_utils.errors import UserError
from clip_utils.lab import Lab
from clip_utils.model.backbones import BACKBONES, UnsupportedModel
from clip_utils.model.clip import load_clip

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("clip", "siglip", "metaclip_2")
HAS_PROTOBUF = importlib.util.find_spec("google") is not None and \
    importlib.util.find_spec("google.protobuf") is not None
needs_protobuf = pytest.mark.skipif(not HAS_PROTOBUF, reason="transformers builds SiglipTokenizer only with protobuf")
# What each model card passes its processor for text (SigLIP: "important: we pass padding=max_length").
CARD_TEXT = {"clip": {"padding": True}, "metaclip_2": {"padding": True},
             "siglip": {"padding": "max_length", "max_length": 64}}
# LoRA on the attention projections, out_proj included: SigLIP's pooling head has an out_proj too.
LORA = LoraSettings(rank=4, alpha=8, targets=("q_proj", "v_proj", "out_proj"))


@pytest.fixture(scope="module")
def family_kit(tmp_path_factory) -> dict:
    """`{"models": {family: folder}, "data": root}`: each family's tiny checkpoint and a small
    synthetic CUB (10 classes, 6 train and 3 test images each), built once for the module."""
    root = tmp_path_factory.mktemp("families")
    models = {"clip": testkit.make_tiny_clip(root / "clip"), "siglip": testkit.make_tiny_siglip(root / "siglip"),
              "metaclip_2": testkit.make_tiny_metaclip2(root / "metaclip_2")}
    if HAS_PROTOBUF:
        models["siglip_sentencepiece"] = testkit.make_tiny_siglip(root / "siglip_spm", tokenizer="sentencepiece")
    testkit.make_cub200(root / "data", n_classes=10)
    return {"models": models, "data": root / "data"}


def family_of(name: str) -> str:
    return "siglip" if name.startswith("siglip") else name


def make_lab(family_kit, name: str, results: Path) -> Lab:
    return Lab(model=str(family_kit["models"][name]), data_root=family_kit["data"], results_dir=results,
               device="cpu", batch_size=32, num_workers=0, download=False)


@pytest.fixture(scope="module")
def runs(family_kit, tmp_path_factory) -> dict:
    """Per family: zero-shot (`default`), the L-BFGS probe and one epoch of vision LoRA, run once."""
    from clip_utils.methods.lora import run_lora
    from clip_utils.methods.probe import run_probe
    from clip_utils.methods.zeroshot import run_zeroshot

    out = {}
    for name in FAMILIES:
        lab = make_lab(family_kit, name, tmp_path_factory.mktemp(f"results_{name}"))
        out[name] = {"lab": lab, "zeroshot": run_zeroshot(lab, "cub200", ["default"])["default"],
                     "probe": run_probe(lab, "cub200", solver="lbfgs"),
                     "lora": run_lora(lab, "cub200", TrainConfig(epochs=1, lr=0.02, head_lr=5e-3, augment=True),
                                      LORA)}
    return out


def test_load_clip_reads_the_family_from_config_json(family_kit):
    classes = {"clip": ("CLIPModel", "CLIPProcessor", "CLIPTokenizer"),
               "siglip": ("SiglipModel", "SiglipProcessor", "GemmaTokenizer"),
               "metaclip_2": ("MetaClip2Model", "CLIPProcessor", "XLMRobertaTokenizer")}
    for name, (model, processor, tokenizer) in classes.items():
        clip = load_clip(family_kit["models"][name])
        assert clip.backbone is BACKBONES[name]
        assert (type(clip.model).__name__, type(clip.processor).__name__, type(clip.tokenizer).__name__) == \
            (model, processor, tokenizer)
        assert clip.backbone.model_class == model and clip.tokenizer.padding_side == "right"
    siglip = load_clip(family_kit["models"]["siglip"])
    assert siglip.embed_dim == siglip.model.config.vision_config.hidden_size  # no projection: the pooled output
    assert siglip.logit_bias == pytest.approx(-1.0) and siglip.backbone.probabilities == "sigmoid"
    assert siglip.backbone.text_kwargs(siglip.model) == {"padding": "max_length", "truncation": True, "max_length": 64}
    assert siglip.preprocess.crop is None and siglip.preprocess.resize == (32, 32)  # squash, no crop
    assert siglip.preprocess.mean == (0.5, 0.5, 0.5) and siglip.preprocess.std == (0.5, 0.5, 0.5)
    for name in FAMILIES:  # the family's image processor, read without the weights
        lab = Lab(model=str(family_kit["models"][name]), device="cpu")
        assert lab.preprocess == load_clip(family_kit["models"][name]).preprocess and lab._loaded.clip is None


def _test_images(lab: Lab) -> tuple[list[str], list[Image.Image]]:
    samples = lab.dataset("cub200", "test").samples
    return [p for p, _ in samples], [Image.open(p).convert("RGB") for p, _ in samples]


@torch.no_grad()
def card_logits(folder: Path, family: str, images: list[Image.Image], texts: list[str],
                text_kwargs: dict | None = None) -> torch.Tensor:
    """`logits_per_image` as the family's model card computes them: its own model and processor
    classes, one processor call for images and texts, text padded as the card pads it."""
    import transformers

    backbone = BACKBONES[family]
    model = getattr(transformers, backbone.model_class).from_pretrained(folder).eval()
    processor = getattr(transformers, backbone.processor_class).from_pretrained(folder)
    inputs = processor(text=texts, images=images, return_tensors="pt", **(text_kwargs or CARD_TEXT[family]))
    return model(**inputs).logits_per_image


def _prompts(lab: Lab) -> list[str]:
    return [f"a photo of a {name}." for name in lab.class_names("cub200")]


@pytest.mark.parametrize("name", FAMILIES)
def test_zeroshot_predicts_as_the_model_card_does(runs, family_kit, name):
    lab = runs[name]["lab"]
    paths, images = _test_images(lab)
    prompts = _prompts(lab)
    lengths = {len(lab.clip().tokenizer(p)["input_ids"]) for p in prompts}
    assert max(lengths) - min(lengths) >= 4  # prompts of clearly different lengths
    expected = card_logits(family_kit["models"][name], name, images, prompts).argmax(1).tolist()
    folder = lab.results_dir / "cub200" / "zeroshot" / "default"
    with open(folder / "predictions.csv") as f:
        ours = {row["path"]: int(row["pred"]) for row in csv.DictReader(f)}
    assert [ours[p] for p in paths] == expected
    assert runs[name]["zeroshot"]["logit_bias"] == pytest.approx(load_clip(family_kit["models"][name]).logit_bias)
    assert runs[name]["zeroshot"]["probabilities"] == BACKBONES[name].probabilities


def test_a_padding_mistake_would_change_siglips_answers(runs, family_kit):
    """The check above can tell: padded to the longest prompt, SigLIP's text embeddings move."""
    lab = runs["siglip"]["lab"]
    _, images = _test_images(lab)
    right = card_logits(family_kit["models"]["siglip"], "siglip", images, _prompts(lab))
    wrong = card_logits(family_kit["models"]["siglip"], "siglip", images, _prompts(lab), {"padding": True})
    assert not torch.equal(right.argmax(1), wrong.argmax(1))


@needs_protobuf
def test_siglips_own_sentencepiece_tokenizer_predicts_as_the_card(family_kit, tmp_path):
    from clip_utils.methods.zeroshot import load_classifier

    lab = make_lab(family_kit, "siglip_sentencepiece", tmp_path)
    assert type(lab.clip().tokenizer).__name__ == "SiglipTokenizer"
    _, images = _test_images(lab)
    classifier = load_classifier(lab, "cub200", "default")
    pixels = torch.stack([lab.preprocess.transform()(im) for im in images])
    with torch.no_grad():
        ours = classifier(pixels)
    theirs = card_logits(family_kit["models"]["siglip_sentencepiece"], "siglip", images, _prompts(lab))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_photo_probabilities_are_the_familys_own(runs, family_kit, name):
    from clip_utils.app.photos import load_photo, predict_photos

    lab = runs[name]["lab"]
    photo = ROOT / "my_photo" / "bird.jpg"
    [result] = predict_photos(lab, [photo], "cub200", prompt_set="default", top_k=10)
    kind = BACKBONES[name].probabilities
    assert result["probabilities"] == kind == ("sigmoid" if name == "siglip" else "softmax")
    # The photo as predict reads it (a large JPEG is decoded at reduced scale), then the card's way.
    logits = card_logits(family_kit["models"][name], name, [load_photo(photo)], _prompts(lab))[0]
    theirs = logits.sigmoid() if kind == "sigmoid" else logits.softmax(-1)
    ours = torch.tensor([t["prob"] for t in sorted(result["top_k"], key=lambda t: t["label"])])
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    if kind == "sigmoid":
        assert abs(float(ours.sum()) - 1.0) > 1e-3  # per class, not a distribution over classes
    [probe] = predict_photos(lab, [photo], "cub200", method="probe", top_k=3)
    assert probe["probabilities"] == "softmax"  # a head trained with cross-entropy, whatever the family


@pytest.mark.parametrize("name", FAMILIES)
def test_the_probe_and_lora_run_on_every_family(runs, name):
    probe, lora = runs[name]["probe"], runs[name]["lora"]
    assert probe["solver"] == "lbfgs" and probe["n"] == 30 and 0.0 <= probe["top1"] <= 1.0
    assert probe["top1"] > 0.2  # class-coded colours: a probe on any random tower beats chance (0.1)
    assert lora["epochs"] == 1 and lora["n"] == 30
    lab = runs[name]["lab"]
    config = lab.checkpoint().model.config.vision_config
    # r * (d + d) per target and layer (every target is hidden x hidden), plus the head.
    adapters = config.num_hidden_layers * len(LORA.targets) * LORA.rank * 2 * config.hidden_size
    assert lora["trainable_params"] == adapters + lab.checkpoint().embed_dim * 10 + 10


@pytest.mark.parametrize("name", FAMILIES)
def test_the_text_tower_classifier_starts_at_the_model_cards_logits(family_kit, name, tmp_path):
    """LoRA on the text tower classifies as the family does: prompts padded as its card pads
    them, its projections (or none), scale and bias; peft's B starts at zero, so before any step
    the logits are the card's."""
    from clip_utils.methods.lora_adapters import TextTowerClassifier, class_tokens
    from clip_utils.model.lora import add_lora

    clip = load_clip(family_kit["models"][name]).copy()
    lab = make_lab(family_kit, name, tmp_path)
    prompts = _prompts(lab)
    vision, projection = clip.backbone.image_parts(clip.model)
    text, text_projection = clip.backbone.text_parts(clip.model)
    tokens = class_tokens(clip.tokenizer, lab.class_names("cub200"), ["a photo of a {}."],
                          clip.model.config.text_config.max_position_embeddings, clip.backbone.text_kwargs(clip.model))
    classifier = TextTowerClassifier(vision, projection, add_lora(text, LORA), text_projection, tokens,
                                     clip.logit_scale, clip.logit_bias).eval()
    _, images = _test_images(lab)
    pixels = torch.stack([lab.preprocess.transform()(im) for im in images])
    with torch.no_grad():
        ours = classifier(pixels)
    torch.testing.assert_close(ours, card_logits(family_kit["models"][name], name, images, prompts),
                               atol=1e-4, rtol=1e-4)


def test_lora_on_both_siglip_towers_trains_the_encoder_layers_only(family_kit, tmp_path):
    from clip_utils.methods.lora import run_lora

    lab = make_lab(family_kit, "siglip", tmp_path)
    settings = LoraSettings(rank=2, alpha=4, targets=("q_proj", "v_proj", "out_proj", "fc1"), encoders="both")
    metrics = run_lora(lab, "cub200", TrainConfig(epochs=1, lr=0.02), settings)
    config = lab.checkpoint().model.config
    per_tower = {tower: c.num_hidden_layers * settings.rank * (3 * 2 * c.hidden_size + c.hidden_size
                                                              + c.intermediate_size)
                 for tower, c in (("vision", config.vision_config), ("text", config.text_config))}
    assert metrics["head_init"] == "text" and metrics["trainable_params"] == sum(per_tower.values())


def test_lora_on_siglip_adapts_the_encoder_layers_only(family_kit):
    """SigLIP's attention-pooling head holds an `out_proj` (in nn.MultiheadAttention, whose forward
    never calls it): bare target names would wrap it; our targets stop at the encoder layers."""
    from peft import LoraConfig, get_peft_model

    from clip_utils.model.heads import count_parameters
    from clip_utils.model.lora import add_lora, quiet_peft

    clip = load_clip(family_kit["models"]["siglip"])
    config = clip.model.config.vision_config
    vision = add_lora(clip.copy().model.vision_model, LORA)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in vision.named_parameters() if ".lora_A" in n}
    assert adapted and all(".encoder.layers." in n for n in adapted)
    assert len(adapted) == config.num_hidden_layers * 3
    assert count_parameters(vision)[0] == config.num_hidden_layers * 3 * LORA.rank * 2 * config.hidden_size
    with quiet_peft():  # what bare names would have done
        naive = get_peft_model(clip.copy().model.vision_model, LoraConfig(r=4, target_modules=list(LORA.targets)))
    assert any("head.attention.out_proj.lora_A" in n for n, _ in naive.named_parameters())


@pytest.mark.parametrize("name", FAMILIES)
def test_the_text_tower_takes_token_embeddings(family_kit, name):
    """Prompt learning's hook: the text tower from token embeddings equals it from token ids."""
    clip = load_clip(family_kit["models"][name])
    backbone, model = clip.backbone, clip.model
    tokens = clip.tokenizer(["a photo of a rose.", "a photo of a black footed albatross, a type of bird."],
                            return_tensors="pt", **backbone.text_kwargs(model))
    with torch.no_grad():
        expected = model.get_text_features(**tokens).pooler_output
        embeds = backbone.token_embedding(model)(tokens["input_ids"])
        got = backbone.text_from_embeddings(model, embeds, tokens["attention_mask"],
                                            backbone.pool_positions(model, tokens["input_ids"]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# What a user of an exported folder writes: transformers, safetensors and Pillow; no clip_utils.
PLAIN = r'''
import json, sys
import torch, transformers
from PIL import Image
from safetensors.torch import load_file

sys.modules["clip_utils"] = None
listing = json.load(open(sys.argv[1]))
out = {}
for folder in sys.argv[2:]:
    info = json.load(open(f"{folder}/classes.json"))
    model = getattr(transformers, info["model_class"]).from_pretrained(folder).eval()
    processor = getattr(transformers, info["processor_class"]).from_pretrained(folder)
    head = load_file(f"{folder}/head.safetensors")
    images = [Image.open(path).convert("RGB") for path, _ in listing]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        embedding = model.visual_projection(pooled) if hasattr(model, "visual_projection") else pooled
        logits = torch.nn.functional.normalize(embedding, dim=-1) @ head["weight"].T + head["bias"]
    preds = logits.argmax(-1).tolist()
    out[folder] = {"top1": sum(p == y for p, (_, y) in zip(preds, listing)) / len(listing),
                   "model": type(model).__name__}
print(json.dumps(out))
'''


def test_exports_reload_and_reproduce_each_runs_top1(runs, tmp_path):
    from clip_utils.app.export import export_classifier, load_exported
    from clip_utils.model.inputs import iter_labelled_batches
    from clip_utils.model.training import predict

    folders = {}
    for name in FAMILIES:
        lab, metrics = runs[name]["lab"], runs[name]["lora"]
        folder = folders[name] = export_classifier(lab, "cub200", "lora", tmp_path / name)
        info = json.loads((folder / "classes.json").read_text())
        backbone = BACKBONES[name]
        assert (info["backbone"], info["model_class"], info["probabilities"]) == (name, backbone.model_class, "softmax")
        assert f"{backbone.model_class}.from_pretrained" in (folder / "README.md").read_text()
        assert json.loads((folder / "config.json").read_text())["model_type"] == name
        classifier, _ = load_exported(folder)
        test = lab.dataset("cub200", "test")
        batches = iter_labelled_batches([p for p, _ in test.samples], torch.tensor(test.targets), lab.preprocess,
                                        "cpu", torch.float32, 64, num_workers=0)
        logits, labels = predict(classifier, batches, torch.device("cpu"))
        assert float((logits.argmax(1) == labels).float().mean()) == pytest.approx(metrics["top1"])
    listing = tmp_path / "test.json"
    listing.write_text(json.dumps(runs["clip"]["lab"].dataset("cub200", "test").samples))
    script = tmp_path / "plain.py"
    script.write_text(PLAIN)
    run = subprocess.run([sys.executable, str(script), str(listing), *map(str, folders.values())], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr
    scores = json.loads(run.stdout.strip().splitlines()[-1])
    for name, folder in folders.items():
        assert scores[str(folder)]["model"] == BACKBONES[name].model_class
        assert scores[str(folder)]["top1"] == pytest.approx(runs[name]["lora"]["top1"]), name


def test_the_feature_cache_key_names_the_family(runs):
    from clip_utils.model.features import cache_key

    for name in FAMILIES:
        lab = runs[name]["lab"]
        key = cache_key(lab.clip().model, lab.dataset("cub200", "test"), lab.preprocess, True, lab.clip().fingerprint)
        assert key["backbone"] == name


def _fake_checkpoint(folder: Path, config: dict) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"not weights: loading them would fail differently")
    return folder


def test_a_siglip2_naflex_checkpoint_is_refused_in_one_line_naming_the_alternative(tmp_path):
    folder = _fake_checkpoint(tmp_path / "naflex", {"model_type": "siglip2", "architectures": ["Siglip2Model"]})
    with pytest.raises(UnsupportedModel) as err:
        load_clip(folder)
    message = str(err.value)
    assert "\n" not in message and "siglip2" in message and "google/siglip2-base-patch16-224" in message


def test_another_kind_of_model_is_refused_before_its_weights_load(tmp_path, family_kit, capsys):
    from clip_utils.app.cli import main

    folder = _fake_checkpoint(tmp_path / "vit", {"model_type": "vit", "architectures": ["ViTForImageClassification"]})
    with pytest.raises(UnsupportedModel) as err:
        load_clip(folder)
    message = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in message and "'vit'" in message
    assert all(b.label in message for b in BACKBONES.values())
    code = main(["zeroshot", "--dataset", "cub200", "--prompts", "default", "--model", str(folder), "--data-root",
                 str(family_kit["data"]), "--results-dir", str(tmp_path / "r"), "--device", "cpu", "--no-download"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "'vit'" in lines[0]
