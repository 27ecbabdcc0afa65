"""Figures as a newcomer reads them: names that fit, bars that show, labels in their units, demo marks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clip_utils.figures import predictions as plots
from clip_utils.figures import training as charts


@pytest.fixture(autouse=True)
def _not_a_demo(monkeypatch):
    monkeypatch.delenv(plots.DEMO_ENV, raising=False)


def _drawn(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _confusion(n: int, **kwargs):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(n), 3)
    preds = np.where(rng.random(len(labels)) < 0.5, labels, rng.integers(0, n, len(labels)))
    names = [f"class name number {i}" for i in range(n)]
    return plots.plot_confusion(labels, preds, names, "test", **kwargs), names


def _spans(labels, renderer, axis: int) -> list[tuple[float, float]]:
    boxes = [t.get_window_extent(renderer) for t in labels if t.get_visible() and t.get_text()]
    return sorted((b.y0, b.y1) if axis else (b.x0, b.x1) for b in boxes)


@pytest.mark.parametrize("n", [102, 200])
def test_confusion_names_classes_only_where_they_fit(n):
    fig, names = _confusion(n)
    heat = fig.axes[0]
    renderer = _drawn(fig)
    for labels, axis in ((heat.get_yticklabels(), 1), (heat.get_xticklabels(), 0)):
        spans = _spans(labels, renderer, axis)
        assert spans and all(a[1] <= b[0] + 0.5 for a, b in zip(spans, spans[1:])), "tick labels overlap"
        assert min(t.get_fontsize() for t in labels) >= plots.MIN_LABEL_PT
    shown = [t.get_text() for t in heat.get_yticklabels()]
    if len(shown) < n:  # every k-th class, and the axis says so
        assert "named" in heat.get_ylabel() and set(shown) <= set(names)
    # the side panel still names the worst pairs in full
    assert any("->" in t.get_text() and "class name number" in t.get_text() for t in fig.axes[-1].texts)


def test_cub_sized_confusion_cannot_name_every_class_but_flowers_and_smaller_name_all():
    fig, _ = _confusion(200)
    assert 0 < len(fig.axes[0].get_yticklabels()) < 200
    for n in (20, 102):
        fig, names = _confusion(n)
        assert sorted(t.get_text() for t in fig.axes[0].get_yticklabels()) == sorted(names), n
        assert sorted(t.get_text() for t in fig.axes[0].get_xticklabels()) == sorted(names), n


def test_tick_layout_steps_then_gives_up():
    assert plots.tick_layout(20, 30.0) == (1, 9.0)
    k, size = plots.tick_layout(200, 2.7)
    assert k > 1 and size >= plots.MIN_LABEL_PT and k * 2.7 >= size * plots.LINE_HEIGHT
    assert plots.tick_layout(5000, 0.1) == (0, 0.0)


ROWS = [
    {"dataset": ds, "method": m, "top1": t1, "top5": 0.9, "mean_per_class": t1, "trainable_params": p,
     "train_seconds": s, "peak_vram_mb": None}
    for ds in ("flowers102", "cub200")
    for m, t1, p, s in (("zeroshot", 0.00585, 0, 0.0), ("linear_probe", 0.296, 1734, 2.517),
                        ("lora", 0.181, 3782, 1890.4))
]


def _labels(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_comparison_shows_every_parameter_bar_and_labels_each_panel_in_its_unit():
    fig = charts.plot_comparison(ROWS)
    top1, _, _, params, time, vram = fig.axes
    bottom, top = params.get_ylim()
    smallest = min(r["trainable_params"] for r in ROWS if r["trainable_params"])
    # every bar spans at least a decade of the log axis: no sliver for the probe
    assert bottom <= smallest / 10 and top > max(r["trainable_params"] for r in ROWS)
    assert sorted(set(_labels(params))) == ["1.7k", "3.8k"]
    assert {"0.6", "29.6", "18.1"} <= set(_labels(top1))
    assert {"0 s", "2.5 s", "1,890 s"} <= set(_labels(time))
    # on CPU no VRAM was measured: no axis from -0.04 to 0.04 MB, but a sentence
    assert not vram.axison and _labels(vram) == [charts.NOT_RECORDED]


def test_comparison_draws_vram_bars_when_cuda_measured_them():
    rows = [dict(r, peak_vram_mb=1234.4 if r["method"] == "lora" else 310.0) for r in ROWS]
    vram = charts.plot_comparison(rows).axes[5]
    assert vram.axison and {"1,234 MB", "310 MB"} <= set(_labels(vram))


@pytest.mark.parametrize(("value", "text"), [(850, "850"), (3782, "3.8k"), (786_432, "786.4k"),
                                             (1_234_567, "1.2M")])
def test_parameter_counts_read_as_people_say_them(value, text):
    assert charts.count(value) == text


def test_epoch_axes_tick_whole_epochs():
    curves = [{"epoch": e, "train_loss": 2 / e, "val_loss": 2.1 / e, "val_acc": 0.2 * e} for e in (1, 2, 3)]
    for fig in (charts.plot_curves(curves, "run"), charts.plot_dynamics({"linear_probe": curves, "lora": curves}, "d")):
        _drawn(fig)
        for ax in fig.axes:
            lo, hi = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_prompt_chart_keeps_its_title_clear_of_value_labels():
    fig = plots.plot_prompt_comparison({"flowers102": {"default": 0.995, "domain": 1.0}, "cub200": {"auto": 0.98}})
    ax = fig.axes[0]
    renderer = _drawn(fig)
    title = ax.title.get_window_extent(renderer)
    labels = [t.get_window_extent(renderer) for t in ax.texts]
    assert labels and all(box.y1 < title.y0 for box in labels)
    assert max(ax.get_yticks()) <= 100


def test_sample_grid_title_says_how_the_images_were_picked(tmp_path):
    paths = []
    for i in range(40):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (8, 8), (i * 6, 0, 0)).save(paths[-1])
    labels = np.arange(40) % 4
    preds = labels.copy()
    preds[:8] = (preds[:8] + 1) % 4  # 8 mistakes in 40: top-1 80%
    fig = plots.plot_sample_predictions(paths, labels, preds, ["a", "b", "c", "d"], n=16, title="cub200 LoRA")
    assert fig._suptitle.get_text() == (
        "cub200 LoRA\nsample predictions: 8 right, 8 wrong, picked to show both; top-1 80.0% overall")
    assert plots.sample_caption(labels, labels, range(4)).startswith("sample predictions: 4 right (no mistakes")


def test_demo_figures_carry_a_visible_mark(monkeypatch, tmp_path):
    plain = charts.plot_curves([{"epoch": 1, "train_loss": 1, "val_loss": 1, "val_acc": 0.5}], "run")
    assert not any(plots.DEMO_MARK in t.get_text() for t in plain.texts)
    monkeypatch.setenv(plots.DEMO_ENV, "1")
    for fig in (charts.plot_comparison(ROWS, path=tmp_path / "c.png"), _confusion(20)[0]):
        (mark,) = [t for t in fig.texts if t.get_text() == plots.DEMO_MARK]
        assert mark.get_visible()
    # the saved PNG keeps the mark above the content: taller than the same figure unmarked
    monkeypatch.delenv(plots.DEMO_ENV)
    charts.plot_comparison(ROWS, path=tmp_path / "plain.png")
    assert Image.open(tmp_path / "c.png").height > Image.open(tmp_path / "plain.png").height
