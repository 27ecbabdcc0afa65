"""The shared training loop and the linear probe: learning, files, resume, failures."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from clip_utils.app.cli import main
from clip_utils.model import training as train
from clip_utils.model.training import RESUME_FILE, TrainConfig, TrainingError, TrainJob, fit, permuted_batches

CONTRACT_KEYS = {"dataset", "split", "method", "model", "n", "top1", "top5", "mean_per_class", "class_names",
                 "seconds", "trainable_params", "trainable_pct", "epochs", "best_epoch", "peak_vram_mb", "config"}
CURVE_KEYS = {"epoch", "train_loss", "val_loss", "val_acc", "seconds", "lr"}


# --------------------------------------------------------------------------- a toy job for the loop


def toy_data(n: int = 96, dim: int = 8, classes: int = 4, seed: int = 0):
    """Gaussian clusters around fixed centres; `seed` draws the samples (0: train, 1: val)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(42)) * 3
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), y


def toy_job(out: Path, model: nn.Module | None = None, batch_size: int = 16, train_batches=None) -> TrainJob:
    """A small classifier on Gaussian clusters, with the same TrainJob the probe uses."""
    x, y = toy_data()
    vx, vy = toy_data(seed=1)
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 4))
    saved = []
    return TrainJob(
        name="toy", model=model,
        train_batches=train_batches or (lambda epoch, gen: permuted_batches(x, y, batch_size, gen)),
        val_batches=lambda: permuted_batches(vx, vy, 64), steps_per_epoch=math.ceil(len(y) / batch_size),
        save_best=lambda epoch: saved.append(epoch), out_dir=out, device=torch.device("cpu"),
        batch_size=batch_size, fingerprint={"data": "toy"},
    )


def without_seconds(curves):
    return [{k: v for k, v in e.items() if k != "seconds"} for e in curves]


CFG = TrainConfig(epochs=5, lr=0.05, seed=3)


def test_fit_writes_curves_every_epoch_and_learns(tmp_path):
    seen = []
    result = fit(toy_job(tmp_path), CFG, callbacks=[lambda epoch, entry: seen.append(
        json.loads((tmp_path / "curves.json").read_text()))])
    assert [len(c) for c in seen] == [1, 2, 3, 4, 5]  # on disk after every epoch
    assert set(result.curves[0]) == CURVE_KEYS
    assert result.curves[-1]["val_acc"] > 0.9
    assert result.curves[-1]["train_loss"] < result.curves[0]["train_loss"]
    assert result.best_epoch == train.best_epoch(result.curves)


def test_a_quiet_fit_prints_nothing(tmp_path, capsys):
    import dataclasses

    fit(toy_job(tmp_path / "loud"), TrainConfig(epochs=1, lr=0.05, seed=3))
    loud = capsys.readouterr()
    assert "toy epoch 1" in loud.out and "epoch/s" in loud.err
    fit(dataclasses.replace(toy_job(tmp_path / "quiet"), progress=False), TrainConfig(epochs=1, lr=0.05, seed=3))
    assert capsys.readouterr() == ("", "")


def test_best_epoch_prefers_accuracy_then_loss():
    curves = [{"epoch": 1, "val_acc": 0.5, "val_loss": 1.0}, {"epoch": 2, "val_acc": 0.7, "val_loss": 0.9},
              {"epoch": 3, "val_acc": 0.7, "val_loss": 0.8}, {"epoch": 4, "val_acc": 0.6, "val_loss": 0.1}]
    assert train.best_epoch(curves) == 3
    assert train.best_epoch([]) == 0


def test_resume_after_ctrl_c_ends_with_the_same_curves(tmp_path, capsys):
    straight = fit(toy_job(tmp_path / "a"), CFG)

    def interrupt(epoch, entry):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(toy_job(tmp_path / "b"), CFG, callbacks=[interrupt])
    kept = json.loads((tmp_path / "b" / "curves.json").read_text())
    assert [e["epoch"] for e in kept] == [1, 2]  # the last completed epoch is kept

    job = toy_job(tmp_path / "b")  # a new process: fresh model, loop state from disk
    capsys.readouterr()
    resumed = fit(job, CFG, resume=True)
    assert without_seconds(resumed.curves) == without_seconds(straight.curves)
    assert resumed.best_epoch == straight.best_epoch
    assert f"resuming after epoch 2 of {CFG.epochs} from " in capsys.readouterr().out


