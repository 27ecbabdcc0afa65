"""How often a run reads the model from disk (once per lab, whatever runs with it), and when two labs hold one model."""

from __future__ import annotations

import os

import pytest
import torch

from clip_utils import lab as lab_module
from clip_utils.lab import Lab
from clip_utils.methods.common import zeroshot_init_head
from clip_utils.model.clip import load_clip, model_fingerprint


def test_a_head_built_after_unload_does_not_load_the_model_again(kit, tmp_path, monkeypatch):
    # LoRA frees the lab's model before training; LoRA on the next dataset builds its head
    # from the kept text classifier and logit scale, not from a model reloaded for one number.
    lab = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path, device="cpu", num_workers=0,
              download=False)
    first = zeroshot_init_head(lab, "cub200")
    lab.unload()

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded again")

    monkeypatch.setattr(lab_module, "load_clip", no_load)
    again = zeroshot_init_head(lab, "cub200")
    assert torch.equal(first.weight, again.weight) and torch.equal(first.bias, again.bias)


@pytest.fixture
def reads(monkeypatch):
    """Every checkpoint read from disk through a lab."""
    seen = []
    original = lab_module.load_clip

    def counted(*args, **kwargs):
        seen.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(lab_module, "load_clip", counted)
    return seen


def test_a_lab_reads_its_checkpoint_once_and_says_so(kit, tmp_path, reads, capsys):
    lab = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path, device="cpu", num_workers=0,
              download=False)
    first = lab.clip()
    lab.unload()  # as LoRA does before training
    again, own = lab.clip(), lab.model_copy()
    assert reads == [str(kit["model"])]
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"loaded {kit['model']} (") and "M parameters, float32) in " in line
    # fp32 on the CPU is what the checkpoint already is: the inference model is the checkpoint;
    # a copy for adapters shares none of its storage.
    assert first is again is lab.checkpoint() and own is not first
    ours = {p.data_ptr() for p in first.model.parameters()}
    assert not ours & {p.data_ptr() for p in own.model.parameters()}


def test_a_copy_has_the_numbers_of_a_fresh_load_and_changes_nothing_else(kit, tmp_path):
    lab = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path, device="cpu")
    half = lab.model_copy("cpu", torch.float16)
    loaded = load_clip(kit["model"], "cpu", dtype=torch.float16)
    got, want = half.model.state_dict(), loaded.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert half.fingerprint == loaded.fingerprint
    before = lab.checkpoint().fingerprint
    with torch.no_grad():
        for p in half.model.parameters():
            p.add_(1)
    assert model_fingerprint(lab.checkpoint().model) == before != model_fingerprint(half.model)


def test_where_inference_casts_the_model_it_is_a_copy_made_again_without_a_read(kit, tmp_path, reads,
                                                                                 monkeypatch):
    # CUDA's path (fp16 inference beside the fp32 checkpoint), taken here on the CPU.
    monkeypatch.setattr(lab_module, "inference_dtype", lambda device: torch.float16)
    lab = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path, device="cpu")
    first = lab.clip()
    assert first is not lab.checkpoint() and first.dtype == torch.float16 and lab.checkpoint().dtype == torch.float32
    lab.unload()
    again = lab.clip()
    assert again is not first and again.fingerprint == first.fingerprint  # the feature cache still serves it
    assert reads == [str(kit["model"])]


def test_lora_and_export_leave_the_labs_model_as_it_was_loaded(task2_runs, kit, tmp_path):
    from clip_utils.app.export import export_classifier
    from clip_utils.methods import lora

    lab = task2_runs["lab"]  # it ran zero-shot, the probe and LoRA
    lora.load_classifier(lab, "cub200")
    for method in ("probe", "lora"):
        export_classifier(lab, "cub200", method, tmp_path / method)
    fresh = load_clip(kit["model"], "cpu", dtype=torch.float32)
    settings = {name: repr(value) for name, value in vars(fresh.model.config).items()}
    for clip in (lab.checkpoint(), lab.clip()):
        # Every config attribute as loaded (saving a model rewrites some: dtype becomes a string).
        assert {name: repr(value) for name, value in vars(clip.model.config).items()} == settings
        assert model_fingerprint(clip.model) == model_fingerprint(fresh.model)
        assert not [name for name, _ in clip.model.named_modules() if "lora_" in name]


def test_one_model_and_data_root_under_two_spellings_share_the_cache(kit, tmp_path, monkeypatch):
    # The notebooks are given absolute paths, the README's commands relative ones.
    monkeypatch.chdir(kit["model"].parent)
    settings = dict(results_dir=tmp_path, device="cpu", num_workers=0, download=False)
    absolute = Lab(model=str(kit["model"]), data_root=kit["data"], **settings)
    relative = Lab(model=f"./{kit['model'].name}", data_root=os.path.relpath(kit["data"]), **settings)
    assert (relative.model, relative.data_root) == (absolute.model, absolute.data_root)
    absolute.features("cub200", "val")
    assert relative.features("cub200", "val").encoding["from_cache"]
    assert Lab(model="openai/clip-vit-base-patch16", **settings).model == "openai/clip-vit-base-patch16"  # a hub id
