"""SnapFusion-style greedy removal: a metric-based baseline of the paper's Table 2."""

from typing import Iterable

from tqdm.auto import tqdm

from ..decision import PruningDecision
from .base import BatchScore, ModelLike, PruningMethod, calibrated_view, evaluate, latent_psnr, without


class SnapFusion(PruningMethod):
    r"""
    Paper: SnapFusion (Li et al. 2023) evolves the architecture by repeatedly removing the block whose removal costs
    the least quality (CLIP score / FID drop) per unit of latency saved, re-evaluating after every removal.

    Here: greedy, iterative removal. Each round evaluates `metric` (default: PSNR of the one-step estimate against the
    high-resolution latents, higher is better) with each remaining layer removed, and removes the layer with the
    smallest drop; rounds continue until `keep` layers remain. All SD3 blocks cost the same (the last one's text stream
    aside, which does not run in the one-step SR recipe), so the drop is not divided by a latency. A layer's score is
    minus the metric drop measured in the last round it took part in (higher = more worth keeping).
    """

    name = "snapfusion"

    def __init__(self, metric: BatchScore = latent_psnr):
        self.metric = metric

    def decide(self, model: ModelLike, calibration_data: Iterable, keep: int) -> PruningDecision:
        with calibrated_view(model, calibration_data, keep) as (masked, batches):
            num_layers = masked.num_layers
            current = evaluate(masked, batches, None, self.metric)
            removed, scores, trajectory = [], [0.0] * num_layers, [current]
            for _ in tqdm(range(num_layers - keep), desc="snapfusion: greedy removal"):
                drops = {}
                for layer in range(num_layers):
                    if layer not in removed:
                        drops[layer] = current - evaluate(
                            masked, batches, without(num_layers, removed + [layer]), self.metric
                        )
                        scores[layer] = -drops[layer]
                victim = min(drops, key=lambda layer: (drops[layer], layer))
                removed.append(victim)
                current -= drops[victim]
                trajectory.append(current)
        kept = [layer for layer in range(num_layers) if layer not in removed]
        details = {"removal_order": removed, "metric_after_each_removal": trajectory}
        return PruningDecision(self.name, num_layers, kept, scores=scores, details=details)
