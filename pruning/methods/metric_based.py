"""Metric-based baselines of the paper's Table 2: sensitivity analysis and SnapFusion-style greedy removal."""

from typing import Iterable

from tqdm.auto import tqdm

from ..decision import PruningDecision
from .base import (
    BatchScore,
    ModelLike,
    PruningMethod,
    calibration_batches,
    check_keep,
    evaluate,
    keep_top,
    latent_psnr,
    masked_view,
    task_loss,
    without,
)


class Sensitivity(PruningMethod):
    r"""
    Paper: sensitivity analysis (Han et al. 2015): the importance of a layer is how much the loss grows when that layer
    alone is removed.

    Here: score of layer l = loss(model without l) - loss(full model) on the calibration data, with `loss` the task
    term by default (MSE of the one-step estimate against the high-resolution latents); the `keep` layers with the
    largest increase are kept. One evaluation per layer, all decided at once.
    """

    name = "sensitivity"

    def __init__(self, loss: BatchScore = task_loss):
        self.loss = loss

    def decide(self, model: ModelLike, calibration_data: Iterable, keep: int) -> PruningDecision:
        with masked_view(model) as masked:
            check_keep(keep, masked.num_layers)
            batches = calibration_batches(calibration_data, masked.transformer.device)
            reference = evaluate(masked, batches, None, self.loss)
            scores = [
                evaluate(masked, batches, without(masked.num_layers, [layer]), self.loss) - reference
                for layer in tqdm(range(masked.num_layers), desc="sensitivity: one layer removed")
            ]
        details = {"reference_loss": reference}
        return PruningDecision(self.name, masked.num_layers, keep_top(scores, keep), scores=scores, details=details)


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
        with masked_view(model) as masked:
            num_layers = masked.num_layers
            check_keep(keep, num_layers)
            batches = calibration_batches(calibration_data, masked.transformer.device)
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
