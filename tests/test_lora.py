"""LoRA: exact parameter counts, learning, saved adapter, gradient checkpointing, input path."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from transformers import CLIPVisionConfig

from clip_utils.app.cli import main
from clip_utils.config import LoraSettings
from clip_utils.model.clip import load_clip
from clip_utils.model.heads import ClipClassifier, count_parameters
from clip_utils.model.inputs import iter_labelled_batches
from clip_utils.model.lora import add_lora, lora_trainable_params
from clip_utils.model.preprocess import Preprocess

VIT_L14 = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)


def test_vit_l14_count_is_r_times_d_in_plus_d_out_per_adapted_layer():
    # q_proj and v_proj are 1024 -> 1024: A is 8 x 1024 and B is 1024 x 8 in each of 24 layers.
    adapters = 24 * 2 * (8 * 1024 + 1024 * 8)
    head = 768 * 102 + 102
    assert lora_trainable_params(VIT_L14, LoraSettings(), n_classes=102, embed_dim=768) == adapters + head
    assert adapters == 786_432  # issue 4's 2*r*(d_in + d_out) would say twice that
    mlp = LoraSettings(rank=4, targets=("fc1", "fc2"))
    assert lora_trainable_params(VIT_L14, mlp, 200, 768) == 24 * 2 * 4 * (1024 + 4096) + 768 * 200 + 200


@pytest.mark.parametrize("settings", [LoraSettings(), LoraSettings(rank=4, targets=("q_proj", "k_proj", "v_proj",
                                                                                     "out_proj", "fc1", "fc2"))])
def test_count_from_config_matches_the_model(kit, settings):
    model = load_clip(kit["model"]).model
    head = torch.nn.Linear(model.config.projection_dim, 7)
    classifier = ClipClassifier(add_lora(model.requires_grad_(False).vision_model, settings),
                                model.visual_projection, head)
    trainable, _ = count_parameters(classifier)
    assert trainable == lora_trainable_params(model.config.vision_config, settings, 7, head.in_features)


def test_unknown_targets_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"qkv.*choose among q_proj, k_proj, v_proj, out_proj, fc1, fc2"):
        LoraSettings(targets=("qkv",))
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(rank=0)


def test_lora_learns_far_above_chance(task2_runs):
    lora = task2_runs["lora"]
    assert lora["top1"] > 5 / len(lora["class_names"])


def test_lora_writes_the_contract_files(task2_runs, tiny_clip):
    folder = task2_runs["results"] / "cub200" / "lora"
    metrics = json.loads((folder / "metrics.json").read_text())
    model, _ = tiny_clip
    expected = lora_trainable_params(model.config.vision_config, LoraSettings(), 20, model.config.projection_dim)
    assert metrics["method"] == "lora" and metrics["trainable_params"] == expected
    assert metrics["config"]["lora_rank"] == 8 and metrics["config"]["lora_targets"] == ["q_proj", "v_proj"]
    assert metrics["peak_vram_mb"] is None and 1 <= metrics["best_epoch"] <= metrics["epochs"]
    assert (folder / "adapter" / "adapter_config.json").is_file()
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    assert (folder / "head.safetensors").is_file()
    # every results file is readable like the rest (safetensors alone writes 0600)
    mode = (folder / "head.safetensors").stat().st_mode & 0o777
    assert {p.name: p.stat().st_mode & 0o777 for p in (folder / "adapter").iterdir()} == {
        p.name: mode for p in (folder / "adapter").iterdir()}
    assert len(json.loads((folder / "curves.json").read_text())) == metrics["epochs"]
    assert len((folder / "predictions.csv").read_text().splitlines()) - 1 == metrics["n"]


def _grads(kit, checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = load_clip(kit["model"]).model
    torch.manual_seed(0)  # the same adapter initialisation in both runs
    vision = add_lora(model.requires_grad_(False).vision_model,
                      LoraSettings(dropout=0.0, grad_checkpointing=checkpointing))
    with torch.no_grad():  # B starts at zero, which would hide A's gradients
        for name, p in vision.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    assert any(getattr(m, "gradient_checkpointing", False) for m in vision.modules()) == checkpointing
    vision.train()
    out = vision(pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))).pooler_output
    out.square().sum().backward()
    return out.detach(), {n: p.grad for n, p in vision.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_output_and_gradients(kit):
    out, grads = _grads(kit, checkpointing=False)
    out_ckpt, grads_ckpt = _grads(kit, checkpointing=True)
    torch.testing.assert_close(out_ckpt, out)
    assert grads_ckpt.keys() == grads.keys()
    for name, grad in grads.items():
        assert grads_ckpt[name] is not None and grad.abs().sum() > 0
        torch.testing.assert_close(grads_ckpt[name], grad)


def _batches(kit, pre, fast: bool, augment: bool, seed: int = 0):
    from clip_utils.data import load_dataset

    ds = load_dataset("cub200", kit["data"], "train")
    paths, labels = [p for p, _ in ds.samples][:12], torch.tensor(ds.targets[:12])
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(seed)
    batches = list(iter_labelled_batches(paths, labels, pre, "cpu", torch.float32, 5, order=order, augment=augment,
                                         num_workers=0, fast=fast))
    return batches, labels[order]


@pytest.mark.parametrize("fast", [False, True], ids=["pil", "device-decode"])
def test_augmented_batches_on_both_input_paths(kit, tiny_clip, fast):
    pre = Preprocess.from_processor(tiny_clip[1])
    plain, ordered_labels = _batches(kit, pre, fast, augment=False)
    aug, _ = _batches(kit, pre, fast, augment=True)
    again, _ = _batches(kit, pre, fast, augment=True)
    assert [len(y) for _, y in plain] == [5, 5, 2]
    assert torch.equal(torch.cat([y for _, y in plain]), ordered_labels)
    assert aug[0][0].shape == plain[0][0].shape == (5, 3, 32, 32)
    assert not torch.allclose(aug[0][0], plain[0][0])
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(aug, again, strict=True))  # seeded: repeatable


def test_cli_lora_writes_the_contract_files(kit, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["lora", "--dataset", "cub200", "--epochs", "1", "--rank", "4", "--targets", "q_proj,k_proj",
                     "--grad-checkpointing", "--model", str(kit["model"]), "--data-root", str(kit["data"]),
                     "--results-dir", str(tmp_path), "--device", "cpu", "--workers", "0", "--no-download"])
    assert code == 0, err.getvalue()
    folder = tmp_path / "cub200" / "lora"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["config"]["lora_rank"] == 4 and metrics["config"]["batch_size"] == 32
    for name in ("predictions.csv", "curves.json", "head.safetensors", "adapter/adapter_config.json"):
        assert (folder / name).is_file()


def test_lora_trains_without_the_labs_inference_model_in_memory(kit, tmp_path, monkeypatch):
    """The lab's frozen model (fp16 ViT-L/14 on CUDA) would sit in LoRA's memory and its peak."""
    from clip_utils.config import TrainConfig
    from clip_utils.lab import Lab
    from clip_utils.methods import lora

    lab = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path, device="cpu", num_workers=0)
    lab.clip()  # as zero-shot and the probe leave it in the notebook
    seen = []

    def train(lab, *args, **kwargs):
        seen.append(lab._loaded.clip)
        raise KeyboardInterrupt

    monkeypatch.setattr(lora, "_train", train)
    with pytest.raises(KeyboardInterrupt):
        lora.run_lora(lab, "cub200", TrainConfig(epochs=1))
    assert seen == [None]
    assert lab.clip().model is not None  # and it comes back on the next use


def test_a_failed_lora_run_leaves_no_frame_holding_its_model(kit, tmp_path, monkeypatch):
    """A notebook keeps the last traceback: it must not keep LoRA's model (and its GPU memory)."""
    from clip_utils.lab import Lab
    from clip_utils.methods import lora
    from clip_utils.model.training import TrainingError

    def out_of_memory(job, *args, **kwargs):
        raise TrainingError("CUDA out of memory while training: try --batch-size 16")

    monkeypatch.setattr(lora, "fit", out_of_memory)
    lab = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path, device="cpu", num_workers=0)
    with pytest.raises(TrainingError, match="try --batch-size 16") as caught:
        lora.run_lora(lab, "cub200")
    frames, tb = [], caught.value.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    held = [name for frame in frames for name, value in frame.f_locals.items()
            if isinstance(value, torch.nn.Module) and any(p.requires_grad for p in value.parameters())
            and sum(p.numel() for p in value.parameters()) > 10_000]
    assert frames and not held  # the head alone is small; no adapted encoder survives
