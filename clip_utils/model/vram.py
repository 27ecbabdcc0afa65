"""Peak GPU memory and wall time of a block of work.

    with VramProbe("cuda", label="lora") as probe:
        run_lora(...)
    probe.peak_allocated_mb, probe.peak_reserved_mb, probe.seconds

Each probe starts from a clean state (garbage collected, caching allocator emptied, peak
counters reset), so methods measured one after another in the same kernel do not inherit
each other's peaks and no restart is needed. Memory still held by live objects (a model you
kept a reference to) is part of the new peak: that is memory the block really needs.

Probes nest: an inner probe (e.g. the one inside `run_lora`) resets CUDA's peak counters,
so before doing so it folds the peak seen so far into every enclosing probe, which
therefore still reports the true peak of its whole block.

On a device without CUDA memory statistics (CPU, MPS) the memory fields stay None and
only the time is recorded.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import torch

MB = 2**20

# Probes currently inside their `with` block, outermost first.
_ACTIVE: list[VramProbe] = []


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


@dataclass
class VramProbe:
    """Context manager recording peak allocated/reserved CUDA memory (MB) and seconds.

    Args:
        device: the device whose memory is measured (`cuda`, `cuda:1`, `cpu`, ...).
        label: a name for the block, kept in `as_dict()`.

    Attributes:
        peak_allocated_mb: peak memory held by tensors (None off CUDA).
        peak_reserved_mb: peak memory reserved by the caching allocator (None off CUDA);
            this is closer to what `nvidia-smi` shows.
        seconds: wall time of the block (CUDA work included: the device is synchronised).
    """

    device: str | torch.device = "cuda"
    label: str = ""
    peak_allocated_mb: float | None = None
    peak_reserved_mb: float | None = None
    seconds: float | None = None
    _start: float = field(default=0.0, init=False, repr=False)
    _folded: tuple[int, int] = field(default=(0, 0), init=False, repr=False)

    def __enter__(self) -> VramProbe:
        if _is_cuda(self.device):
            dev = torch.device(self.device)
            torch.cuda.synchronize(dev)
            for outer in _ACTIVE:
                outer._fold(dev)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        _ACTIVE.append(self)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> bool:
        if _is_cuda(self.device):
            dev = torch.device(self.device)
            torch.cuda.synchronize(dev)
            allocated = max(self._folded[0], torch.cuda.max_memory_allocated(dev))
            reserved = max(self._folded[1], torch.cuda.max_memory_reserved(dev))
            self.peak_allocated_mb = allocated / MB
            self.peak_reserved_mb = reserved / MB
        self.seconds = time.perf_counter() - self._start
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        return False  # never swallow the block's exception

    def _fold(self, dev: torch.device) -> None:
        # An inner probe is about to reset the counters: keep what we saw until now.
        self._folded = (
            max(self._folded[0], torch.cuda.max_memory_allocated(dev)),
            max(self._folded[1], torch.cuda.max_memory_reserved(dev)),
        )

    def as_dict(self) -> dict:
        """`{"label", "peak_allocated_mb", "peak_reserved_mb", "seconds"}` for tables."""
        return {
            "label": self.label,
            "peak_allocated_mb": self.peak_allocated_mb,
            "peak_reserved_mb": self.peak_reserved_mb,
            "seconds": self.seconds,
        }

    def __str__(self) -> str:
        if self.peak_allocated_mb is None:
            return f"{self.label or 'block'}: {self.seconds or 0:.1f} s (no CUDA memory statistics on {self.device})"
        return (
            f"{self.label or 'block'}: {self.seconds:.1f} s, peak {self.peak_allocated_mb:,.0f} MB allocated, "
            f"{self.peak_reserved_mb:,.0f} MB reserved"
        )
