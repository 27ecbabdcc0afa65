"""report: the comparison and every figure redrawn from saved files alone."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil

import pytest
import transformers

from clip_utils import lab
from clip_utils.app import report
from clip_utils.app.cli import main
from clip_utils.model import clip as models


@pytest.fixture
def copied_results(task2_runs, tmp_path, monkeypatch):
    """The session's results in a fresh folder, with model loading made impossible."""
    folder = tmp_path / "results"
    shutil.copytree(task2_runs["results"], folder, ignore=shutil.ignore_patterns("figures", "summary.csv", "cache"))

    def no_model(*args, **kwargs):
        raise AssertionError("report must not load a model")

    monkeypatch.setattr(models, "load_clip", no_model)
    monkeypatch.setattr(lab, "load_clip", no_model)
    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", no_model)
    return folder


def read_summary(folder):
    with open(folder / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_report_redraws_from_files_alone(copied_results, task2_runs, capsys):
    written = report.make_report(copied_results)
    figures = copied_results / "figures"
    expected = {"cub200_linear_probe_curves.png", "cub200_lora_curves.png", "cub200_training_dynamics.png",
                "comparison.png"}
    assert expected <= {p.name for p in written}
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    assert all(p.parent == figures for p in written if p.suffix == ".png")

    rows = {r["method"]: r for r in read_summary(copied_results)}
    assert set(rows) == {"zeroshot", "linear_probe", "lora"}
    assert float(rows["lora"]["top1"]) == task2_runs["lora"]["top1"]
    assert int(rows["linear_probe"]["trainable_params"]) == task2_runs["probe"]["trainable_params"]
    assert int(rows["zeroshot"]["trainable_params"]) == 0
    assert rows["zeroshot"]["prompt_set"] == "domain"  # no auto run: the domain set, whatever its top-1
    assert rows["lora"]["peak_vram_mb"] == ""  # CPU runs record none

    # Datasets are what the results folder holds: the kit's session has no Flowers102 runs, and
    # the report neither draws nor asks for them.
    assert not (figures / "flowers102_training_dynamics.png").exists()
    assert "flowers102" not in capsys.readouterr().err


# Every figure save_evaluation and run_zeroshot wrote for the session's CUB runs.
REDRAWN = {"cub200_zeroshot_default_confusion.png", "cub200_zeroshot_domain_confusion.png",
           "cub200_linear_probe_confusion.png", "cub200_lora_confusion.png", "zeroshot_prompt_sets.png",
           "cub200_zeroshot_default_samples.png", "cub200_lora_samples.png"}


def test_report_redraws_evaluation_figures_and_prompt_chart(copied_results, task2_runs):
    # The names are the ones the runs themselves wrote, so a redraw replaces rather than adds.
    assert REDRAWN <= {p.name for p in (task2_runs["results"] / "figures").iterdir()}
    figures = copied_results / "figures"
    assert not figures.exists()  # the copy leaves every figure behind
    written = report.make_report(copied_results)
    assert REDRAWN <= {p.name for p in written}
    assert all((figures / name).stat().st_size > 0 for name in REDRAWN)


def test_report_skips_what_it_cannot_redraw_and_says_so(copied_results, capsys):
    predictions = copied_results / "cub200" / "lora" / "predictions.csv"
    lines = predictions.read_text().splitlines()
    lines[1] = "/nowhere/gone.jpg" + lines[1][lines[1].index(","):]  # one image no longer on disk
    predictions.write_text("\n".join(lines) + "\n")
    (copied_results / "cub200" / "zeroshot" / "default" / "predictions.csv").unlink()  # a partial run

    names = {p.name for p in report.make_report(copied_results)}
    assert "cub200_lora_confusion.png" in names and "cub200_lora_samples.png" not in names
    assert "cub200_zeroshot_default_confusion.png" not in names
    assert "cub200_zeroshot_domain_samples.png" in names
    err = capsys.readouterr().err
    assert "cub200_lora_samples.png not redrawn: 1 of" in err and "/nowhere/gone.jpg" in err
    assert "default: no predictions.csv" in err


def write_zeroshot(root, dataset, top1s, model="m"):
    for name, top1 in top1s.items():
        folder = root / dataset / "zeroshot" / name
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({
            "dataset": dataset, "split": "test", "method": "zeroshot", "model": model, "n": 10, "top1": top1,
            "top5": 0.9, "mean_per_class": top1, "seconds": 1.0, "prompt_set": name}))


