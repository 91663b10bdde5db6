"""What the similarity-based baselines of the paper's Table 2 (Flux-Lite, ShortGPT) share: each layer is scored by how
much it changes its input, measured on the image stream of the full model over the calibration data."""

from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from ..decision import PruningDecision
from .base import ModelLike, PruningMethod, calibrated_view, keep_top


# (block input, block output) of the image stream -> one change value per sample.
ChangeMeasure = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _SimilarityMethod(PruningMethod):
    """Keep the layers whose output differs most from their input (mean of `change` over all calibration samples)."""

    change: ChangeMeasure

    def decide(self, model: ModelLike, calibration_data: Iterable, keep: int) -> PruningDecision:
        with calibrated_view(model, calibration_data, keep) as (masked, batches):
            totals, count = torch.zeros(masked.num_layers, dtype=torch.float64), 0

            def observe(layer: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
                totals[layer] += self.change(h_in.float(), h_out.float()).sum().item()

            with torch.no_grad(), masked.observe(observe):
                for batch in tqdm(batches, desc=f"{self.name}: calibration"):
                    masked(batch.lr)
                    count += batch.lr.shape[0]
        scores = (totals / count).tolist()
        return PruningDecision(self.name, masked.num_layers, keep_top(scores, keep), scores=scores)
