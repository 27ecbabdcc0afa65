"""How often a run reads the model from disk: once per need, not once per step."""

from __future__ import annotations

import torch

from clip_utils import lab as lab_module
from clip_utils.lab import Lab
from clip_utils.runs import zeroshot_init_head


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
