"""ShortGPT: a similarity-based baseline of the paper's Table 2."""

import torch
import torch.nn.functional as F

from .similarity import _SimilarityMethod


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
