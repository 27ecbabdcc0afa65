"""The field's protocols: K-shot samples per seed, the sweep, the CLIP paper's probe, LoRA from the probe.

Most tests run on the kit's hard image folder (`testkit.make_hard_imagefolder`): on the kit's
other sets every probe is at 100%, so no comparison between methods could fail there.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from clip_utils import config, testkit
from clip_utils.app.cli import main
from clip_utils.lab import Lab
from clip_utils.results import fewshot

SHOTS, SEEDS = (1, 4), (1, 2)


def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def hard(tmp_path_factory) -> str:
    """`imagefolder:PATH` of 10 close, noisy colour classes: 16 train, 8 val, 40 test images each."""
    return f"imagefolder:{testkit.make_hard_imagefolder(tmp_path_factory.mktemp('data') / 'hard')}"


def _lab(kit, results: Path) -> Lab:
    return Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=results, device="cpu", batch_size=32,
               num_workers=0, download=False)


def _common(kit, results: Path) -> list[str]:
    return ["--model", str(kit["model"]), "--data-root", str(kit["data"]), "--results-dir", str(results),
            "--device", "cpu", "--workers", "0", "--no-download"]


@pytest.fixture(scope="module")
def swept(kit, hard, tmp_path_factory):
    """`fewshot --methods probe,lora --shots 1,4 --seeds 1,2` on the hard folder, run once."""
    results = tmp_path_factory.mktemp("fewshot")
    args = ["fewshot", "--dataset", hard, "--methods", "probe,lora", "--shots", ",".join(map(str, SHOTS)),
            "--seeds", ",".join(map(str, SEEDS)), "--epochs", "2", *_common(kit, results)]
    code, out, err = _cli(args)
    assert code == 0, err
    return {"results": results, "args": args, "out": out, "folder": results / "hard"}


# --------------------------------------------------------------------------- the draw


def test_the_draw_takes_k_per_class_the_same_for_a_seed_and_another_for_another():
    samples = [(f"img_{i}.jpg", i % 5) for i in range(5 * 10)] + [("only.jpg", 5)]  # class 5 has one image
    four = fewshot.sample_per_class(samples, 4, seed=1)
    counts = Counter(samples[i][1] for i in four)
    assert counts == {0: 4, 1: 4, 2: 4, 3: 4, 4: 4, 5: 1}  # a class with fewer gives all it has
    assert fewshot.sample_per_class(samples, 4, seed=1) == four
    assert fewshot.sample_per_class(samples, 4, seed=2) != four
    assert set(fewshot.sample_per_class(samples, 2, seed=1)) <= set(four)  # a seed's 2 shots are in its 4
    full = samples[:-1]  # the draw of a run: every class can give K
    drawn = fewshot.draw(full, full, 8, seed=3)
    assert Counter(full[i][1] for i in drawn.val)[0] == config.FEWSHOT_VAL_SHOTS  # min(K, 4)
    with pytest.raises(ValueError, match="--shots 4 needs 4 training images in every class.*class 5 has 1"):
        fewshot.draw(samples, samples, 4, seed=1)  # a run never records 4 shots over one image
    with pytest.raises(ValueError, match="positive whole number"):
        fewshot.sample_per_class(samples, 0, seed=1)


def test_runs_of_other_models_or_settings_are_not_averaged_silently():
    def run(seed, top1, model="m", epochs=3):
        return {"dataset": "cub200", "method": "lora", "shots": 1, "seed": seed, "top1": top1, "model": model,
                "solver": None, "config": {"epochs": epochs, "lr": 0.02, "seed": seed}}

    alike = [run(1, 0.2), run(2, 0.4)]
    assert fewshot.mixed_settings(alike) == []
    (summary,) = fewshot.aggregate(alike)
    assert summary["seeds"] == 2 and math.isclose(summary["top1"], 0.3)
    (message,) = fewshot.mixed_settings([run(1, 0.2), run(2, 0.4, epochs=1)])
    assert "LoRA 1-shot runs (seeds 1, 2) differ in epochs" in message
    lbfgs = [run(1, 0.2) | {"solver": "lbfgs"}, run(2, 0.4, epochs=12) | {"solver": "lbfgs"}]
    assert fewshot.mixed_settings(lbfgs) == []  # its `epochs` counts the C values it tried
    two_models = [run(1, 0.2), run(2, 0.4, model="other")]
    assert "differ in model" in fewshot.mixed_settings(two_models)[0]
    assert sorted((r["model"], r["seeds"]) for r in fewshot.aggregate(two_models)) == [("m", 1), ("other", 1)]


def test_a_4_shot_seed_1_run_trains_on_4_and_validates_on_4_per_class(swept, kit, hard, tmp_path):
    folder = swept["folder"] / "linear_probe" / "shots_4" / "seed_1"
    sample = fewshot.read_samples(folder)
    assert Counter(s["label"] for s in sample["train"]) == {k: 4 for k in range(10)}
    assert Counter(s["label"] for s in sample["val"]) == {k: 4 for k in range(10)}
    assert all("/train/" in s["path"] for s in sample["train"]) and all("/val/" in s["path"] for s in sample["val"])
    metrics = json.loads((folder / "metrics.json").read_text())
    assert (metrics["shots"], metrics["seed"], metrics["n_train"], metrics["n_val"]) == (4, 1, 40, 40)
    # LoRA drew its own sample of the same seed: the same images; another seed: others.
    assert fewshot.read_samples(swept["folder"] / "lora" / "shots_4" / "seed_1") == sample
    assert fewshot.read_samples(swept["folder"] / "linear_probe" / "shots_4" / "seed_2")["train"] != sample["train"]
    # and so does the command line (in a folder of its own, with the sweep's encoded features)
    shutil.copytree(swept["results"] / "cache", tmp_path / "cache")
    code, out, err = _cli(["probe", "--dataset", hard, "--shots", "4", "--seed", "1", *_common(kit, tmp_path)])
    assert code == 0, err
    assert "4-shot, seed 1" in out and "shots_4/seed_1" in out
    assert fewshot.read_samples(tmp_path / "hard" / "linear_probe" / "shots_4" / "seed_1") == sample
    assert not (tmp_path / "hard" / "linear_probe" / "metrics.json").exists()  # the full-data run's place


def test_the_sweep_writes_its_table_summary_and_figure(swept):
    with open(swept["folder"] / "fewshot.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["method"], int(r["shots"]), int(r["seed"])) for r in rows) == sorted(
        (m, k, s) for m in ("linear_probe", "lora") for k in SHOTS for s in SEEDS)
    with open(swept["folder"] / "fewshot_summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 4 and all(r["seeds"] == "2" and r["top1_std"] != "" for r in summary)
    probe_4 = [float(r["top1"]) for r in rows if (r["method"], r["shots"]) == ("linear_probe", "4")]
    row = next(r for r in summary if (r["method"], r["shots"]) == ("linear_probe", "4"))
    assert math.isclose(float(row["top1"]), sum(probe_4) / 2)
    assert (swept["results"] / "figures" / "hard_fewshot.png").stat().st_size > 0
    assert (swept["results"] / "hard" / "zeroshot" / "auto" / "metrics.json").is_file()  # the figure's line
    assert "8 runs fitted, 0 reused" in swept["out"]
    # a few-shot run's figures stay in its folder, results/figures keeps the full-data ones
    assert not (swept["results"] / "figures" / "hard_linear_probe_confusion.png").exists()
    assert (swept["folder"] / "lora" / "shots_1" / "seed_2" / "figures" / "hard_lora_confusion.png").is_file()


def test_a_second_sweep_reuses_every_finished_run(swept, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("clip_utils.methods.probe.run_probe", no_training)
    monkeypatch.setattr("clip_utils.methods.lora.run_lora", no_training)
    before = (swept["folder"] / "fewshot.csv").read_text()
    code, out, err = _cli(swept["args"])
    assert code == 0, err
    assert "0 runs fitted, 8 reused" in out
    assert (swept["folder"] / "fewshot.csv").read_text() == before


def test_lora_in_the_sweep_starts_from_the_probe_of_its_own_sample(swept):
    for k in SHOTS:
        for seed in SEEDS:
            folder = swept["folder"] / "lora" / f"shots_{k}" / f"seed_{seed}"
            metrics = json.loads((folder / "metrics.json").read_text())
            assert (metrics["head_init"], metrics["shots"], metrics["seed"]) == ("linear_probe", k, seed)
            assert metrics["config"]["head_lr"] == config.LORA.head_lr


def test_few_shot_classifiers_load_by_shots_and_seed(swept, kit, hard):
    from clip_utils.methods import lora, probe

    lab = _lab(kit, swept["results"])
    assert probe.load_classifier(lab, hard, shots=4, seed=1).head.out_features == 10
    assert lora.load_classifier(lab, hard, shots=1, seed=2).head.out_features == 10
    with pytest.raises(FileNotFoundError, match="--shots 2 --seed 1"):
        probe.load_classifier(lab, hard, shots=2, seed=1)


def test_report_gives_the_spread_over_seeds(swept):
    from clip_utils.app import report

    report.make_report(swept["results"])
    with open(swept["results"] / "summary.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["dataset"] == "hard"]
    fewshot_rows = [r for r in rows if r["shots"]]
    assert {(r["method"], r["shots"], r["seeds"]) for r in fewshot_rows} == {
        (m, str(k), "2") for m in ("linear_probe", "lora") for k in SHOTS}
    assert all(float(r["top1_std"]) >= 0 for r in fewshot_rows)
    assert [r["method"] for r in rows if not r["shots"]] == ["zeroshot"]  # no full-data run here
    assert (swept["results"] / "figures" / "comparison.png").is_file()
    table = report.summary_table(swept["results"])
    assert set(table["shots"]) == {"all", 1, 4}


# --------------------------------------------------------------------------- full data: probe solvers, LoRA


@pytest.fixture(scope="module")
def compared(kit, hard, tmp_path_factory):
    """Zero-shot, the default probe, the AdamW probe and LoRA on the hard folder's full splits.

    LoRA trains at the demo's adapter rate (2e-2): the kit's CLIP has random weights, and at
    ViT-L/14's 5e-4 its adapters barely move in the 50 steps a test affords.
    """
    from clip_utils.methods.lora import run_lora
    from clip_utils.methods.probe import run_probe
    from clip_utils.methods.zeroshot import run_zeroshot

    lab = _lab(kit, tmp_path_factory.mktemp("compared"))
    zeroshot = run_zeroshot(lab, hard, ["auto"])["auto"]
    default = run_probe(lab, hard)
    adamw = run_probe(lab.replace(results_dir=lab.results_dir / "adamw"), hard, solver="adamw")
    refit = run_probe(lab.replace(results_dir=lab.results_dir / "refit"), hard, refit=True)
    lora = run_lora(lab, hard, replace(config.LORA, lr=2e-2))
    return {"lab": lab, "zeroshot": zeroshot, "probe": default, "adamw": adamw, "refit": refit, "lora": lora}


def test_the_hard_folder_leaves_every_method_room(compared):
    assert compared["zeroshot"]["top1"] < 0.5
    for name in ("probe", "adamw", "lora"):
        assert 0.3 < compared[name]["top1"] < 0.98, name


def test_the_default_probe_is_the_clip_papers_lbfgs_probe(compared):
    probe, adamw = compared["probe"], compared["adamw"]
    folder = compared["lab"].results_dir / "hard" / "linear_probe"
    assert config.PROBE_SOLVER == "lbfgs" and probe["solver"] == "lbfgs"
    # fitted on the training images alone, as every other method: a comparison's methods saw the same images
    assert probe["fitted_on"] == "train" == compared["lora"]["fitted_on"] and 1e-6 <= probe["C"] <= 1e6
    curves = json.loads((folder / "curves.json").read_text())
    assert len(curves) == probe["epochs"] >= 7 and [e["C"] for e in curves] == sorted(e["C"] for e in curves)
    assert curves[probe["best_epoch"] - 1]["C"] == probe["C"]
    assert (folder / "head.safetensors").is_file() and not (folder / "head_train.safetensors").exists()
    # the CLIP paper's protocol on request: refit on train + val, the train-only head kept for LoRA
    refit, refit_folder = compared["refit"], compared["lab"].results_dir / "refit" / "hard" / "linear_probe"
    assert refit["fitted_on"] == "train+val" and refit["C"] == probe["C"]
    assert (refit_folder / "head_train.safetensors").is_file()
    # Why L-BFGS is the default: the gradient probe at config.PROBE falls more than a point short
    # of it here. Should it ever come within a point, the default may go back to adamw
    # (config.PROBE_SOLVER).
    assert adamw["solver"] == "adamw" and adamw["top1"] < probe["top1"] - 0.01, (adamw["top1"], probe["top1"])


def test_the_lbfgs_head_predicts_through_the_common_classifier(compared, hard):
    from clip_utils.methods.probe import load_classifier

    lab = compared["lab"]
    classifier = load_classifier(lab, hard)
    feats = lab.features(hard, "test")
    with torch.no_grad():
        preds = classifier.head(feats.embeddings).argmax(1)
    with open(lab.results_dir / "hard" / "linear_probe" / "predictions.csv", newline="") as f:
        saved = [int(r["pred"]) for r in csv.DictReader(f)]
    assert preds.tolist() == saved


def test_lora_starts_from_the_probe_and_does_not_end_below_it(compared):
    lora, probe = compared["lora"], compared["probe"]
    assert lora["head_init"] == "linear_probe"
    assert lora["top1"] >= probe["top1"], (lora["top1"], probe["top1"])


def test_lora_without_a_probe_starts_from_zero_shot(kit, tmp_path):
    from clip_utils.methods.lora import run_lora

    metrics = run_lora(_lab(kit, tmp_path), "cub200", replace(config.LORA, epochs=1))
    assert metrics["head_init"] == "zeroshot" and metrics["shots"] is None and metrics["seed"] == 0


# --------------------------------------------------------------------------- the loop's parameter groups


def test_parameter_groups_give_the_head_its_own_learning_rate(tmp_path, monkeypatch):
    from clip_utils.model.training import TrainingError, TrainJob, fit, permuted_batches

    torch.manual_seed(0)
    body, head = nn.Linear(4, 4), nn.Linear(4, 2)
    model = nn.Sequential(body, head)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    seen = []

    def job(groups):
        return TrainJob(name="groups", model=model, train_batches=lambda e, g: permuted_batches(x, y, 16, g),
                        val_batches=lambda: permuted_batches(x, y, 32), steps_per_epoch=2,
                        save_best=lambda epoch: None, out_dir=tmp_path, device=torch.device("cpu"), batch_size=16,
                        param_groups=groups, progress=False)

    cfg = config.TrainConfig(epochs=1, lr=1e-3, warmup=0.0, seed=0)
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append([g["lr"] for g in self.param_groups])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    fit(job([{"params": list(body.parameters())}, {"params": list(head.parameters()), "lr": 1e-1}]), cfg)
    assert seen[0] == [1e-3, 1e-1]  # the scheduler scales both groups alike
    with pytest.raises(TrainingError, match="every trainable parameter exactly once"):
        fit(job([{"params": list(head.parameters())}]), cfg)


# --------------------------------------------------------------------------- the command line and notebook


def test_fewshot_and_solver_options_are_checked_before_anything_loads(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["probe", "--dataset", "cub200", "--solver", "lbfgs", "--augment"])
    assert exit_.value.code == 2 and "--solver adamw" in capsys.readouterr().err
    for bad in (["--shots", "0"], ["--shots", "1,x"], ["--methods", "zeroshot"]):
        code = None
        try:
            code = main(["fewshot", "--dataset", "cub200", *bad, "--results-dir", "/nonexistent", "--device", "cpu",
                         "--no-download", "--data-root", "/nonexistent"])
        except SystemExit as err:
            code = err.code
        assert code == 2, bad
    with pytest.raises(SystemExit) as exit_:
        main(["fewshot", "--help"])
    assert exit_.value.code == 0 and "fewshot.csv" in capsys.readouterr().out


def test_the_notebooks_shot_list_can_be_switched_off(monkeypatch):
    from clip_utils.runtime.env import ParameterError, env_ints

    monkeypatch.delenv("CLIP_FEWSHOT_SHOTS", raising=False)
    assert env_ints("CLIP_FEWSHOT_SHOTS", (1, 2)) == (1, 2)
    monkeypatch.setenv("CLIP_FEWSHOT_SHOTS", "none")
    assert env_ints("CLIP_FEWSHOT_SHOTS", (1, 2)) == ()
    monkeypatch.setenv("CLIP_FEWSHOT_SHOTS", "1, 4,16")
    assert env_ints("CLIP_FEWSHOT_SHOTS", (1, 2)) == (1, 4, 16)
    monkeypatch.setenv("CLIP_FEWSHOT_SHOTS", "1,zero")
    with pytest.raises(ParameterError, match="CLIP_FEWSHOT_SHOTS='1,zero'"):
        env_ints("CLIP_FEWSHOT_SHOTS", (1, 2))


def test_more_shots_than_a_class_has_is_refused_in_one_line(kit, tmp_path, capsys):
    # Flowers102's official training split has 10 images per class: 16 shots cannot be 16 per class
    code = main(["probe", "--dataset", "flowers102", "--shots", "16", *_common(kit, tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: flowers102: --shots 16 needs 16"), err
    assert "has 10" in err[0] and not list((tmp_path / "flowers102").rglob("*.json"))  # nothing written
    code = main(["fewshot", "--dataset", "flowers102", "--methods", "probe", "--shots", "1,16", "--seeds", "1",
                 *_common(kit, tmp_path)])
    assert code == 1 and "--shots 16 needs 16" in capsys.readouterr().err
    assert not list((tmp_path / "flowers102").rglob("*.json"))  # refused before any run


def test_the_default_grid_keeps_the_shots_every_class_can_fill(kit, tmp_path, capsys):
    code = main(["fewshot", "--dataset", "flowers102", "--methods", "gda", "--seeds", "1", *_common(kit, tmp_path)])
    err = capsys.readouterr().err
    assert code == 0 and "note: flowers102's smallest class has 10 training images: shots 1,2,4,8 of the default" in err
    with open(tmp_path / "flowers102" / "fewshot.csv", newline="") as f:
        assert sorted(int(r["shots"]) for r in csv.DictReader(f)) == [1, 2, 4, 8]
    # the API's default is the same grid: every run reused, none refused
    from clip_utils.app.sweep import run_fewshot

    lab = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path, device="cpu", num_workers=0,
              download=False)
    result = run_fewshot(lab, "flowers102", ["gda"], seeds=(1,))
    assert not result.trained and sorted(k for _, k, _ in result.reused) == [1, 2, 4, 8]
