"""Command-line behaviour that does not need a trained model: usage errors and failing fast."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from clip_utils.app.cli import build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "argv,fragment",
    [
        ([], "COMMAND"),
        (["train"], "invalid choice: 'train'"),
        (["zeroshot"], "--dataset"),
        (["zeroshot", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["probe", "--dataset", "cub200", "--epochs", "0"], "expected a positive number"),
        (["probe", "--dataset", "cub200", "--lr", "fast"], "expected a number"),
        (["lora", "--dataset", "cub200", "--rank", "-2"], "expected a positive number"),
        (["lora", "--dataset", "cub200", "--dropout", "1.5"], "in [0, 1)"),
        (["lora", "--dataset", "cub200", "--targets", ","], "comma-separated"),
        (["predict", "--dataset", "flowers102"], "PHOTO"),
        (["predict", "x.jpg", "--dataset", "flowers102", "--top-k", "many"], "whole number"),
        (["zeroshot", "--dataset", "cub200", "--batch-size", "0"], "positive"),
        (["zeroshot", "--dataset", "cub200", "--workers", "-1"], "zero or more"),
        (["probe", "--dataset", "cub200", "--weight-decay", "-0.1"], "zero or more"),
        (["zeroshot", "--dataset", "imagefolder:"], "imagefolder: needs the folder"),
        (["lora", "--dataset", "cub200", "--targets", "q_proj,foo"], "LoRA targets foo are not linear layers"),
        (["fewshot", "--dataset", "cub200", "--methods", "zeroshot"], "few-shot runs fit a method"),
        (["fewshot", "--dataset", "cub200", "--methods", "probe,svm"], "unknown method 'svm'"),
    ],
)
def test_bad_arguments_are_usage_errors(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and fragment in err
    assert "Traceback" not in err
    if argv[:1] in (["zeroshot"], ["probe"], ["lora"], ["fewshot"], ["predict"]):
        assert f"usage: python -m clip_utils {argv[0]} " in err  # the command's own usage line


@pytest.mark.parametrize("command", ["zeroshot", "probe", "lora", "predict", "export", "report"])
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: python -m clip_utils " + command in capsys.readouterr().out


def test_missing_dataset_is_one_line_not_a_traceback(capsys, tmp_path, kit):
    code = main(["zeroshot", "--dataset", "cub200", "--model", str(kit["model"]), "--device", "cpu",
                 "--data-root", str(tmp_path), "--results-dir", str(tmp_path / "r"), "--no-download"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error: CUB-200-2011 not found")
    assert "Traceback" not in err


def test_cuda_requested_without_cuda_is_explained(capsys, tmp_path, kit, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        main(["zeroshot", "--dataset", "cub200", "--model", str(kit["model"]), "--device", "cuda",
              "--data-root", str(kit["data"]), "--results-dir", str(tmp_path)])
    assert exit_.value.code == 2  # a usage error, found before anything loads
    assert "CUDA is not available" in capsys.readouterr().err


def test_make_run_offline_stops_fast_naming_model_and_demo(tmp_path):
    """What `make run` does on a machine with no network and no cached model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "CLIP_"))}
    # An endpoint that refuses at once stands in for "no network" on any machine, so the
    # test never starts a real 1.7 GB download where a network exists.
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9",
               CLIP_RESULTS_DIR=str(tmp_path / "results"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "clip_utils.app.notebooks"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 1
    # Datasets are checked before the model loads: the first thing it cannot fetch is named.
    assert "Flowers102" in proc.stderr or "openai/clip-vit-large-patch14" in proc.stderr
    assert "make demo" in proc.stderr
    assert "unreachable" in proc.stderr
    assert elapsed < 60  # seconds, not the minutes of a hub client's retries (the tests share the cores)


@pytest.mark.parametrize("var,value", [("CLIP_BATCH_SIZE", "abc"), ("CLIP_EPOCHS", "-3")])
def test_bad_environment_defaults_are_usage_errors(capsys, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit) as exit_:
        main(["probe", "--dataset", "cub200"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and value in err
    assert "Traceback" not in err


def test_out_of_memory_outside_training_names_a_batch_size(capsys, monkeypatch):
    import torch

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("clip_utils.methods.zeroshot.run_zeroshot", oom)
    code = main(["zeroshot", "--dataset", "cub200", "--batch-size", "256", "--device", "cpu"])
    assert code == 1
    err = capsys.readouterr().err
    assert "out of memory" in err and "--batch-size 128" in err


def test_out_of_memory_while_a_probe_encodes_names_the_encoding_batch(capsys, monkeypatch):
    import torch

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("clip_utils.methods.probe.run_probe", oom)
    code = main(["probe", "--dataset", "cub200", "--batch-size", "16", "--encode-batch-size", "64", "--device", "cpu"])
    assert code == 1
    assert "--encode-batch-size 32" in capsys.readouterr().err


@pytest.mark.parametrize("argv, train, encode", [
    (["zeroshot", "--dataset", "cub200", "--batch-size", "16"], 16, 16),  # zero-shot only encodes
    (["predict", "x.jpg", "--dataset", "cub200", "--batch-size", "8"], 8, 8),
    (["probe", "--dataset", "cub200"], 32, 128),
    (["probe", "--dataset", "cub200", "--batch-size", "8", "--encode-batch-size", "16"], 8, 16),
    (["lora", "--dataset", "cub200", "--batch-size", "8"], 8, 8),
])
def test_batch_size_options_reach_the_lab(argv, train, encode, monkeypatch):
    from clip_utils.app.cli import _lab, build_parser

    monkeypatch.delenv("CLIP_BATCH_SIZE", raising=False)
    lab = _lab(build_parser().parse_args([*argv, "--device", "cpu"]))
    assert (lab.batch_size, lab.encode_batch_size) == (train, encode)


@pytest.mark.parametrize("argv, message", [
    (["zeroshot", "--dataset", "cub200", "--device", "gpu0"], "unknown device 'gpu0'"),
    (["zeroshot", "--dataset", "cub200", "--prompts", "bogus"], "unknown prompt set 'bogus'"),
    (["predict", "x.jpg", "--dataset", "cub200", "--prompts", "bogus"], "unknown prompt set 'bogus'"),
])
def test_a_bad_device_or_prompt_set_is_a_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--no-download", "--model", "./no/such/model"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "usage:" in err and "Traceback" not in err
