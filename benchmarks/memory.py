"""Peak memory of one call, on CUDA (allocator statistics) and on CPU (the process's resident set, Linux)."""

import ctypes
import ctypes.util
import gc
from typing import Optional

import torch


def status_mib(field: str) -> float:
    """A memory field of `/proc/self/status` (`VmRSS`, `VmHWM`, ...) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_rss_peak() -> None:
    """Reset the process's peak resident size (`VmHWM`) to its current resident size (Linux)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _release_free_memory() -> None:
    # glibc keeps freed blocks resident; hand them back so that the next peak counts only what the call allocates.
    # The young generations hold what earlier calls left in cycles; a full collection costs ~0.5 s with diffusers loaded.
    gc.collect(1)
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


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
            _release_free_memory()
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