def test_resume_after_a_crash_mid_epoch(tmp_path):
    straight = fit(toy_job(tmp_path / "a"), CFG)
    x, y = toy_data()

    def crashing(epoch, gen):
        for step, batch in enumerate(permuted_batches(x, y, 16, gen)):
            if epoch == 3 and step == 2:
                raise RuntimeError("power cut")
            yield batch

    with pytest.raises(RuntimeError, match="power cut"):
        fit(toy_job(tmp_path / "b", train_batches=crashing), CFG)
    state = torch.load(tmp_path / "b" / RESUME_FILE, weights_only=True)
    assert state["epoch"] == 2
    resumed = fit(toy_job(tmp_path / "b"), CFG, resume=True)
    assert without_seconds(resumed.curves) == without_seconds(straight.curves)


def test_resume_state_is_read_without_unpickling(tmp_path, monkeypatch):
    fit(toy_job(tmp_path), TrainConfig(epochs=1, lr=0.05, seed=3))
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    fit(toy_job(tmp_path), TrainConfig(epochs=1, lr=0.05, seed=3), resume=True)
    assert calls and all(k.get("weights_only") is True for k in calls)


def test_resume_with_other_settings_is_refused(tmp_path):
    fit(toy_job(tmp_path), TrainConfig(epochs=2, lr=0.05, seed=3))
    with pytest.raises(TrainingError, match=r"settings changed \(lr: 0.05 -> 0.01\).*without --resume"):
        fit(toy_job(tmp_path), TrainConfig(epochs=2, lr=0.01, seed=3), resume=True)


def test_resume_with_nothing_saved_starts_over(tmp_path):
    result = fit(toy_job(tmp_path), TrainConfig(epochs=2, lr=0.05, seed=3), resume=True)
    assert [e["epoch"] for e in result.curves] == [1, 2]


