"""The base-to-new protocol end to end on the kit's CUB, and Zhou et al.'s split on the kit's Flowers102."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json

import pytest

from clip_utils import registry
from clip_utils.app.base2new import CSV_FILE, RUNS_FILE, class_halves, top1, zeroshot_top1
from clip_utils.app.cli import main
from clip_utils.data import resolve
from clip_utils.errors import InvalidValue, MissingFile
from clip_utils.lab import Lab
from clip_utils.methods.common import run_data
from clip_utils.results import base2new as table
from clip_utils.results import fewshot
from clip_utils.testkit.splits import write_flowers102_split


def _common(kit, results, dataset: str = "cub200") -> list[str]:
    return ["--dataset", dataset, "--model", str(kit["model"]), "--data-root", str(kit["data"]),
            "--results-dir", str(results), "--device", "cpu", "--no-download", "--workers", "0"]


def _lab(kit, results, **kwargs) -> Lab:
    return Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=results, device="cpu", batch_size=32,
               num_workers=0, download=False, **kwargs)


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def base2new_run(kit, tmp_path_factory):
    """`base2new` on the kit's CUB (20 classes): CoOp, CLIP-Adapter and LoRA (own), Tip-Adapter
    (zero-shot fallback), the probe (n/a), 2 shots, seeds 1 and 2, an epoch each."""
    results = tmp_path_factory.mktemp("base2new")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["base2new", "--methods", "coop,clip-adapter,tip-adapter,probe,lora", "--shots", "2",
                     "--seeds", "1,2", "--epochs", "1", *_common(kit, results)])
    return code, results, out.getvalue()


def test_halves_are_cocoops_and_each_is_relabelled(kit, tmp_path):
    lab = _lab(kit, tmp_path)
    base, new = class_halves(lab.resolve("cub200"))
    names = lab.class_names("cub200")
    assert list(base.class_names) == names[:10] and list(new.class_names) == names[10:]
    assert (base.folder, new.folder) == ("cub200-base", "cub200-new")
    whole = lab.resolve("cub200").sizes
    assert all(base.sizes[s] + new.sizes[s] == whole[s] for s in whole)
    for part, offset in ((base, 0), (new, 10)):
        test = lab.features(part, "test")
        whole = lab.features("cub200", "test")
        assert set(test.labels.tolist()) == set(range(10))
        # the same images as the whole split's rows of those classes, relabelled from 0
        keep = [i for i, y in enumerate(whole.labels.tolist()) if offset <= y < offset + 10]
        assert test.paths == [whole.paths[i] for i in keep]
        assert test.labels.tolist() == [whole.labels[i].item() - offset for i in keep]
    with pytest.raises(InvalidValue, match="already a class subset"):
        class_halves(base)


def test_base2new_writes_the_table_and_figure(base2new_run):
    code, results, printed = base2new_run
    assert code == 0
    summary = {r["method"]: r for r in _rows(results / "cub200" / CSV_FILE)}
    reference = registry.reference().name
    assert list(summary)[0] == reference
    assert set(summary) == {reference, "coop", "clip_adapter", "tip_adapter", "linear_probe", "lora"}
    for method, source in (("coop", "own"), ("clip_adapter", "own"), ("lora", "own"), ("tip_adapter", "zero-shot"),
                           ("linear_probe", "n/a"), (reference, "own")):
        assert summary[method]["new_source"] == source
    probe = summary["linear_probe"]
    assert probe["new"] == "" and probe["hm"] == "" and float(probe["base"]) > 0  # never a silent number
    for r in summary.values():
        if r["new"]:
            assert float(r["hm"]) == pytest.approx(table.harmonic_mean(float(r["base"]), float(r["new"])), abs=1e-6)
    runs = _rows(results / "cub200" / RUNS_FILE)
    assert sorted((r["method"], r["seed"]) for r in runs if r["method"] == "coop") == [("coop", "1"), ("coop", "2")]
    assert (results / "figures" / "cub200_base2new.png").stat().st_size > 0
    assert "n/a" in printed and "zero-shot" in printed
    from clip_utils.app.report import collect, make_report

    # the base half's runs are among half the classes: left out of the comparison, no "missing" line
    rows, missing = collect(results)
    assert not any(r["dataset"] == "cub200-base" for r in rows)
    assert not any(line.startswith("cub200-base") for line in missing)
    figure = results / "figures" / "cub200_base2new.png"
    figure.unlink()
    assert figure in make_report(results) and figure.stat().st_size > 0  # redrawn from base2new.csv alone


def test_each_method_trained_on_base_classes_only(base2new_run, kit):
    _, results, _ = base2new_run
    for method in ("coop", "clip_adapter", "tip_adapter", "linear_probe"):
        folder = fewshot.run_dir(results, "cub200-base", method, 2, 1)
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["class_subset"] == "base" and len(metrics["class_names"]) == 10
        samples = json.loads((folder / fewshot.SAMPLES_FILE).read_text())
        assert {s["label"] for s in samples["train"]} == set(range(10))
        assert len(samples["train"]) == 2 * 10  # K shots per base class, nothing of the new half


def test_base_is_the_runs_own_score_and_a_fallback_is_zero_shots(base2new_run, kit):
    _, results, _ = base2new_run
    runs = {(r["method"], r["seed"]): r for r in _rows(results / "cub200" / RUNS_FILE)}
    lab = _lab(kit, results)
    _, new = class_halves(lab.resolve("cub200"))
    for seed in ("1", "2"):
        folder = fewshot.run_dir(results, "cub200-base", "tip_adapter", 2, int(seed))
        metrics = json.loads((folder / "metrics.json").read_text())
        row = runs[("tip_adapter", seed)]
        assert float(row["base"]) == pytest.approx(100 * metrics["top1"])
        assert float(row["new"]) == pytest.approx(zeroshot_top1(lab, new, metrics["prompt_set"]))


@pytest.mark.parametrize("method", ["coop", "clip_adapter", "lora"])
def test_a_method_that_names_new_classes_scores_them_itself(base2new_run, kit, method):
    """CoOp's learned context before the new names, CLIP-Adapter's adapted feature against
    their text classifier, LoRA through its towers: the table's new number is that score."""
    _, results, _ = base2new_run
    lab = _lab(kit, results)
    base, new = class_halves(lab.resolve("cub200"))
    run = json.loads((fewshot.run_dir(results, base, method, 2, 1) / "metrics.json").read_text())
    logits = registry.get(method).score_new(lab, base, new, shots=2, seed=1, run=run)
    assert tuple(logits.shape) == (len(lab.features(new, "test")), 10) and logits.isfinite().all()
    row = next(r for r in _rows(results / "cub200" / RUNS_FILE) if r["method"] == method and r["seed"] == "1")
    assert float(row["new"]) == pytest.approx(top1(logits, lab.features(new, "test").labels))


