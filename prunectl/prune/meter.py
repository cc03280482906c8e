"""Wall time and peak memory per phase of a prune run: CUDA's allocator peak, or resident memory sampled on CPU."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class Meter:
    def __init__(self, device, log: Path | None = None) -> None:
        from ..metrics import MetricsLog

        self.device = device
        self.log = MetricsLog(log) if log is not None else None  # one record per phase start and end
        self.phases: list[dict[str, Any]] = []

    def _record(self, **fields) -> None:
        if self.log is not None:
            self.log.log({"step": len(self.phases), **fields})

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @contextmanager
    def phase(self, name: str):
        import torch

        cuda = self.device.type == "cuda"
        peak = [self._rss()]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.02):
                peak[0] = max(peak[0], self._rss())

        sampler = None
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
        self._record(phase=name, event="start")
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            if sampler:
                stop.set()
                sampler.join()
                peak[0] = max(peak[0], self._rss())
            mem = torch.cuda.max_memory_allocated(self.device) if cuda else peak[0]
            self.phases.append({"phase": name, "seconds": round(seconds, 3),
                                "peak_memory_mb": round(mem / 2**20, 1), "memory": "cuda" if cuda else "rss"})
            self._record(event="end", **self.phases[-1])
