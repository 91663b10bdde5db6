"""Peak memory of one call, on CUDA (allocator statistics) and on CPU (the process's resident set, Linux), and the
peak of the whole process across those calls."""

import ctypes
import ctypes.util
import gc
from typing import Optional

import torch


_peak_before_reset_mib = 0.0  # the largest VmHWM that `reset_rss_peak` cleared, so that `process_peak_mib` keeps it


def status_mib(field: str, path: str = "/proc/self/status") -> float:
    """A memory field of a /proc file (`VmRSS`, `VmHWM` of /proc/self/status, `MemTotal` of /proc/meminfo) in MiB."""
    with open(path) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{path} has no {field}")


def reset_rss_peak() -> None:
    """Reset the process's peak resident size (`VmHWM`) to its current resident size (Linux)."""
    global _peak_before_reset_mib
    _peak_before_reset_mib = max(_peak_before_reset_mib, status_mib("VmHWM"))
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _status_or_none(field: str, path: str = "/proc/self/status") -> Optional[float]:
    try:
        return status_mib(field, path)
    except (OSError, RuntimeError):
        return None


def process_peak_mib() -> Optional[float]:
    """The process's peak resident set since it started, in MiB, across the resets of `PeakMemory` (which clear
    `VmHWM` before every measured call); `None` outside Linux."""
    current = _status_or_none("VmHWM")
    return None if current is None else max(_peak_before_reset_mib, current)


def release_free_memory(full: bool = False) -> None:
    """Collect garbage and hand freed heap memory back to the OS, so that resident memory shows what is still held.

    glibc keeps freed blocks resident until `malloc_trim`. By default only the young generations are collected (what
    earlier calls left in cycles; a full collection costs ~0.5 s with diffusers loaded); `full` also frees the old
    ones, e.g. a model that is done with.
    """
    gc.collect(2 if full else 1)
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


class MemoryLog:
    """The process's resident memory and its peak so far at named stages of a run (MiB; `None` outside Linux): what
    each build holds and what each free hands back."""

    def __init__(self):
        self.stages: list[dict] = []

    def __call__(self, stage: str) -> None:
        resident, peak = _status_or_none("VmRSS"), process_peak_mib()
        self.stages.append(
            {
                "stage": stage,
                "rss_mib": None if resident is None else round(resident, 1),
                "peak_mib": None if peak is None else round(peak, 1),
            }
        )


def machine_memory_mib() -> Optional[float]:
    """The machine's total memory in MiB (`MemTotal`, Linux)."""
    return _status_or_none("MemTotal", "/proc/meminfo")


class PeakMemory:
    """Measure the extra memory a call needs at its peak, above what was allocated before it (weights included).

    CUDA: `torch.cuda.max_memory_allocated` minus `memory_allocated` before the call (tensors only, not the caching
    allocator's reserve). CPU: the process's peak resident set size (`VmHWM`, reset just before the call after freed
    memory is returned to the OS with `malloc_trim`) minus its resident size before the call; it counts every
    activation and workspace, but also anything else the process maps meanwhile. `None` where neither is available
    (CPU outside Linux).
    """

    def __init__(self, device: "str | torch.device"):
        self.device = torch.device(device)
        self.available = self.device.type == "cuda" or _linux_peak_available()
        self._before = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            gc.collect(1)
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device) / 2**20
        elif self.available:
            release_free_memory()
            reset_rss_peak()
            self._before = status_mib("VmRSS")

    def stop(self) -> Optional[float]:
        """Peak extra MiB since `start`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self._before
        if self.available:
            return max(status_mib("VmHWM") - self._before, 0.0)
        return None


def _linux_peak_available() -> bool:
    try:
        status_mib("VmHWM")
        reset_rss_peak()
    except (OSError, RuntimeError):
        return False
    return True
