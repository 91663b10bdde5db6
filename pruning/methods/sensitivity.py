"""Sensitivity analysis: a metric-based baseline of the paper's Table 2."""

from typing import Iterable

from tqdm.auto import tqdm

from ..decision import PruningDecision
from .base import BatchScore, ModelLike, PruningMethod, calibrated_view, evaluate, keep_top, task_loss, without


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
        with calibrated_view(model, calibration_data, keep) as (masked, batches):
            reference = evaluate(masked, batches, None, self.loss)
            scores = [
                evaluate(masked, batches, without(masked.num_layers, [layer]), self.loss) - reference
                for layer in tqdm(range(masked.num_layers), desc="sensitivity: one layer removed")
            ]
        details = {"reference_loss": reference}
        return PruningDecision(self.name, masked.num_layers, keep_top(scores, keep), scores=scores, details=details)