def test_a_method_that_cannot_score_new_classes_here_is_a_usage_error(kit, tmp_path, capsys, monkeypatch):
    import dataclasses

    from clip_utils.registry import _REGISTRY

    monkeypatch.setitem(_REGISTRY, "coop", dataclasses.replace(_REGISTRY["coop"], score_new=None))
    with pytest.raises(SystemExit) as exit_:
        main(["base2new", "--methods", "coop", *_common(kit, tmp_path)])
    assert exit_.value.code == 2 and "cannot score new classes with CoOp" in capsys.readouterr().err


# --------------------------------------------------------------------------- Zhou et al.'s split


@pytest.fixture(scope="module")
def split_file(kit, tmp_path_factory):
    """The kit's Flowers102 split file in Zhou et al.'s format (as `--split-file`), beside the one
    the kit keeps where the published file goes."""
    return write_flowers102_split(kit["data"], path=tmp_path_factory.mktemp("zhou") / "split.json")


def test_the_official_flowers_split_refuses_16_shots(kit, tmp_path, capsys):
    assert main(["probe", "--shots", "16", *_common(kit, tmp_path, "flowers102")]) == 1
    err = capsys.readouterr().err
    assert "--shots 16 needs 16 training images in every class" in err and err.count("\n") == 1
    assert not (tmp_path / "flowers102").exists()  # a refused run leaves no folder (nor lock) behind


