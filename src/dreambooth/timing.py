"""Wall-clock time per training phase (data, forward, backward, optimizer), for benchmarks and logs.

GPU work is asynchronous, so a phase's time only means something if the GPU is synchronised at
its end; that costs a little speed, so it happens only when `synchronize` is on (the bench turns
it on; training runs leave it off and record only whole-step times).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Seconds spent in each named phase, summed per step (`seconds[phase]` holds one total a step)."""

    def __init__(self, synchronize: bool):
        self.synchronize = synchronize and torch.cuda.is_available()
        self.seconds: dict[str, list[float]] = defaultdict(list)  # phase -> per-step totals
        self._current: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        if self.synchronize:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.synchronize:
            torch.cuda.synchronize()
        self._current[name] += time.perf_counter() - start

    def end_step(self) -> None:
        """Close the step: each phase's time summed over its micro-batches."""
        for name, value in self._current.items():
            self.seconds[name].append(value)
        self._current.clear()
