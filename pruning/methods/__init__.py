"""Every depth-pruning method of the paper's Table 2 behind one interface:
`get_method(name, **options).decide(model, calibration_data, keep) -> PruningDecision`."""

from .base import PruningMethod, latent_psnr, task_loss
from .bk_sdm import BKSDM
from .flux_lite import FluxLite
from .random_min import RandomMin
from .sensitivity import Sensitivity
from .shortgpt import ShortGPT
from .snapfusion import SnapFusion
from .tinyfusion import TinyFusion
from .tinysr import TinySR


METHODS: dict[str, type[PruningMethod]] = {
    method.name: method
    for method in (RandomMin, FluxLite, ShortGPT, Sensitivity, SnapFusion, BKSDM, TinyFusion, TinySR)
}


def get_method(name: str, **options) -> PruningMethod:
    """The method called `name` (see `METHODS`) built with `options`."""
    if name not in METHODS:
        raise ValueError(f"Unknown pruning method {name!r}; choose one of {', '.join(METHODS)}.")
    try:
        return METHODS[name](**options)
    except TypeError as error:  # an option the method does not take
        raise ValueError(f"Invalid options {sorted(options)} for the {name} method: {error}") from None


__all__ = [
    "BKSDM",
    "FluxLite",
    "METHODS",
    "PruningMethod",
    "RandomMin",
    "Sensitivity",
    "ShortGPT",
    "SnapFusion",
    "TinyFusion",
    "TinySR",
    "get_method",
    "latent_psnr",
    "task_loss",
]
