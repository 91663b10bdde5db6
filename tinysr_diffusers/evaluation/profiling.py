"""Counting parameters, MACs and FLOPs the way the paper does, on any device including `meta`, and naming the CPU
that a latency was measured on.

The paper counts multiply-accumulates of Linear and Conv modules only (attention score/value matmuls excluded);
`module_macs` reproduces that. `total_flops` counts every operation, attention included, through torch's
`FlopCounterMode` with the math attention kernel (the CPU flash kernel has no FLOP formula and would count as zero).
Both work on meta tensors, so full-size models are counted without weights or memory.
"""

import platform
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


# The CPU flags (/proc/cpuinfo's names) of the matrix instructions that CPU latencies depend on, best first.
MATRIX_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512f", "avx2")


def count_parameters(modules: "nn.Module | Iterable[nn.Module]") -> int:
    """Number of parameters of one module or several (shared parameters counted once)."""
    if isinstance(modules, nn.Module):
        modules = [modules]
    unique = {id(p): p for module in modules for p in module.parameters()}
    return sum(p.numel() for p in unique.values())


def _layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    kernel = module.weight.shape[2:].numel()
    return output.numel() * (module.in_channels // module.groups) * kernel


def module_macs(fn: Callable[[], object], model: nn.Module) -> int:
    """MACs of the Linear and Conv modules of `model` executed while `fn()` runs (biases not counted)."""
    total = 0

    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += _layer_macs(module, output)

    handles = [
        module.register_forward_hook(hook)
        for module in model.modules()
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    ]
    try:
        with torch.no_grad():
            fn()
    finally:
        for handle in handles:
            handle.remove()
    return total


def total_flops(fn: Callable[[], object], backend: Optional[SDPBackend] = SDPBackend.MATH) -> int:
    """Every floating-point operation of `fn()` (a multiply-add is 2 FLOPs), attention matmuls included."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(backend), counter:
        fn()
    return counter.get_total_flops()


def cpu_model() -> str:
    """The CPU's model name and its matrix extensions, e.g. "AMD EPYC (avx2)"; every CPU latency figure names it (the
    extensions decide which dtype and runtime are fastest)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    extensions = [flag for flag in MATRIX_FLAGS if flag in flags]
    return f"{name} ({', '.join(extensions)})" if extensions else name
