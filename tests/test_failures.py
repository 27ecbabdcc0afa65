"""Failures a careless user or a shared machine produces: one `error:` line, the right exit
code, no traceback, and nothing earlier lost."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clip_utils.app.cli import main
from clip_utils.runtime import files

ROOT = Path(__file__).resolve().parents[1]


def _common(kit, results) -> list[str]:
    return ["--dataset", "cub200", "--model", str(kit["model"]), "--data-root", str(kit["data"]),
            "--results-dir", str(results), "--device", "cpu", "--workers", "0", "--no-download"]


def _run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line and not line.startswith(
        ("loaded ", "encoding"))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_a_results_path_that_is_a_file_is_refused_before_any_work(kit, tmp_path):
    results = tmp_path / "results"
    results.write_text("not a folder")
    code, _, err = _run(["zeroshot", "--prompts", "default", *_common(kit, results)])
    line = _one_error_line(err)
    assert code == 1 and f"the results folder {results} cannot be written" in line and "--results-dir" in line
    assert results.read_text() == "not a folder"


def test_a_full_results_disk_is_said_with_its_reason_before_any_work(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.tempfile, "mkstemp", full)
    with pytest.raises(files.WriteFailed) as caught:
        files.check_writable(tmp_path / "results")
    line = str(caught.value)
    assert line.startswith(f"the results folder {tmp_path / 'results'} cannot be written: No space left on device (")
    assert "bytes free there)" in line and line.endswith("choose another --results-dir")


def test_a_full_disk_mid_run_is_one_line_and_keeps_the_earlier_result(kit, tmp_path, monkeypatch):
    args = ["probe", *_common(kit, tmp_path)]
    assert _run(args)[0] == 0
    metrics = tmp_path / "cub200" / "linear_probe" / "metrics.json"
    before = metrics.read_text()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)  # the write layer: every atomic write now fails
    code, _, err = _run(args)
    line = _one_error_line(err)
    assert code == 1 and "No space left on device" in line and "bytes free" in line and "--results-dir" in line
    assert metrics.read_text() == before


@pytest.mark.parametrize("argv, fragment", [
    (["probe", "--lr", "1e30", "--epochs", "50"], "--epochs, --lr: the lbfgs solver has no training loop"),
    (["probe", "--solver", "adamw", "--lr", "inf"], "expected a finite number"),
    (["probe", "--refit", "--shots", "2"], "--refit adds the validation images"),
    (["tip-adapter", "--alpha", "nan"], "expected a finite number"),
])
def test_an_option_that_does_not_apply_is_a_usage_error(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--dataset", "cub200"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and fragment in err and "Traceback" not in err


def test_a_second_run_into_the_same_folder_is_refused(kit, tmp_path):
    import fcntl

    folder = tmp_path / "cub200" / "linear_probe"
    folder.parent.mkdir(parents=True)
    with open(folder.parent / ".linear_probe.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running probe holds it
        code, _, err = _run(["probe", *_common(kit, tmp_path)])
        assert code == 1 and "another run is writing" in _one_error_line(err)
        # another method (or dataset) runs beside it
        assert _run(["gda", "--prompts", "default", "--shots", "2", *_common(kit, tmp_path)])[0] == 0
    assert _run(["probe", *_common(kit, tmp_path)])[0] == 0  # the lock goes with its holder


def test_sigterm_stops_a_run_like_ctrl_c_and_says_how_to_resume(kit, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CLIP_PROGRESS": "text", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "clip_utils", "probe", "--solver", "adamw", "--epochs", "400",
                             *_common(kit, tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    curves = tmp_path / "cub200" / "linear_probe" / "curves.json"
    deadline = time.monotonic() + 240
    while not curves.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("terminated")]
    assert proc.returncode == 143 and len(lines) == 1 and "--resume" in lines[0], err
    assert "Traceback" not in err and json.loads(curves.read_text())  # what was saved is whole


def _imagefolder_args(kit, results, folder) -> list[str]:
    return ["--dataset", f"imagefolder:{folder}", "--model", str(kit["model"]), "--results-dir", str(results),
            "--device", "cpu", "--workers", "0", "--no-download"]


def test_an_oversized_dataset_image_is_one_line_naming_it(kit, tmp_path, monkeypatch):
    from PIL import Image

    from clip_utils import testkit

    folder = testkit.make_imagefolder(tmp_path / "shrooms", layout="splits", n_classes=3, per_class=8)
    args = ["zeroshot", "--prompts", "default", *_imagefolder_args(kit, tmp_path / "results", folder)]
    assert _run(args)[0] == 0
    metrics = next((tmp_path / "results").rglob("metrics.json"))
    before = metrics.read_text()
    big = folder / "test" / "class_00" / "big.png"
    Image.new("RGB", (200, 200), (90, 20, 20)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # the kit's images are 40x36; big.png is 20x over
    code, _, err = _run(args)
    line = _one_error_line(err)
    assert code == 1 and str(big) in line and "too large to decode safely" in line
    assert metrics.read_text() == before


def test_predict_on_a_named_pipe_answers_instead_of_blocking(kit, tmp_path):
    pipe = tmp_path / "photo.jpg"
    os.mkfifo(pipe)
    code, out, err = _run(["predict", str(pipe), "--dataset", "cub200", "--model", str(kit["model"]),
                           "--data-root", str(kit["data"]), "--results-dir", str(tmp_path / "results"),
                           "--device", "cpu", "--no-download"])
    assert f"{pipe} is not a regular file (a named pipe)" in out + err and "Traceback" not in err


def test_a_cut_short_model_file_is_one_line_naming_it(kit, tmp_path):
    import shutil

    assert _run(["zeroshot", "--prompts", "default", *_common(kit, tmp_path)])[0] == 0
    metrics = next(tmp_path.rglob("metrics.json"))
    before = metrics.read_text()
    model = shutil.copytree(kit["model"], tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    code, _, err = _run(["zeroshot", "--prompts", "default", *_common(kit, tmp_path), "--model", str(model)])
    line = _one_error_line(err)
    assert code == 1 and str(weights) in line and "cut short or damaged" in line and "download" in line
    weights.unlink()
    __import__("torch").save({"weight": 1}, model / "pytorch_model.bin")  # weights as a pickle: never loaded
    code, _, err = _run(["zeroshot", "--prompts", "default", *_common(kit, tmp_path), "--model", str(model)])
    line = _one_error_line(err)
    assert code == 1 and "pytorch_model.bin" in line and "never loaded" in line
    assert metrics.read_text() == before


def test_an_exported_classifier_whose_head_is_a_pickle_says_re_export(kit, tmp_path):
    import argparse

    import torch

    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "classes.json").write_text(json.dumps({"classes": ["a", "b"]}))
    torch.save(argparse.Namespace(weight=1), folder / "head.safetensors")
    photo = tmp_path / "photo.png"
    __import__("PIL.Image").Image.new("RGB", (20, 20)).save(photo)
    code, _, err = _run(["predict", str(photo), "--classifier", str(folder), "--device", "cpu"])
    line = _one_error_line(err)
    assert code == 1 and str(folder / "head.safetensors") in line and "re-export" in line
    assert "weights_only" not in err and photo.is_file()


def test_a_resume_file_that_is_a_pickle_is_one_line_without_torch_advice(kit, tmp_path):
    import argparse

    import torch

    args = ["probe", "--solver", "adamw", "--epochs", "2", *_common(kit, tmp_path)]
    assert _run(args)[0] == 0
    folder = tmp_path / "cub200" / "linear_probe"
    before = (folder / "metrics.json").read_text()
    torch.save(argparse.Namespace(epoch=1), folder / "resume.pt")
    code, _, err = _run([*args, "--resume"])
    line = _one_error_line(err)
    assert code == 1 and str(folder / "resume.pt") in line and "--resume" in line
    assert "weights_only" not in err and "pickled objects" in line
    assert (folder / "metrics.json").read_text() == before


def test_very_long_class_names_give_bounded_figures_and_full_names_in_the_files(kit, tmp_path):
    from PIL import Image

    from clip_utils import testkit

    folder = testkit.make_imagefolder(tmp_path / "long", layout="splits", n_classes=3, per_class=8)
    names = {d.name: f"{d.name} " + "very long descriptive name " * 11 for d in (folder / "train").iterdir()}
    assert all(len(n) >= 300 for n in names.values())
    (folder / "classes.json").write_text(json.dumps({"classes": names}))
    code, _, err = _run(["zeroshot", "--prompts", "default", *_imagefolder_args(kit, tmp_path / "results", folder)])
    assert code == 0 and "Traceback" not in err, err
    figures = list((tmp_path / "results").rglob("*.png"))
    assert figures and next((tmp_path / "results").rglob("metrics.json"))
    for png in figures:
        with Image.open(png) as img:
            assert max(img.size) <= 4000, (png, img.size)
    predictions = next((tmp_path / "results").rglob("predictions.csv")).read_text()
    assert max(names.values(), key=len) in predictions or any(n in predictions for n in names.values())


def test_saved_results_of_the_wrong_shape_are_skipped_with_a_line_each(tmp_path):
    def write(folder: Path, content) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(content))
        return folder / "metrics.json"

    good = {"dataset": "cub200", "split": "test", "method": "zeroshot", "model": "m", "n": 10, "top1": 0.5,
            "top5": 0.9, "mean_per_class": 0.5, "seconds": 1.0, "prompt_set": "auto", "class_names": ["a"]}
    write(tmp_path / "cub200" / "zeroshot" / "auto", good)
    listed = write(tmp_path / "cub200" / "linear_probe", ["not", "an", "object"])
    stringy = write(tmp_path / "cub200" / "lora" / "shots_1" / "seed_1", good | {"method": "lora", "top1": "high"})
    code, out, err = _run(["report", "--results-dir", str(tmp_path)])
    warned = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert code == 0 and "Traceback" not in err, err
    assert any(str(listed) in w and "a JSON list" in w for w in warned)
    assert any(str(stringy) in w and "top1 of the wrong type" in w for w in warned)
    assert "zeroshot" in (tmp_path / "summary.csv").read_text()
