"""A method is one module: a toy method declared in this file alone works everywhere.

The toy is the nearest class mean on the cached features, registered in-process; nothing
else in the package is edited, yet the CLI gets its command, `predict --method all`, the
photo explorer, `fewshot --methods` and `report` all take it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clip_utils import registry
from clip_utils.app.cli import build_parser, main
from clip_utils.lab import Lab
from clip_utils.methods import cached
from clip_utils.model.feature_fit import FeatureData, Fitted
from clip_utils.registry import Method, register

ROOT = Path(__file__).resolve().parents[1]
NAME = "nearest_mean"


class NearestMean(nn.Module):
    """Scaled cosine similarity to each class's mean support feature."""

    def __init__(self, n_classes: int, dim: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.register_buffer("means", torch.zeros(n_classes, dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * features @ self.means.t()


def fit(data: FeatureData) -> Fitted:
    sums = torch.zeros(data.n_classes, data.dim).index_add_(0, data.support_labels.cpu(), data.support.cpu())
    module = NearestMean(data.n_classes, data.dim, data.logit_scale)
    module.means.copy_(F.normalize(sums, dim=-1))
    return Fitted(module, {"n_classes": data.n_classes, "dim": data.dim, "scale": data.logit_scale}, {}, [])


TOY = Method(
    name=NAME, label="nearest class mean", command="ncm", folder=NAME, order=99,
    description="nearest class mean of the cached features (a test's toy)",
    add_arguments=cached.add_cached_arguments, settings=cached.cached_settings, recorded=cached.recorded,
    run=lambda lab, dataset, settings, *, shots=None, seed=None, resume=False, callbacks=(): cached.run_cached(
        lab, dataset, NAME, fit, settings, shots=shots, seed=seed),
    load_classifier=lambda lab, dataset, *, shots=None, seed=None, prompt_set=None: cached.load_cached(
        lab, dataset, NAME, NearestMean, shots=shots, seed=seed),
    has_checkpoint=cached.has_checkpoint,
)


@pytest.fixture
def toy():
    register(TOY)
    yield TOY
    registry.unregister(NAME)


def _run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def test_a_method_registered_from_a_test_file_works_everywhere(toy, kit, tmp_path, capsys):
    common = ["--dataset", "cub200", "--model", str(kit["model"]), "--data-root", str(kit["data"]),
              "--results-dir", str(tmp_path), "--device", "cpu", "--no-download", "--workers", "0"]
    # the CLI, built from the registry when called
    assert "ncm" in build_parser().format_help()
    code, _ = _run(["ncm", "--prompts", "default", *common])
    assert code == 0
    metrics = json.loads((tmp_path / "cub200" / NAME / "metrics.json").read_text())
    assert metrics["method"] == NAME and metrics["top1"] > 1 / 20

    # predict --method all: a column of its own
    code, out = _run(["predict", str(ROOT / "my_photo" / "bird.jpg"), "--method", "all", "--json", *common])
    assert code == 0
    (photo,) = json.loads(out)
    assert len(photo["methods"][NAME]["top_k"]) == 5

    # the photo explorer offers it and shows its predictions
    lab = Lab(model=str(kit["model"]), data_root=kit["data"], results_dir=tmp_path, device="cpu", num_workers=0,
              download=False)
    from clip_utils.app.explorer import photo_explorer

    explorer = photo_explorer(lab, ["cub200"], photo_dir=ROOT / "my_photo")
    assert NAME in explorer.method_boxes and not explorer.method_boxes[NAME].disabled
    assert all("top_k" in r["methods"][NAME] for r in explorer.results if "methods" in r)

    # fewshot --methods: fitted on the sweep's sample, tabled
    code, _ = _run(["fewshot", "--methods", "ncm", "--shots", "2", "--seeds", "1", *common])
    assert code == 0
    with open(tmp_path / "cub200" / "fewshot.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["method"], r["shots"], r["seed"]) for r in rows} == {(NAME, "2", "1")}

    # report: a summary row and a bar in the comparison
    capsys.readouterr()
    code, out = _run(["report", "--results-dir", str(tmp_path)])
    assert code == 0
    with open(tmp_path / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert {r["method"] for r in summary} >= {NAME, "zeroshot"}
    assert (tmp_path / "figures" / "comparison.png").is_file()
    assert (tmp_path / "figures" / "cub200_fewshot.png").is_file()


def test_a_name_is_taken_once():
    with pytest.raises(ValueError, match="already"):
        register(Method(name="another", label="x", command="probe", folder="x", description="x", order=1,
                        run=lambda *a, **k: None, load_classifier=lambda *a, **k: None))
