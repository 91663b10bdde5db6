"""Counting parameters, MACs and FLOPs the way the paper does, on any device including `meta`.

The paper counts multiply-accumulates of Linear and Conv modules only (attention score/value matmuls excluded);
`module_macs` reproduces that. `total_flops` counts every operation, attention included, through torch's
`FlopCounterMode` with the math attention kernel (the CPU flash kernel has no FLOP formula and would count as zero).
Both work on meta tensors, so full-size models are counted without weights or memory.
"""

from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


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
