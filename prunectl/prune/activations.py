"""Calibration hidden states between decoder layers: in host memory up to a budget, in a file beyond it.

At the paper's shapes they are large: 128 x 8192 tokens x 4096 channels are 8.6 GB in bf16, Minitron's 1024
samples 69 GB. The layer-wise pass keeps them in the model's dtype, pinned when they feed a GPU, and when
their total exceeds the budget (calibration.memory_gb) writes them to one file in the run directory and
reads them back a batch at a time: host memory is then the parent plus a batch or two, whatever the
number of samples. The file is read and written with pread/pwrite rather than mapped: a mapping's touched
pages would count as this process's resident memory, which is what the budget bounds.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SPILL_DIR = "calibration-spill"  # under the run directory; removed when the pass ends
GIB = 2**30


def budget_bytes(memory_gb: float | None) -> float:
    """calibration.memory_gb in bytes; None: half of what this job may still use, i.e. of Slurm's grant for the
    node (launch.mem_gb) less this process's resident memory (the parent, already loaded), or outside Slurm
    of the machine's available memory."""
    if memory_gb is not None:
        return memory_gb * GIB
    granted = os.environ.get("SLURM_MEM_PER_NODE")  # MiB
    if granted:
        return max(0.0, int(granted) * 2**20 - _resident()) / 2
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))  # KiB
    return available * 1024 / 2


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class HiddenStates:
    """One tensor per calibration batch (shapes fixed up front), read and overwritten as layers advance."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, budget: float, spill_dir: Path | None,
                 pin: bool) -> None:
        import torch

        self.shapes, self.dtype, self.budget, self.pin = shapes, dtype, budget, pin
        sizes = [math.prod(s) * torch.empty((), dtype=dtype).element_size() for s in shapes]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.nbytes = sum(sizes)
        self.spill_dir = spill_dir if spill_dir is not None and self.nbytes > budget else None
        self._slots: list[torch.Tensor | None] = [None] * len(shapes)
        self._fd = None
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.spill_dir / "hidden.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self._fd, self.nbytes)
            # one page-locked batch for the device's copies in and out (the copies are synchronous)
            self._staging = torch.empty(max(shapes, key=math.prod), dtype=dtype, pin_memory=pin) if pin else None

    @property
    def spilled(self) -> bool:
        return self._fd is not None

    def __len__(self) -> int:
        return len(self.shapes)

    def __iter__(self):
        import torch

        return (self.get(i, torch.device("cpu")).clone() for i in range(len(self)))

    def get(self, i: int, device: torch.device) -> torch.Tensor:
        """Batch i on `device`."""
        if not self.spilled:
            return self._slots[i].to(device, non_blocking=self.pin)
        import torch

        buf = self._staging_for(i) if self.pin else torch.empty(self.shapes[i], dtype=self.dtype)
        _transfer(os.preadv, self._fd, buf, self.offsets[i])
        return buf.to(device)

    def put(self, i: int, h: torch.Tensor) -> None:
        """Batch i becomes `h` (copied; batch i's previous value may be overwritten at once)."""
        import torch

        if not self.spilled:
            if not self.pin:
                self._slots[i] = h.to("cpu")
                return
            if self._slots[i] is None:
                self._slots[i] = torch.empty(self.shapes[i], dtype=self.dtype, pin_memory=True)
            self._slots[i].copy_(h, non_blocking=True)  # ordered on the stream before the next upload
            return
        host = self._staging_for(i).copy_(h) if self.pin else h.to("cpu").contiguous()
        _transfer(os.pwritev, self._fd, host, self.offsets[i])

    def _staging_for(self, i: int) -> torch.Tensor:
        return self._staging.view(-1)[: math.prod(self.shapes[i])].view(self.shapes[i])

    def describe(self) -> dict:
        return {"hidden_states_gb": round(self.nbytes / GIB, 3), "budget_gb": round(self.budget / GIB, 3),
                "dtype": str(self.dtype).removeprefix("torch."), "pinned": self.pin, "spilled": self.spilled}

    def close(self) -> None:
        """Frees the batches and removes the spill file."""
        self._slots = [None] * len(self.shapes)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            shutil.rmtree(self.spill_dir, ignore_errors=True)


def _transfer(call, fd: int, t: torch.Tensor, offset: int) -> None:
    """The whole of host tensor `t` read or written at `offset` (one call moves at most ~2 GiB)."""
    import torch

    view = memoryview(t.view(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        moved = call(fd, [view[done:]], offset + done)
        if moved <= 0:
            raise OSError(f"calibration spill file: short {'read' if call is os.preadv else 'write'} at {offset + done}")
        done += moved