class NanAfter(nn.Module):
    """Finite logits for the first `steps` forward passes in training mode, then NaN."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.linear, self.steps, self.calls = nn.Linear(8, 4), steps, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
        out = self.linear(x)
        return out * float("nan") if self.training and self.calls > self.steps else out


def test_nan_loss_stops_with_a_message_and_keeps_earlier_epochs(tmp_path):
    job = toy_job(tmp_path, model=NanAfter(steps=8))  # 6 steps per epoch: NaN in epoch 2
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 2.*lower learning rate \(--lr"):
        fit(job, CFG)
    kept = json.loads((tmp_path / "curves.json").read_text())
    assert [e["epoch"] for e in kept] == [1]


def test_cuda_out_of_memory_names_the_batch_size_to_try(tmp_path):
    def oom(epoch, gen):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        yield  # a generator, like the real batch sources

    job = toy_job(tmp_path, batch_size=64, train_batches=oom)
    job.oom_hint = " or add --grad-checkpointing"
    with pytest.raises(TrainingError, match=r"batch size 64: try --batch-size 32.* or add --grad-checkpointing"):
        fit(job, CFG)


def test_a_failed_write_leaves_the_previous_resume_state(tmp_path, monkeypatch):
    real_save = torch.save

    def save_then_die(obj, f, *args, **kwargs):
        if obj.get("epoch") == 2:
            Path(f).write_bytes(b"half a checkpoint")  # partial write, then the process dies
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(toy_job(tmp_path), CFG)
    assert torch.load(tmp_path / RESUME_FILE, weights_only=True)["epoch"] == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(warmup=1.5)


# --------------------------------------------------------------------------- the linear probe on the kit


def test_probe_learns_far_above_chance(task2_runs):
    probe = task2_runs["probe"]
    chance = 1 / len(probe["class_names"])
    assert probe["top1"] > 5 * chance
    curves = json.loads((task2_runs["results"] / "cub200" / "linear_probe" / "curves.json").read_text())
    assert max(e["val_acc"] for e in curves) > curves[0]["val_acc"]


def test_probe_writes_the_contract_files(task2_runs):
    folder = task2_runs["results"] / "cub200" / "linear_probe"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(metrics) >= CONTRACT_KEYS
    assert metrics["method"] == "linear_probe" and metrics["split"] == "test"
    assert metrics["peak_vram_mb"] is None  # CPU
    dim, classes = 16, 20  # the tiny CLIP's projection, the kit's CUB
    assert metrics["trainable_params"] == dim * classes + classes
    assert 0 < metrics["trainable_pct"] < 100
    assert 1 <= metrics["best_epoch"] <= metrics["epochs"] == 30
    assert metrics["config"]["lr"] == 5e-3
    rows = (folder / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("path,label,pred") and len(rows) - 1 == metrics["n"]
    curves = json.loads((folder / "curves.json").read_text())
    assert len(curves) == 30 and all(set(e) == CURVE_KEYS for e in curves)
    assert (folder / "head.safetensors").is_file()


def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def _common(kit, results: Path) -> list[str]:
    return ["--model", str(kit["model"]), "--data-root", str(kit["data"]), "--results-dir", str(results),
            "--device", "cpu", "--workers", "0", "--no-download"]


def test_cli_probe_and_resume(kit, tmp_path):
    args = ["probe", "--dataset", "cub200", "--solver", "adamw", "--epochs", "3", "--lr", "0.1",
            *_common(kit, tmp_path)]
    code, out, _ = _cli(args)
    assert code == 0 and "test top-1" in out
    folder = tmp_path / "cub200" / "linear_probe"
    for name in ("metrics.json", "predictions.csv", "curves.json", "head.safetensors"):
        assert (folder / name).is_file()
    code, _, _ = _cli([*args, "--resume"])  # already complete: evaluates again, trains nothing
    assert code == 0
    assert len(json.loads((folder / "curves.json").read_text())) == 3


def test_cli_training_errors_are_one_line(kit, tmp_path, monkeypatch):
    def diverge(*args, **kwargs):
        raise TrainingError("training loss became nan at epoch 1, step 1: the run diverged. Try a lower lr")

    monkeypatch.setattr("clip_utils.methods.probe.run_probe", diverge)
    code, _, err = _cli(["probe", "--dataset", "cub200", *_common(kit, tmp_path)])
    assert code == 1 and err.startswith("error: training loss became nan") and "Traceback" not in err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("clip_utils.methods.probe.run_probe", interrupted)
    code, _, err = _cli(["probe", "--dataset", "cub200", *_common(kit, tmp_path)])
    assert code == 130 and "nothing to resume" in err and "--resume" not in err  # stopped before an epoch ended
    (tmp_path / "cub200" / "linear_probe").mkdir(parents=True)
    (tmp_path / "cub200" / "linear_probe" / "resume.pt").touch()  # as an ended epoch leaves it
    code, _, err = _cli(["probe", "--dataset", "cub200", *_common(kit, tmp_path)])
    assert code == 130 and "rerun with --resume" in err


def test_standardised_head_folds_back_exactly():
    from clip_utils.model.heads import feature_scaling, standardized_head, unstandardized_head

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g) * 0.05 + 0.3
    head = torch.nn.Linear(8, 5)
    mean, std = feature_scaling(x)
    in_units = standardized_head(head, mean, std)
    torch.testing.assert_close(in_units((x - mean) / std), head(x))
    torch.testing.assert_close(unstandardized_head(in_units, mean, std)(x), head(x))


@pytest.fixture(scope="module")
def short_probe_lab(kit, tmp_path_factory):
    from clip_utils.lab import Lab

    return Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path_factory.mktemp("short_probe"),
               device="cpu", batch_size=32, num_workers=0, download=False)


def test_probe_learns_in_a_few_epochs_at_the_notebook_learning_rate(short_probe_lab):
    """The demo's regime (3 epochs, the notebook's lr): the probe must leave chance behind.

    On the tiny model the zero-shot start is chance and its embeddings are nearly collinear;
    training in standardised feature units is what makes a few epochs enough.
    """
    from clip_utils.config import TrainConfig
    from clip_utils.methods.probe import run_probe

    metrics = run_probe(short_probe_lab, "cub200", TrainConfig(epochs=3, lr=1e-2), solver="adamw")
    chance = 1 / len(metrics["class_names"])
    assert metrics["top1"] > 5 * chance


def test_augmented_probe_trains_through_the_encoder_and_validates_the_head(short_probe_lab):
    from clip_utils.app.photos import classifier_for
    from clip_utils.config import TrainConfig
    from clip_utils.methods.probe import run_probe
    from clip_utils.model.training import read_curves

    lab = short_probe_lab.replace(results_dir=short_probe_lab.results_dir / "augmented")
    metrics = run_probe(lab, "cub200", TrainConfig(epochs=3, lr=1e-2, augment=True), solver="adamw")
    assert metrics["config"]["augment"] is True
    assert len(read_curves(lab.results_dir / "cub200" / "linear_probe")) == 3
    assert metrics["top1"] > 5 / len(metrics["class_names"])  # standard units: learns as fast as on the cache
    assert classifier_for(lab, "cub200", "probe").head.out_features == len(metrics["class_names"])


def test_a_fresh_run_removes_the_previous_runs_results_first(short_probe_lab):
    from clip_utils.config import TrainConfig
    from clip_utils.methods.probe import run_probe
    from clip_utils.model import training as train

    out = short_probe_lab.results_dir / "cub200" / "linear_probe"
    run_probe(short_probe_lab, "cub200", TrainConfig(epochs=1, lr=1e-2), solver="adamw")
    assert (out / "metrics.json").is_file()

    def crash(epoch, entry):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_probe(short_probe_lab, "cub200", TrainConfig(epochs=2, lr=1e-2), callbacks=[crash], solver="adamw")
    for name in train.STALE_ON_RESTART:
        assert not (out / name).exists()  # no old metrics beside the new run's curves
    assert len(train.read_curves(out)) == 1


def test_a_fresh_run_that_dies_before_its_first_checkpoint_leaves_no_old_head(short_probe_lab, monkeypatch):
    from clip_utils.config import TrainConfig
    from clip_utils.methods.probe import run_probe
    from clip_utils.model import training as train

    out = short_probe_lab.results_dir / "cub200" / "linear_probe"
    run_probe(short_probe_lab, "cub200", TrainConfig(epochs=1, lr=1e-2), solver="adamw")
    assert (out / "head.safetensors").is_file()

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_train_epoch", dies)
    with pytest.raises(KeyboardInterrupt):
        run_probe(short_probe_lab, "cub200", TrainConfig(epochs=2, lr=1e-2), solver="adamw")
    assert not (out / "head.safetensors").exists()  # predict cannot take the old run's head for this one's


def test_the_augmented_probe_runs_its_frozen_encoder_exactly_as_the_cache_did(tiny_clip):
    """Under the loop's bf16 autocast the encoder still computes the cached features' numbers."""
    from clip_utils.model.heads import FrozenEncoderProbe

    model, _ = tiny_clip
    head = nn.Linear(model.visual_projection.out_features, 3)
    dim = model.visual_projection.out_features
    probe = FrozenEncoderProbe(model, head, torch.zeros(dim), torch.ones(dim)).train()
    assert not probe.vision_model.training and probe.head.training
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    size = model.config.vision_config.image_size
    pixels = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    seen = []
    hook = model.visual_projection.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        with torch.no_grad():
            model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = probe(pixels).float().logsumexp(1).mean()
    finally:
        hook.remove()
    exact, projected = seen
    assert projected.dtype == torch.float32 and torch.allclose(projected, exact, atol=1e-6)
    loss.backward()
    assert head.weight.grad is not None
    assert all(p.grad is None for n, p in probe.named_parameters() if not n.startswith("head."))
