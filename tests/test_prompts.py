"""Prompt sets and the ensembled text classifier, checked against hand computations."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from clip_utils import prompts
from clip_utils.data import dataset_spec
from clip_utils.prompts import build_text_classifier, prompt_sets, resolve, waffle


def test_contract_sets():
    flowers, birds = prompt_sets(dataset_spec("flowers102")), prompt_sets(dataset_spec("cub200"))
    assert flowers["default"] == birds["default"] == ["a photo of a {}."]
    assert flowers["domain"] == ["a photo of a {}, a type of flower."]
    assert birds["domain"] == ["a photo of a {}, a type of bird."]
    assert len(flowers["diverse"]) > 5 and len(flowers["domain_ensemble"]) > 5
    assert all("flower" in t for t in flowers["domain_ensemble"])
    assert all("bird" in t for t in birds["domain_ensemble"])
    for sets in (flowers, birds):
        for templates in sets.values():
            assert all(t.count("{}") == 1 for t in templates)
            assert len(set(templates)) == len(templates)


def test_prompt_sets_are_copies():
    prompt_sets(dataset_spec("cub200"))["default"].append("oops {}")
    assert prompt_sets(dataset_spec("cub200"))["default"] == ["a photo of a {}."]


def test_resolve_all_auto_and_lists():
    every = [*prompt_sets(dataset_spec("flowers102")), "auto"]
    assert resolve(["all"], dataset_spec("flowers102")) == every
    assert resolve("domain, default,domain", dataset_spec("flowers102")) == ["domain", "default"]
    assert resolve(["default", "all"], dataset_spec("cub200")) == every


@pytest.mark.parametrize("names", [["fancy"], "domain,nope", []])
def test_resolve_unknown_names_list_the_choices(names):
    with pytest.raises(ValueError, match="domain_ensemble.*all"):
        resolve(names, dataset_spec("cub200"))


def test_unknown_dataset():
    with pytest.raises(ValueError, match="imagenet.*flowers102"):
        prompt_sets(dataset_spec("imagenet"))


# --------------------------------------------------------------------------- ensembling maths

# Known text embeddings per prompt: deliberately of different lengths, so a plain average
# (without normalising each prompt first) gives a different direction.
VECTORS = {
    "a photo of a rose.": [3.0, 0.0, 0.0],
    "a drawing of a rose.": [0.0, 4.0, 0.0],
    "a photo of a tulip.": [0.0, 0.0, 2.0],
    "a drawing of a tulip.": [1.0, 0.0, 1.0],
    "a photo of a daisy.": [0.0, -1.0, 0.0],
    "a drawing of a daisy.": [0.0, -5.0, 5.0],
}


class FakeTokenizer:
    """Tokenises a prompt to its index in VECTORS; records every batch."""

    def __init__(self):
        self.batches = []

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        self.batches.append(list(texts))
        ids = torch.tensor([[list(VECTORS).index(t)] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class FakeModel:
    """`get_text_features` like transformers 5 (an output object) or 4 (a tensor)."""

    config = SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=77))

    def __init__(self, returns_tensor: bool):
        self.returns_tensor = returns_tensor

    def get_text_features(self, input_ids, attention_mask=None):
        table = torch.tensor(list(VECTORS.values()))
        emb = table[input_ids[:, 0]]
        return emb if self.returns_tensor else SimpleNamespace(pooler_output=emb)


def _unit(v):
    v = torch.tensor(v, dtype=torch.float32)
    return v / v.norm()


@pytest.mark.parametrize("returns_tensor", [False, True])
@pytest.mark.parametrize("batch_size", [1, 2, 4, 256])
def test_ensemble_is_the_normalised_mean_of_normalised_embeddings(returns_tensor, batch_size):
    tokenizer = FakeTokenizer()
    templates = ["a photo of a {}.", "a drawing of a {}."]
    W = build_text_classifier(FakeModel(returns_tensor), tokenizer, ["rose", "tulip", "daisy"], templates,
                              "cpu", batch_size=batch_size)
    # By hand: rose = unit(unit(3,0,0) + unit(0,4,0)) = (1,1,0)/sqrt2, tulip = unit((0,0,1) +
    # (1,0,1)/sqrt2), daisy = unit((0,-1,0) + (0,-1,1)/sqrt2).
    s = 2 ** -0.5
    expected = torch.stack([_unit([s, s, 0]), _unit([s, 0, 1 + s]), _unit([0, -1 - s, s])], dim=1)
    assert W.shape == (3, 3) and W.dtype == torch.float32
    torch.testing.assert_close(W, expected)
    # A plain mean of raw embeddings would point elsewhere for rose: (0.6, 0.8, 0).
    assert not torch.allclose(W[:, 0], _unit([1.5, 2.0, 0]))
    # Whole classes stay in one batch; every prompt is encoded exactly once.
    assert sorted(p for b in tokenizer.batches for p in b) == sorted(VECTORS)
    assert all(len(b) % len(templates) == 0 for b in tokenizer.batches)


def test_single_template_is_the_normalised_text_embedding(tiny_clip):
    model, processor = tiny_clip
    names = ["pink primrose", "Black footed Albatross", "a" * 200]  # the last one needs truncating
    W = build_text_classifier(model, processor.tokenizer, names, ["a photo of a {}."], "cpu")
    assert W.shape == (model.config.projection_dim, 3)
    tokens = processor.tokenizer([f"a photo of a {n}." for n in names[:2]], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(**tokens)
    emb = out if isinstance(out, torch.Tensor) else out.pooler_output
    torch.testing.assert_close(W[:, :2], F.normalize(emb, dim=-1).T, atol=1e-5, rtol=1e-5)


def test_real_model_ensemble_matches_hand_average(tiny_clip):
    model, processor = tiny_clip
    templates = ["a photo of a {}.", "itap of a {}.", "art of the {}."]
    W = build_text_classifier(model, processor.tokenizer, ["rose"], templates, "cpu")
    singles = [build_text_classifier(model, processor.tokenizer, ["rose"], [t], "cpu")[:, 0] for t in templates]
    torch.testing.assert_close(W[:, 0], F.normalize(torch.stack(singles).mean(0), dim=0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(W.norm(dim=0), torch.ones(1))


@pytest.mark.parametrize("templates,match", [([], "at least one"), (["a photo."], "exactly one"),
                                             (["{} and {}"], "exactly one")])
def test_bad_templates(templates, match):
    with pytest.raises(ValueError, match=match):
        build_text_classifier(FakeModel(False), FakeTokenizer(), ["rose"], templates, "cpu")


def test_fill():
    assert prompts.fill(["a {}.", "the {}!"], "rose") == ["a rose.", "the rose!"]


# --------------------------------------------------------------------------- per-class sets, waffle


@pytest.mark.parametrize("batch_size", [1, 2, 3, 256])
def test_per_class_prompts_average_each_classes_own_prompts(batch_size):
    tokenizer = FakeTokenizer()
    per_class = {"rose": ["a photo of a rose.", "a drawing of a rose."], "tulip": ["a photo of a tulip."],
                 "daisy": ["a photo of a daisy.", "a drawing of a daisy.", "a drawing of a tulip."]}
    W = build_text_classifier(FakeModel(False), tokenizer, ["rose", "tulip", "daisy"], per_class, "cpu",
                              batch_size=batch_size)
    s = 2 ** -0.5
    daisy = _unit([0, -1, 0]) + _unit([0, -5, 5]) + _unit([1, 0, 1])
    expected = torch.stack([_unit([s, s, 0]), _unit([0, 0, 1]), daisy / daisy.norm()], dim=1)
    torch.testing.assert_close(W, expected)
    # Whole classes per batch, at most batch_size prompts unless one class alone has more.
    sizes = {p: len(ps) for ps in per_class.values() for p in ps}
    assert all(len(b) <= max(batch_size, sizes[b[0]]) for b in tokenizer.batches)
    assert sorted(p for b in tokenizer.batches for p in b) == sorted(p for ps in per_class.values() for p in ps)


def test_a_per_class_set_must_cover_every_class():
    with pytest.raises(ValueError, match="no prompts for 1 classes: daisy"):
        build_text_classifier(FakeModel(False), FakeTokenizer(), ["rose", "daisy"],
                              {"rose": ["a photo of a rose."], "daisy": []}, "cpu")


def test_prompts_per_class_counts_templates_or_the_mean_of_a_per_class_set():
    assert prompts.prompts_per_class(["a {}.", "the {}."]) == 2
    assert prompts.prompts_per_class({"rose": ["a", "b", "c"], "tulip": ["d"]}) == 2.0


def test_waffle_is_seeded_random_descriptors_in_the_dataset_domain():
    birds = prompt_sets(dataset_spec("cub200"))["waffle"]
    assert birds == prompt_sets(dataset_spec("cub200"), seed=0)["waffle"] != prompt_sets(dataset_spec("cub200"), seed=1)["waffle"]
    assert len(birds) == 2 * prompts.WAFFLE_COUNT == 30
    assert all(t.startswith("a photo of a {}, a type of bird, which has ") and t.endswith(".") for t in birds)
    words, chars = birds[0::2], birds[1::2]  # random-word and random-character descriptors alternate
    descriptor = len("a photo of a {}, a type of bird, which has ")
    assert all(all(w in waffle.WORDS for w in t[descriptor:-1].split()) for t in words)
    assert all(re.fullmatch(r"[a-z]{4}, [a-z]{4}", t[descriptor:-1]) for t in chars)


def test_descriptions_is_a_known_set_only_with_a_file():
    assert "descriptions" not in resolve(["all"], dataset_spec("cub200"))
    assert resolve(["all"], dataset_spec("cub200"), descriptions=True)[-2:] == ["descriptions", "auto"]
    with pytest.raises(ValueError, match="--descriptions FILE"):
        resolve(["descriptions"], dataset_spec("cub200"))
