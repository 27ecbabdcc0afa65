"""Model loading, preprocessing from the processor, and failing fast offline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from clip_utils.model import clip as models
from clip_utils.model import heads
from clip_utils.model.clip import ModelUnavailableError, load_clip
from clip_utils.model.preprocess import Preprocess


def test_tiny_clip_loads_with_from_pretrained(tiny_clip):
    model, processor = tiny_clip
    assert model.config.vision_config.image_size == 32
    ids = processor.tokenizer("a photo of a rose.")["input_ids"]
    assert processor.tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "aphotoofarose."


def test_preprocess_comes_from_the_processor(tiny_clip):
    _, processor = tiny_clip
    pre = Preprocess.from_processor(processor)
    ip = processor.image_processor
    assert pre.crop == (ip.crop_size["height"], ip.crop_size["width"]) == (32, 32)
    assert pre.resize == ip.size["shortest_edge"]
    assert pre.mean == tuple(ip.image_mean) and pre.std == tuple(ip.image_std)


def test_transform_matches_the_hf_processor(tiny_clip):
    from PIL import Image

    _, processor = tiny_clip
    photo = Image.open(str(Path(models.__file__).parents[2] / "my_photo" / "flower.png")).convert("RGB")
    ours = Preprocess.from_processor(processor).transform()(photo)
    theirs = processor(images=photo, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 32, 32)
    assert (ours - theirs).abs().mean() < 1e-3


def test_image_embeddings_are_normalised(tiny_clip):
    model, _ = tiny_clip
    emb = heads.image_embeddings(model, torch.randn(3, 3, 32, 32))
    assert emb.shape == (3, model.config.projection_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


def test_the_classifier_head_runs_in_full_precision_under_autocast(tiny_clip):
    """bf16 logits (8-bit mantissa) would flip close calls between classes."""
    model, _ = tiny_clip
    head = torch.nn.Linear(model.config.projection_dim, 5)
    classifier = heads.ClipClassifier(model.vision_model, model.visual_projection, head)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = classifier(pixels)
        embeddings = classifier.embed(pixels)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, head(embeddings.float()))


def test_missing_model_offline_fails_fast_naming_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match="openai/clip-vit-large-patch14.*make demo"):
        load_clip("openai/clip-vit-large-patch14")
    assert time.perf_counter() - start < 30


def test_missing_model_without_network_fails_fast(monkeypatch, tmp_path):
    # A user who forgot HF_HUB_OFFLINE: the reachability probe answers instead of retries.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(models, "reachable", lambda url: (False, "Name or service not known"))
    with pytest.raises(ModelUnavailableError, match="unreachable"):
        load_clip("someone/clip-model")


def test_folder_without_model_is_named(tmp_path):
    with pytest.raises(ModelUnavailableError, match="does not hold a CLIP model"):
        load_clip(tmp_path)


def test_zeroshot_head_reproduces_text_logits():
    text = torch.nn.functional.normalize(torch.randn(8, 5), dim=0)
    head = heads.zeroshot_head(text, logit_scale=100.0)
    x = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    torch.testing.assert_close(head(x), 100.0 * x @ text)


def test_model_in_the_local_hub_cache_loads_without_network(kit, tmp_path):
    """A model downloaded once loads from the cache later, with no network and no HF_HUB_OFFLINE."""
    import os
    import shutil
    import subprocess
    import sys

    snapshot = tmp_path / "hub" / "models--someorg--tiny-clip" / "snapshots" / "0123abcd"
    shutil.copytree(kit["model"], snapshot)
    (tmp_path / "hub" / "models--someorg--tiny-clip" / "refs").mkdir()
    (tmp_path / "hub" / "models--someorg--tiny-clip" / "refs" / "main").write_text("0123abcd")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT="http://127.0.0.1:9")
    code = "from clip_utils.model.clip import load_clip; clip = load_clip('someorg/tiny-clip'); print(type(clip.model).__name__)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "CLIPModel"


def test_the_labs_preprocessing_needs_no_weights(kit, tmp_path):
    from clip_utils.lab import Lab

    lab = Lab(model=str(kit["model"]), results_dir=tmp_path, device="cpu")
    pre = lab.preprocess
    assert lab._loaded.clip is None  # read from the processor config alone
    assert pre == lab.clip().preprocess
