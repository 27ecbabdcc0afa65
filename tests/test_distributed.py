"""torchrun: zero-shot and LoRA on 2 processes (gloo, CPU) give the single-process results, and resume.

The launches are real `torchrun --standalone --nproc_per_node 2 -m clip_utils ...` commands
on the test kit's tiny CLIP. They start together (each has its own results folder and a
free port) while the single-process references run here, in this process: a launch
leaves a core idle whenever one rank works alone (torchrun's own start, rank 0's test
evaluation and figures), and overlapping them fills those gaps. Nearly all of a launch's
CPU time is the imports of its three Python processes (about 18 CPU-seconds a launch).

LoRA runs with `--dropout 0 --no-augment`: each rank draws its own random stream, so with
dropout or augmentation a distributed run matches a single-process one in distribution,
not number for number. The batch size 9 on the kit's 100 training images makes every
step's shares unequal (5 + 4, rank 1 padded) and the last global batch a single image
(rank 1's share is padding alone): the loss weighting is tested where it matters.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clip_utils import testkit
from clip_utils.app.cli import main
from clip_utils.runtime import distributed
from clip_utils.runtime.distributed import PAD_LABEL, rank_order, shard, shard_sizes

ROOT = Path(__file__).resolve().parents[1]
HOOKS = Path(__file__).resolve().parent / "hooks"  # sitecustomize: the crash hook, for the processes started here
LORA_ARGS = ["--dataset", "cub200", "--device", "cpu", "--batch-size", "9", "--epochs", "2", "--dropout", "0",
             "--no-augment", "--lr", "0.02", "--no-download", "--workers", "0"]
LAUNCH_TIMEOUT_S = 300


# --------------------------------------------------------------------------- pure helpers, no process group


@pytest.mark.parametrize("n,batch,world", [(100, 9, 2), (100, 8, 2), (20, 32, 3), (7, 4, 4), (12, 3, 2), (1, 9, 2)])
def test_each_step_the_ranks_shares_are_exactly_the_single_process_batch(n, batch, world):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    shares = [rank_order(order, batch, r, world) for r in range(world)]
    per_rank = shares[0][1]
    assert per_rank == -(-batch // world) and all(size == per_rank for _, size in shares)
    steps = [list(torch.split(idx, per_rank)) for idx, _ in shares]
    assert all(len(s) == -(-n // batch) for s in steps)  # every rank takes every step (DDP needs it)
    for k, global_batch in enumerate(torch.split(order, batch)):
        parts = [steps[r][k] for r in range(world)]
        real = [p[p < n] for p in parts]
        assert sorted(torch.cat(real).tolist()) == sorted(global_batch.tolist())  # disjoint, and all of it
        for r in range(world):
            assert real[r].tolist() == global_batch[r::world].tolist()
            assert len(parts[r]) >= 1 and (parts[r][len(real[r]):] == n).all()  # padding at the end, index n


def test_padding_slots_carry_the_ignored_label():
    paths, labels = distributed.padded(["a.jpg", "b.jpg"], torch.tensor([3, 1]))
    assert paths == ["a.jpg", "b.jpg", "a.jpg"] and labels.tolist() == [3, 1, PAD_LABEL]
    logits = torch.randn(3, 4)
    full = torch.nn.functional.cross_entropy(logits[:2], labels[:2], reduction="sum")
    assert torch.nn.functional.cross_entropy(logits, labels, reduction="sum", ignore_index=PAD_LABEL) == full


@pytest.mark.parametrize("n", [0, 1, 5, 60, 61])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_the_dataset_in_order(n, world):
    got = [i for r in range(world) for i in range(n)[shard(n, r, world)]]
    assert got == list(range(n)) and sum(shard_sizes(n, world)) == n


def test_without_torchrun_everything_is_one_process():
    assert not distributed.launched() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.on_main(lambda a, b=0: a + b, 2, b=3) == 5
    order = torch.arange(10)
    assert rank_order(order, 4) == (order, 4)
    part = torch.ones(3, 2)
    assert distributed.gather_rows(part, 3) is part and distributed.setup("cpu") == "cpu"


def test_predict_and_report_refuse_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as stop:
        main(["predict", "photo.jpg", "--dataset", "cub200"])
    assert stop.value.code == 2 and "runs in one process" in capsys.readouterr().err


# --------------------------------------------------------------------------- real torchrun launches


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIP_")}
    # One thread per rank on 2 cores; the checkout's package first; no progress bars.
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1", MPLBACKEND="Agg", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    env.update(extra)
    return env


def _torchrun() -> list[str]:
    script = Path(sys.executable).with_name("torchrun")
    # torchrun is `python -m torch.distributed.run`; the script is there in any venv with torch.
    return [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]


class Launch:
    """One `torchrun --standalone --nproc_per_node 2 -m clip_utils ...`, started now, read by `wait()`.

    In a session of its own, so that `stop()` ends torchrun and its workers together.
    """

    def __init__(self, args: list[str], log: Path, **env: str) -> None:
        self.log = log
        with open(log, "w") as file:
            self.proc = subprocess.Popen([*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "clip_utils",
                                          *args], cwd=ROOT, env=_env(**env), stdout=file, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait(self) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=LAUNCH_TIMEOUT_S)
        finally:
            self.stop()
        return code, self.log.read_text()

    def stop(self) -> None:
        """End the launch and its workers if still running (a failed or timed-out test)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _single(args: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(args) == 0
    return out.getvalue()


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(kit, tmp_path_factory):
    """Every launch of this module and its single-process reference, each in its own results folder.

    Returns `{name: (results dir, exit code, output)}` for `zeroshot` and `lora` (2 processes),
    `crashed` (LoRA on 2 processes, rank 0 killed after epoch 1), `resumed` (a copy of
    `crashed` continued with `--resume` on 2 processes), and `zeroshot_1`, `lora_1` (one
    process, the same commands). The resume starts as soon as the crash is over, while the
    others may still run.
    """
    root = tmp_path_factory.mktemp("torchrun")
    # An odd number of test images (9 of 5 classes x 6): the ranks' encoding shards differ in size.
    folder = testkit.make_imagefolder(root / "mushrooms", n_classes=5, per_class=6)
    zeroshot = ["zeroshot", "--dataset", f"imagefolder:{folder}", "--prompts", "default", "--model", str(kit["model"]),
                "--device", "cpu", "--batch-size", "4", "--no-download", "--workers", "0"]
    lora = ["lora", *LORA_ARGS, "--model", str(kit["model"]), "--data-root", str(kit["data"])]
    launches = {
        "crashed": Launch([*lora, "--results-dir", str(root / "crashed")], root / "crashed.log",
                          CLIP_TEST_CRASH_AFTER_EPOCH="1", PYTHONPATH=os.pathsep.join([str(HOOKS), str(ROOT)])),
        "zeroshot": Launch([*zeroshot, "--results-dir", str(root / "zeroshot")], root / "zeroshot.log"),
        "lora": Launch([*lora, "--results-dir", str(root / "lora")], root / "lora.log"),
    }
    try:
        out = {"zeroshot_1": (root / "zeroshot_1", 0, _single([*zeroshot, "--results-dir", str(root / "zeroshot_1")])),
               "lora_1": (root / "lora_1", 0, _single([*lora, "--results-dir", str(root / "lora_1")]))}
        out["crashed"] = (root / "crashed", *launches["crashed"].wait())
        # Resumed in a copy, so the test still sees what the crash left.
        shutil.copytree(root / "crashed", root / "resumed")
        launches["resumed"] = Launch([*lora, "--results-dir", str(root / "resumed"), "--resume"], root / "resumed.log")
        for name in ("zeroshot", "lora", "resumed"):
            out[name] = (root / name, *launches[name].wait())
    finally:
        for launch in launches.values():
            launch.stop()
    return out


def _curves(results: Path) -> list[dict]:
    return json.loads((results / "cub200" / "lora" / "curves.json").read_text())


def _assert_same_curves(got: list[dict], want: list[dict]) -> None:
    assert [e["epoch"] for e in got] == [e["epoch"] for e in want]
    for a, b in zip(got, want, strict=True):
        for key in ("train_loss", "val_loss", "val_acc", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["epoch"], key)


def test_zeroshot_on_two_processes_gives_the_single_process_results(runs):
    results, code, output = runs["zeroshot"]
    single, _, single_output = runs["zeroshot_1"]
    assert code == 0, output
    assert output.count("default ") == 1 == single_output.count("default ")  # the table is printed once
    (folder,) = {p.parent for p in results.glob("*/zeroshot/default")}
    reference = single / folder.relative_to(results)
    got, want = (json.loads((f / "default" / "metrics.json").read_text()) for f in (folder, reference))
    assert (got["world_size"], want["world_size"]) == (2, 1)
    assert got["n"] == want["n"] == 9 and got["top1"] == pytest.approx(want["top1"])
    assert _rows(folder / "default" / "predictions.csv") == _rows(reference / "default" / "predictions.csv")
    # The sharded encoding, gathered in dataset order, is what one process encodes; rank 0 cached it.
    from safetensors.torch import load_file

    caches = sorted((results / "cache" / "features").glob("*.safetensors"))
    assert [c.name for c in caches] == sorted(c.name for c in (single / "cache" / "features").glob("*.safetensors"))
    for cache in caches:
        a, b = load_file(cache), load_file(single / "cache" / "features" / cache.name)
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["embeddings"], b["embeddings"], rtol=1e-5, atol=1e-6)


