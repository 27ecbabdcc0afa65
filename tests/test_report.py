"""report: the comparison and every curve redrawn from saved files alone."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil

import pytest
import transformers

from clip_utils import lab, models, report
from clip_utils.cli import main


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
    assert rows["zeroshot"]["prompt_set"] in {"default", "domain"}
    assert rows["lora"]["peak_vram_mb"] == ""  # CPU runs record none

    # The kit's session has no Flowers102 runs: they are named, with the command that makes them.
    err = capsys.readouterr().err
    assert "flowers102 LoRA (python -m clip_utils lora --dataset flowers102)" in err


def test_zeroshot_row_is_the_best_saved_prompt_set(tmp_path):
    for name, top1 in (("default", 0.4), ("diverse", 0.7), ("domain", 0.5)):
        folder = tmp_path / "cub200" / "zeroshot" / name
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({
            "dataset": "cub200", "split": "test", "method": "zeroshot", "model": "m", "n": 10, "top1": top1,
            "top5": 0.9, "mean_per_class": top1, "seconds": 1.0, "prompt_set": name}))
    best = report.best_zeroshot(tmp_path, "cub200")
    assert best["prompt_set"] == "diverse" and best["top1"] == 0.7
    rows, missing = report.collect(tmp_path)
    assert [(r["dataset"], r["method"], r["prompt_set"]) for r in rows] == [("cub200", "zeroshot", "diverse")]
    assert len(missing) == 5


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
