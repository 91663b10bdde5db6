"""Random-min: the perturbation-based baseline of the paper's Table 2."""

from typing import Iterable

import torch
from tqdm.auto import tqdm

from ..decision import PruningDecision
from .base import BatchScore, ModelLike, PruningMethod, calibrated_view, evaluate, task_loss


class RandomMin(PruningMethod):
    r"""
    Paper: "We randomly prune models and select one with minimal task loss (LPIPS) for training."

    Here: `num_candidates` masks, each keeping `keep` layers drawn uniformly at random (no block constraint), are
    evaluated on the calibration data with `loss` (default: the task term, MSE of the one-step estimate against the
    high-resolution latents; pass LPIPS on decoded latents to follow the paper to the letter); the lowest-loss mask
    wins. It scores masks, not layers: `scores` is None and every candidate's loss is in `details`.

    Parameters:
        num_candidates (`int`, defaults to `100`): Random masks to try.
        seed (`int`, defaults to `0`): Seed of the candidate draw.
        loss (`Callable`, defaults to the task MSE): `(prediction, batch) -> scalar`, lower is better.
    """

    name = "random-min"

    def __init__(self, num_candidates: int = 100, seed: int = 0, loss: BatchScore = task_loss):
        if num_candidates < 1:
            raise ValueError(f"`num_candidates` must be >= 1, got {num_candidates}.")
        self.num_candidates = num_candidates
        self.seed = seed
        self.loss = loss

    def decide(self, model: ModelLike, calibration_data: Iterable, keep: int) -> PruningDecision:
        with calibrated_view(model, calibration_data, keep) as (masked, batches):
            generator = torch.Generator().manual_seed(self.seed)
            candidates, losses = [], []
            for _ in tqdm(range(self.num_candidates), desc="random-min: candidate masks"):
                kept = sorted(torch.randperm(masked.num_layers, generator=generator)[:keep].tolist())
                mask = torch.zeros(masked.num_layers)
                mask[kept] = 1.0
                candidates.append(kept)
                losses.append(evaluate(masked, batches, mask, self.loss))
        best = min(range(len(losses)), key=losses.__getitem__)
        details = {"num_candidates": self.num_candidates, "seed": self.seed, "best_loss": losses[best]}
        details["candidates"] = [{"keep_layers": c, "loss": value} for c, value in zip(candidates, losses)]
        return PruningDecision(self.name, masked.num_layers, candidates[best], details=details)