def test_lora_on_two_processes_gives_the_single_process_run(runs):
    from safetensors.torch import load_file

    results, code, output = runs["lora"]
    single, _, single_output = runs["lora_1"]
    assert code == 0, output
    assert output.count("cub200 lora: test top-1") == 1  # rank 0 alone prints
    _assert_same_curves(_curves(results), _curves(single))
    got, want = (json.loads((r / "cub200" / "lora" / "metrics.json").read_text()) for r in (results, single))
    assert (got["world_size"], want["world_size"]) == (2, 1)
    assert got["trainable_params"] == want["trainable_params"] and got["total_params"] == want["total_params"]
    assert got["best_epoch"] == want["best_epoch"] and got["config"] == want["config"]
    assert got["top1"] == pytest.approx(want["top1"]) and got["top5"] == pytest.approx(want["top5"])
    assert _rows(results / "cub200/lora/predictions.csv") == _rows(single / "cub200/lora/predictions.csv")
    # The head trains in head units (heads.head_units) and is saved folded onto raw embeddings,
    # which divides its weights by scale (std x D/768: 48x on the 16-dimensional test model and
    # more on low-variance dimensions): compared in the units it trains in, as the adapters are.
    from clip_utils.model.heads import head_units

    (train_cache,) = (single / "cache" / "features").glob("cub200-train-*.safetensors")
    mean, scale = head_units(load_file(train_cache)["embeddings"].double())

    def trained_units(head: dict) -> dict:
        weight, bias = head["weight"].double(), head["bias"].double()
        return {"weight": (weight * scale).float(), "bias": (bias + weight @ mean).float()}

    for file in ("head.safetensors", "adapter/adapter_model.safetensors"):  # the best epoch's weights
        got_weights, want_weights = (load_file(r / "cub200" / "lora" / file) for r in (results, single))
        assert got_weights.keys() == want_weights.keys()
        if file == "head.safetensors":
            got_weights, want_weights = trained_units(got_weights), trained_units(want_weights)
        for name, value in want_weights.items():
            torch.testing.assert_close(got_weights[name], value, rtol=1e-4, atol=1e-5)


def test_a_killed_two_process_lora_run_resumes_to_the_uninterrupted_curves(runs):
    results, code, output = runs["crashed"]
    assert code != 0, output  # rank 0 was SIGKILLed after epoch 1; torchrun stopped rank 1
    folder = results / "cub200" / "lora"
    assert [e["epoch"] for e in _curves(results)] == [1]
    assert (folder / "resume.pt").is_file() and not (folder / "metrics.json").exists()
    results, code, output = runs["resumed"]
    assert code == 0, output
    assert "epoch 1:" not in output and "epoch 2:" in output  # epoch 1 came from resume.pt
    uninterrupted = runs["lora"][0]
    _assert_same_curves(_curves(results), _curves(uninterrupted))
    metrics = json.loads((results / "cub200" / "lora" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs"] == 2
    assert _rows(results / "cub200/lora/predictions.csv") == _rows(uninterrupted / "cub200/lora/predictions.csv")
