"""The benchmark's CPU smoke mode, as CI runs it."""

from __future__ import annotations

import json

from clip_utils.app import bench


def test_small_benchmark_prints_the_side_by_side_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--small", "--images", "24", "--device", "cpu", "--workers", "0", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for pipeline in ("textbook (HF processor", "input path alone", "ours, images only", "prompt sets' text",
                     "model alone (batch", "scikit-learn", "epochs on cached features",
                     "ours (batch 32, augmented, train.fit)", "grad checkpointing"):
        assert pipeline in table
    rows = json.loads(out.read_text())["rows"]
    sections = {r["section"] for r in rows}
    assert sections == {"zero-shot", "linear probe", "LoRA train", "few-shot fits"}
    fits = {r["pipeline"] for r in rows if r["section"] == "few-shot fits"}
    assert {"Tip-Adapter", "GDA", "LP++", "CLIP-Adapter"} <= fits  # every method with a feature-level fit
    for section in sections - {"few-shot fits"}:  # each has its textbook baseline, so every ratio is defined
        assert any(r["section"] == section and r["pipeline"].startswith("textbook") for r in rows), section
    assert all(r["images_per_s"] > 0 and r["seconds"] > 0 for r in rows)


def test_generated_jpegs_look_like_flowers102(tmp_path):
    from PIL import Image

    paths = bench.make_jpegs(tmp_path, 4)
    sizes = [Image.open(p).size for p in paths]
    assert all(min(s) == 500 for s in sizes)
    kb = [(tmp_path / p).stat().st_size / 1e3 for p in paths]
    assert all(50 < k < 95 for k in kb), kb
