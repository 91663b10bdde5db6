"""Flux-Lite: a similarity-based baseline of the paper's Table 2."""

import torch

from .similarity import _SimilarityMethod


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
