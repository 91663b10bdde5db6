"""Similarity-based baselines of the paper's Table 2: Flux-Lite and ShortGPT score each layer by how much it changes
its input, measured on the image stream of the full model over the calibration data."""

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..decision import PruningDecision
from .base import ModelLike, PruningMethod, calibration_batches, check_keep, keep_top, masked_view


# (block input, block output) of the image stream -> one change value per sample.
ChangeMeasure = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _SimilarityMethod(PruningMethod):
    """Keep the layers whose output differs most from their input (mean of `change` over all calibration samples)."""

    change: ChangeMeasure

    def decide(self, model: ModelLike, calibration_data: Iterable, keep: int) -> PruningDecision:
        with masked_view(model) as masked:
            check_keep(keep, masked.num_layers)
            batches = calibration_batches(calibration_data, masked.transformer.device)
            totals, count = torch.zeros(masked.num_layers, dtype=torch.float64), 0

            def observe(layer: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
                totals[layer] += self.change(h_in.float(), h_out.float()).sum().item()

            with torch.no_grad(), masked.observe(observe):
                for batch in tqdm(batches, desc=f"{self.name}: calibration"):
                    masked(batch.lr)
                    count += batch.lr.shape[0]
        scores = (totals / count).tolist()
        return PruningDecision(self.name, masked.num_layers, keep_top(scores, keep), scores=scores)


class FluxLite(_SimilarityMethod):
    r"""
    Paper: Flux-Lite (Daniel Verdu 2024, Freepik's distilled FLUX.1-lite) removes the blocks whose output is most
    similar to their input, measured by the mean squared error between a block's input and output.

    Here: score of layer l = mean over calibration samples of MSE(h_out, h_in) on the image-stream tokens of the full
    (unpruned) model; the `keep` highest-scoring layers are kept.
    """

    name = "flux-lite"

    @staticmethod
    def change(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        return (h_out - h_in).pow(2).flatten(1).mean(dim=1)


class ShortGPT(_SimilarityMethod):
    r"""
    Paper: ShortGPT (Men et al. 2024) removes the layers of lowest Block Influence, BI = 1 - E[cos(h_in, h_out)] over
    tokens, a layer that barely rotates its hidden states being redundant.

    Here: score of layer l = 1 - the cosine similarity between input and output image-stream token vectors, averaged
    over tokens and calibration samples, on the full model; the `keep` highest-BI layers are kept.
    """

    name = "shortgpt"

    @staticmethod
    def change(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        return (1 - F.cosine_similarity(h_in, h_out, dim=-1)).mean(dim=1)
