"""The interface the training loop (`training/distill.py`) drives: one `Stage` subclass per stage
(except `prune`, which runs `pruning.MaskLearner`: see `training/stages/prune.py`)."""

import torch

from tinysr_diffusers import TSDSRPipeline
from training.config import TrainConfig


class Stage:
    """What one stage trains and how its loss is computed from a batch: images `{"lr_up", "hr"}` in [-1, 1]
    (`make_batch`), or for the latent stages cached latents `{"lr_latents", "hr_latents"[, "teacher_latents"]}`.

    LPIPS compares the outputs' `fake` images with their `real` ones (default: the batch's HR images)."""

    uses_gan = False
    uses_lpips = False

    def __init__(self, config: TrainConfig, teacher: TSDSRPipeline):
        self.config, self.teacher = config, teacher

    def trainable(self) -> torch.nn.Module:
        raise NotImplementedError

    def generator_outputs(self, model, batch: dict, generator) -> dict:
        """Differentiable outputs: always `loss_terms` (name -> tensor) and, for GAN stages, `fake` images."""
        raise NotImplementedError

    def export(self, model: torch.nn.Module, folder: str) -> None:
        raise NotImplementedError
