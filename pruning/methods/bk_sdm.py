"""BK-SDM-style: the experience-based baseline of the paper's Table 2."""

from typing import Iterable

from ..decision import PruningDecision
from .base import ModelLike, PruningMethod, check_keep, masked_view


class BKSDM(PruningMethod):
    r"""
    Paper: BK-SDM (Kim et al. 2024) prunes by design, without data: it removes the mid-block of the U-Net and one of the
    two residual-attention pairs of every stage, keeping the outermost parts of each stage.

    Here: for a uniform stack of transformer blocks, a fixed pattern that spreads the kept layers evenly over the depth
    and always keeps the first and the last layer (the input and output ends), `round(i * (L - 1) / (keep - 1))` for
    i = 0..keep-1 (for 12 of 24 layers: 0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23). The calibration data is not used.
    """

    name = "bk-sdm"

    def decide(self, model: ModelLike, calibration_data: Iterable, keep: int) -> PruningDecision:
        with masked_view(model) as masked:
            num_layers = masked.num_layers
        check_keep(keep, num_layers)
        if keep == 1:
            kept = [0]
        else:
            kept = sorted({int(i * (num_layers - 1) / (keep - 1) + 0.5) for i in range(keep)})
        return PruningDecision(self.name, num_layers, kept, details={"rule": "evenly spaced, first and last kept"})
