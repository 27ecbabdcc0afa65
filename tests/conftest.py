"""Shared fixtures: one offline test kit (tiny CLIP + synthetic datasets) per session."""

from __future__ import annotations

import os
from pathlib import Path

# Before any Hugging Face import: a missing model must fail at once, not after retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# One intra-op thread per xdist worker, and per subprocess a test starts (they inherit the
# environment): `make test` runs a worker per core, and workers whose torch each used every
# core would oversubscribe the machine, each small op waiting on a descheduled thread.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from clip_utils import testkit  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def kit(tmp_path_factory) -> dict[str, Path]:
    """`{"model": tiny CLIP folder, "data": root with flowers-102/ and CUB_200_2011/}`.

    CUB keeps 20 of its 200 classes: enough for a stratified val split and real learning,
    few enough that training tests take seconds.
    """
    return testkit.make_kit(tmp_path_factory.mktemp("kit"), cub_classes=20)


@pytest.fixture(scope="session")
def tiny_clip(kit):
    """`(model, processor)` of the tiny CLIP, loaded once."""
    from clip_utils.model.clip import load_clip

    clip = load_clip(kit["model"])
    return clip.model, clip.processor


@pytest.fixture(scope="session")
def zeroshot_cli_run(kit, tmp_path_factory):
    """`python -m clip_utils zeroshot --dataset flowers102 --prompts all` on the kit, run once.

    Returns `(results_dir, exit_code, stdout)`. The Task 1 notebook test starts from a copy of
    its feature cache, so the 7k Flowers102 test and val images are encoded once per session.
    """
    import contextlib
    import io

    from clip_utils.app.cli import main

    results = tmp_path_factory.mktemp("zeroshot_cli")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["zeroshot", "--dataset", "flowers102", "--prompts", "all", "--model", str(kit["model"]),
                     "--data-root", str(kit["data"]), "--results-dir", str(results), "--device", "cpu",
                     "--batch-size", "256", "--no-download"])
    return results, code, out.getvalue()


@pytest.fixture(scope="session")
def task2_runs(kit, tmp_path_factory):
    """A zero-shot, a linear probe and a LoRA run on the kit's 20-class CUB, run once.

    Returns `{"lab", "results", "probe", "lora"}` (the last two: their metrics.json). The
    settings are chosen to learn within seconds on CPU (few images, LoRA at a high rate);
    tests that modify files work on a copy of `results`.
    """
    from clip_utils.config import LoraSettings, TrainConfig
    from clip_utils.lab import Lab
    from clip_utils.methods.lora import run_lora
    from clip_utils.methods.probe import run_probe
    from clip_utils.methods.zeroshot import run_zeroshot

    results = tmp_path_factory.mktemp("task2_results")
    lab = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=results, device="cpu", batch_size=32,
              num_workers=0, download=False)
    run_zeroshot(lab, "cub200", ["default", "domain"])
    # The training loop's probe at the default rate (head units make it right for the tiny model too);
    # LoRA's adapters at the demo's rate: the tiny CLIP's random weights need it.
    probe = run_probe(lab, "cub200", TrainConfig(epochs=30, lr=5e-3), solver="adamw")
    lora = run_lora(lab, "cub200", TrainConfig(epochs=10, lr=0.02, head_lr=5e-3, augment=True), LoraSettings())
    return {"lab": lab, "results": results, "probe": probe, "lora": lora}


# `lora --encoders both` as the tests run it: attention and MLP projections of both towers.
BOTH_SETTINGS = dict(rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "fc1"), encoders="both")


@pytest.fixture(scope="session")
def both_lora_run(kit, tmp_path_factory):
    """LoRA on both encoders (CLIP's own classifier) on the kit's 20-class CUB, 2 epochs, run once.

    Returns `{"lab", "results", "metrics", "cfg", "settings"}`; tests that modify files work on a copy.
    """
    from clip_utils.config import LoraSettings, TrainConfig
    from clip_utils.lab import Lab
    from clip_utils.methods.lora import run_lora

    results = tmp_path_factory.mktemp("both_lora")
    lab = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=results, device="cpu", batch_size=32,
              num_workers=0, download=False)
    cfg, settings = TrainConfig(epochs=2, lr=0.02, augment=True), LoraSettings(**BOTH_SETTINGS)
    metrics = run_lora(lab, "cub200", cfg, settings)
    return {"lab": lab, "results": results, "metrics": metrics, "cfg": cfg, "settings": settings}


@pytest.fixture(scope="session")
def image_folders(tmp_path_factory) -> dict[str, Path]:
    """A user's own datasets (`imagefolder:PATH`) in both layouts: `{"flat": ..., "splits": ...}`."""
    root = tmp_path_factory.mktemp("image_folders")
    return {layout: testkit.make_imagefolder(root / f"mushrooms_{layout}", layout=layout)
            for layout in ("flat", "splits")}