def test_the_coop_split_draws_16_per_class_from_its_train_part(kit, tmp_path):
    lab = _lab(kit, tmp_path, split_source="coop")
    flowers = lab.resolve("flowers102")
    assert flowers.folder == "flowers102-coop" and flowers.source.sha256
    listed = json.loads(flowers.source.file.read_text())
    train_part = {f"{kit['data'] / 'flowers-102' / 'jpg'}/{path}" for path, _, _ in listed["train"]}
    data = run_data(lab, flowers, "linear_probe", 16, 1)
    train = lab.dataset(flowers, "train")
    assert flowers.sizes == {"train": 4093, "val": 1633, "test": 2463} and len(train) == 4093
    picked = [train.samples[i] for i in data.train]
    assert len(picked) == 16 * 102
    assert all(sum(1 for _, y in picked if y == c) == 16 for c in range(102))
    assert {str(p) for p, _ in picked} <= {str(p) for p in train_part}
    assert str(data.folder).endswith("flowers102-coop/linear_probe/shots_16/seed_1")


def test_coop_split_results_record_the_split_and_never_share_a_folder(kit, tmp_path, split_file):
    for given in ([], ["--split-file", str(split_file)]):
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["tip-adapter", "--shots", "1", "--split", "coop", *given,
                         *_common(kit, tmp_path, "flowers102")]) == 0
    digest = hashlib.sha256(split_file.read_bytes()).hexdigest()
    # the same images here, but a file of your own is never mixed with the published one's runs
    for folder, sha_file in (("flowers102-coop", kit["data"] / "flowers-102" / "split_zhou_OxfordFlowers.json"),
                             (f"flowers102-coop-{digest[:8]}", split_file)):
        metrics = json.loads((fewshot.run_dir(tmp_path, folder, "tip_adapter", 1, 0) / "metrics.json").read_text())
        assert metrics["split_source"] == "coop" and metrics["dataset_folder"] == folder
        assert metrics["split_sha256"] == hashlib.sha256(sha_file.read_bytes()).hexdigest()
        assert metrics["n"] == 2463
    assert not (tmp_path / "flowers102").exists()
    # report's commands for the missing full-data runs name each folder's split (a file of your own by a placeholder)
    from clip_utils.app import report

    _, missing = report.collect(tmp_path)
    lines = {line.split(":")[0]: line for line in missing}
    assert "--dataset flowers102 --split coop)" in lines["flowers102-coop"]
    assert "--dataset flowers102 --split coop --split-file YOUR_SPLIT_FILE)" in lines[f"flowers102-coop-{digest[:8]}"]


def test_a_split_file_is_checked_against_the_class_order(kit, tmp_path):
    listed = json.loads((kit["data"] / "flowers-102" / "split_zhou_OxfordFlowers.json").read_text())
    for part in listed.values():  # swap the names of classes 0 and 1
        for entry in part:
            entry[2] = {0: "hard-leaved pocket orchid", 1: "pink primrose"}.get(entry[1], entry[2])
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps(listed))
    with pytest.raises(InvalidValue, match="do not follow the dataset's class order"):
        resolve("flowers102", kit["data"], split="coop", split_file=swapped)


def test_no_download_needs_the_split_file_there(kit, tmp_path):
    root = tmp_path / "data"
    (root / "flowers-102").mkdir(parents=True)
    with pytest.raises(MissingFile, match="--no-download"):
        resolve("flowers102", root, split="coop")


def test_cub_has_no_zhou_split(kit, tmp_path, capsys):
    assert main(["tip-adapter", "--shots", "1", "--split", "coop", *_common(kit, tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "cub200 has no Zhou et al. split" in err and err.count("\n") == 1


def test_a_split_file_needs_the_coop_split(kit):
    with pytest.raises(InvalidValue, match="--split coop"):
        resolve("flowers102", kit["data"], split_file="x.json")


def test_the_kit_keeps_its_split_where_the_published_file_goes(kit, tmp_path):
    flowers = _lab(kit, tmp_path, split_source="coop").resolve("flowers102")  # no --split-file, no network
    assert flowers.source.file == (kit["data"] / "flowers-102" / "split_zhou_OxfordFlowers.json").resolve()
    assert flowers.command_args == ("--dataset", "flowers102", "--split", "coop")


def test_split_names_the_split_source_and_points_the_old_usage_to_eval_split(kit, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["zeroshot", "--split", "val", *_common(kit, tmp_path)])
    assert exit_.value.code == 2 and "--eval-split val" in capsys.readouterr().err
