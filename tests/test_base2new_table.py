"""The base-to-new table: CoCoOp's halves, HM of the means, n/a kept as n/a, the CSV and the chart."""

from __future__ import annotations

import math
import statistics

import pytest

from clip_utils.errors import InvalidValue
from clip_utils.figures import base2new as chart
from clip_utils.figures import predictions as plots
from clip_utils.results import base2new as b2n


@pytest.fixture(autouse=True)
def _not_a_demo(monkeypatch):
    monkeypatch.delenv(plots.DEMO_ENV, raising=False)


# Three seeds of each kind of method; CoOp listed before the reference on purpose.
COOP = {1: (80.0, 60.0), 2: (82.0, 63.0), 3: (84.0, 66.0)}
ZEROSHOT = {1: (70.0, 75.0), 2: (70.0, 75.0), 3: (70.0, 75.0)}
TIP = {1: (85.0, 75.0), 2: (86.0, 75.0), 3: (87.0, 75.0)}  # new: zero-shot's, the fallback
PROBE = {1: (88.0, None), 2: (89.0, None), 3: (90.0, None)}


def _rows() -> list[b2n.Run]:
    rows = []
    for method, runs in (("coop", COOP), ("zeroshot", ZEROSHOT), ("tip_adapter", TIP), ("linear_probe", PROBE)):
        rows += [b2n.run(method, seed=s, shots=16, base=b, new=n) for s, (b, n) in runs.items()]
    return rows


def _by_method(summary):
    return {r["method"]: r for r in summary}


@pytest.mark.parametrize(("n", "n_base", "n_new"), [(102, 51, 51), (5, 3, 2), (2, 1, 1)])
def test_halves_cut_as_cocoop(n, n_base, n_new):
    base, new = b2n.halves(n)
    assert (len(base), len(new)) == (n_base, n_new)
    assert base + new == list(range(n))  # label order: base first, nothing lost or repeated


@pytest.mark.parametrize("n", [1, 0, -3])
def test_halves_refuse_fewer_than_two_classes(n):
    with pytest.raises(InvalidValue, match="at least 2 classes"):
        b2n.halves(n)


def test_harmonic_mean():
    assert b2n.harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert b2n.harmonic_mean(50.0, 50.0) == pytest.approx(50.0)
    assert b2n.harmonic_mean(0.0, 0.0) == 0.0
    assert b2n.harmonic_mean(90.0, 0.0) == 0.0


def test_new_sources_follow_the_registry():
    assert b2n.new_source("zeroshot") == "own" and b2n.new_source("coop") == "own"
    assert b2n.new_source("tip_adapter") == "zero-shot"
    assert b2n.new_source("linear_probe") == "n/a"
    assert b2n.NEW_SOURCES == (chart.OWN, chart.FALLBACK, chart.NO_NEW)


def test_summarise_means_stds_and_hm_of_the_means():
    summary = b2n.summarise(_rows())
    coop = _by_method(summary)["coop"]
    assert (coop["seeds"], coop["shots"], coop["label"], coop["new_source"]) == (3, 16, "CoOp", "own")
    assert coop["base"] == pytest.approx(82.0) and coop["base_std"] == pytest.approx(2.0)
    assert coop["new"] == pytest.approx(63.0) and coop["new_std"] == pytest.approx(3.0)
    assert coop["hm"] == pytest.approx(2 * 82 * 63 / (82 + 63))  # CoCoOp: H of the mean base and mean new
    per_seed = statistics.fmean(b2n.harmonic_mean(b, n) for b, n in COOP.values())
    assert not math.isclose(coop["hm"], per_seed)  # ... not the mean of per-seed HMs
    zs = _by_method(summary)["zeroshot"]
    assert zs["base_std"] == 0.0 and zs["new_std"] == 0.0 and zs["hm"] == pytest.approx(2 * 70 * 75 / 145)
    tip = _by_method(summary)["tip_adapter"]
    assert tip["new_source"] == "zero-shot" and tip["new"] == pytest.approx(zs["new"])


def test_summarise_orders_reference_first_then_first_appearance():
    assert [r["method"] for r in b2n.summarise(_rows())] == ["zeroshot", "coop", "tip_adapter", "linear_probe"]


def test_one_seed_has_no_std_as_fewshot_aggregate():
    (row,) = b2n.summarise([b2n.run("coop", seed=1, shots=4, base=80.0, new=60.0)])
    assert row["seeds"] == 1 and row["base_std"] is None and row["new_std"] is None


def test_na_rows_keep_none_and_never_a_number(tmp_path):
    probe = _by_method(b2n.summarise(_rows()))["linear_probe"]
    assert probe["new_source"] == "n/a"
    assert probe["new"] is None and probe["new_std"] is None and probe["hm"] is None
    assert probe["base"] == pytest.approx(89.0)
    with pytest.raises(InvalidValue, match="new accuracy"):  # a closed-set head cannot have a new number
        b2n.run("linear_probe", seed=1, shots=16, base=88.0, new=0.0)
    with pytest.raises(InvalidValue, match="new accuracy"):  # and a method that names them must give one
        b2n.run("coop", seed=1, shots=16, base=88.0, new=None)
    path = b2n.write_table(tmp_path / "b2n.csv", b2n.summarise(_rows()))
    probe_line = next(line for line in path.read_text().splitlines() if line.startswith("linear_probe,"))
    assert probe_line.endswith(",,,,n/a")  # new, new_std and hm empty, never 0 or nan


def test_summarise_refuses_mixed_rows():
    with pytest.raises(InvalidValue, match="more than once"):
        b2n.summarise([b2n.run("coop", seed=1, shots=16, base=80.0, new=60.0)] * 2)
    with pytest.raises(InvalidValue, match=r"\[0, 100\]"):
        b2n.run("coop", seed=1, shots=16, base=0.8, new=160.0)


def test_csv_round_trips(tmp_path):
    summary = b2n.summarise(_rows() + [b2n.run("coop", seed=1, shots=4, base=70.0, new=50.0)])
    path = b2n.write_table(tmp_path / "b2n.csv", summary)
    assert path.read_text().splitlines()[0] == ",".join(b2n.CSV_COLUMNS)
    back = b2n.read_table(path)
    assert len(back) == len(summary)
    for got, want in zip(back, summary, strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == (pytest.approx(value) if isinstance(value, float) else value), key


def test_read_table_refuses_another_csv(tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("dataset,method\nx,y\n")
    with pytest.raises(InvalidValue, match="not a base-to-new table"):
        b2n.read_table(other)


def test_figure_draws_every_kind_of_row(tmp_path):
    summary = b2n.summarise(_rows())
    path = tmp_path / "b2n.png"
    fig = chart.plot_base2new(summary, "flowers102: base-to-new, 16 shots", path=path)
    assert path.is_file() and path.stat().st_size > 0
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("n/a") == 2  # the probe's new and HM: text, no bars
    assert len(ax.patches) == 3 * len(summary) - 2
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert len(hatched) == 2  # Tip-Adapter's new and HM
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert chart.FALLBACK_LEGEND in legend and {"base", "new", "HM"} <= set(legend)
    assert [t.get_text() for t in ax.get_xticklabels()] == [r["label"] for r in summary]
    assert ax.get_ylim() == (0, 110)


def test_figure_refuses_an_empty_table():
    with pytest.raises(InvalidValue, match="no base-to-new results"):
        chart.plot_base2new([], "nothing")
