"""VramProbe: clean start, peaks read at the end, nesting, and None on CPU."""

from __future__ import annotations

import pytest
import torch

from clip_utils.model.vram import MB, VramProbe


class FakeCuda:
    """Stands in for torch.cuda: a log of calls and a settable peak counter."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.peak = 0  # bytes since the last reset
        self.reserved_extra = 10 * MB

    def allocate(self, nbytes: int) -> None:
        self.peak = max(self.peak, nbytes)

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: self.calls.append("synchronize"))
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: self.calls.append("empty_cache"))
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self._reset)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", self._allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", self._reserved)

    def _reset(self, device=None) -> None:
        self.calls.append("reset")
        self.peak = 0

    def _allocated(self, device=None) -> int:
        self.calls.append("read")
        return self.peak

    def _reserved(self, device=None) -> int:
        return self.peak + self.reserved_extra


@pytest.fixture
def fake_cuda(monkeypatch) -> FakeCuda:
    fake = FakeCuda()
    fake.install(monkeypatch)
    return fake


def test_resets_before_and_reads_after(fake_cuda):
    fake_cuda.allocate(999 * MB)  # a previous method's peak must not leak into this one
    with VramProbe("cuda", label="probe") as probe:
        assert fake_cuda.calls[-1] == "reset"
        assert "empty_cache" in fake_cuda.calls and "read" not in fake_cuda.calls
        fake_cuda.allocate(300 * MB)
    assert fake_cuda.calls[-1] == "read"
    assert probe.peak_allocated_mb == 300
    assert probe.peak_reserved_mb == 310
    assert probe.seconds >= 0
    assert probe.as_dict()["label"] == "probe"


def test_methods_measured_in_turn_do_not_mix(fake_cuda):
    with VramProbe("cuda") as first:
        fake_cuda.allocate(800 * MB)
    with VramProbe("cuda") as second:
        fake_cuda.allocate(100 * MB)
    assert (first.peak_allocated_mb, second.peak_allocated_mb) == (800, 100)


def test_outer_probe_keeps_the_peak_an_inner_probe_reset(fake_cuda):
    with VramProbe("cuda") as outer:
        fake_cuda.allocate(500 * MB)  # e.g. loading the model
        with VramProbe("cuda") as inner:
            fake_cuda.allocate(200 * MB)
        fake_cuda.allocate(50 * MB)
    assert inner.peak_allocated_mb == 200
    assert outer.peak_allocated_mb == 500


def test_records_even_when_the_block_raises(fake_cuda):
    with pytest.raises(RuntimeError, match="boom"), VramProbe("cuda") as probe:
        fake_cuda.allocate(42 * MB)
        raise RuntimeError("boom")
    assert probe.peak_allocated_mb == 42


def test_cpu_records_time_and_no_memory():
    with VramProbe("cpu", label="cpu run") as probe:
        torch.randn(100, 100) @ torch.randn(100, 100)
    assert probe.peak_allocated_mb is None and probe.peak_reserved_mb is None
    assert probe.seconds is not None and probe.seconds >= 0
    assert "no CUDA memory statistics" in str(probe)