def write_trained(root, dataset, method, model="m"):
    folder = root / dataset / method
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "dataset": dataset, "split": "test", "method": method, "model": model, "n": 10, "top1": 0.8,
        "top5": 0.9, "mean_per_class": 0.8, "seconds": 2.0, "trainable_params": 5}))


def test_zeroshot_row_is_chosen_without_test_labels(tmp_path):
    # auto has the lowest test top-1 here: a rule that looked at test accuracy would not pick it.
    write_zeroshot(tmp_path, "cub200", {"default": 0.4, "diverse": 0.7, "domain": 0.5, "auto": 0.45})
    baseline = report.zeroshot_baseline(tmp_path, "cub200")
    assert baseline["prompt_set"] == "auto" and baseline["top1"] == 0.45
    rows, missing = report.collect(tmp_path)
    assert [(r["dataset"], r["method"], r["prompt_set"]) for r in rows] == [("cub200", "zeroshot", "auto")]
    (line,) = missing  # one line for the dataset, every method without a run in it
    assert line.startswith("cub200: linear probe (python -m clip_utils probe --dataset cub200); "
                           "LoRA (python -m clip_utils lora --dataset cub200); Tip-Adapter (")


@pytest.mark.parametrize(("saved", "expected"), [
    (["diverse", "domain", "default"], "domain"),
    (["diverse", "default"], "default"),
    (["domain_ensemble", "diverse", "custom"], "diverse"),  # no preferred set: the first in prompts order
    ([], None),
])
def test_baseline_preference(tmp_path, saved, expected):
    # the expected set has the lowest test top-1, so the old best-on-test rule would fail here
    write_zeroshot(tmp_path, "flowers102", {name: 0.3 if name == expected else 0.8 for name in saved})
    baseline = report.zeroshot_baseline(tmp_path, "flowers102")
    assert (baseline and baseline["prompt_set"]) == expected


def test_a_comparison_keeps_to_one_model_and_warns_when_it_cannot(tmp_path):
    write_zeroshot(tmp_path, "cub200", {"auto": 0.5}, model="old")  # an earlier model's best set
    write_zeroshot(tmp_path, "cub200", {"domain": 0.4}, model="new")
    write_trained(tmp_path, "cub200", "linear_probe", model="new")
    rows, _ = report.collect(tmp_path)
    assert {(r["method"], r["model"], r["prompt_set"]) for r in rows} == {("zeroshot", "new", "domain"),
                                                                         ("linear_probe", "new", "")}
    assert "model" not in report.summary_table(tmp_path).columns  # one model: no column for it

    write_trained(tmp_path, "cub200", "lora", model="other")
    with pytest.warns(UserWarning, match="different models"):
        table = report.summary_table(tmp_path)
    assert set(table["model"]) == {"new", "other"}


def test_report_with_only_curves_still_draws_them(tmp_path):
    folder = tmp_path / "flowers102" / "lora"
    folder.mkdir(parents=True)
    curves = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.1 / e, "val_acc": 0.2 * e, "seconds": 1.0,
               "lr": 1e-3} for e in (1, 2, 3)]
    (folder / "curves.json").write_text(json.dumps(curves))  # e.g. a run interrupted before testing
    names = {p.name for p in report.make_report(tmp_path)}
    assert {"flowers102_lora_curves.png", "flowers102_training_dynamics.png"} <= names
    assert "comparison.png" not in names


def test_report_without_results_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no saved results.*python -m clip_utils"):
        report.make_report(tmp_path)


def test_cli_report(copied_results):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["report", "--results-dir", str(copied_results)])
    assert code == 0
    printed = out.getvalue().split()
    assert str(copied_results / "summary.csv") in printed
    assert str(copied_results / "figures" / "comparison.png") in printed


def test_cli_report_on_an_empty_folder_is_a_one_line_error(tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["report", "--results-dir", str(tmp_path)])
    assert code == 1 and err.getvalue().startswith("error: no saved results")


def test_cli_report_warns_in_one_line_when_models_are_mixed(tmp_path, capsys):
    write_zeroshot(tmp_path, "cub200", {"domain": 0.4}, model="a")
    write_trained(tmp_path, "cub200", "linear_probe", model="b")
    assert main(["report", "--results-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "warning: cub200: the saved results come from different models (a, b)" in err
    assert "UserWarning" not in err
