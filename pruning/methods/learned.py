"""What the probability-based methods of the paper's Table 2 (TinyFusion, TinySR) share: a [`MaskLearner`] run."""

import dataclasses
from typing import Iterable, Optional

from tinysr_diffusers.utils import PathLike

from ..decision import PruningDecision
from ..learner import MaskLearner, MaskLearnerConfig
from .base import ModelLike, PruningMethod, check_keep, masked_view


class _LearnedMethod(PruningMethod):
    """Learn the mask with [`MaskLearner`] in the search space of `search` (one of `pruning.config.SEARCHES`)."""

    search: str

    def __init__(self, output_dir: Optional[PathLike] = None, **config):
        """`config`: any [`MaskLearnerConfig`] field but `keep` and `search` (e.g. `max_steps`, `block_size`)."""
        fields = {f.name for f in dataclasses.fields(MaskLearnerConfig)} - {"keep", "search"}
        unknown = set(config) - fields
        if unknown:
            raise ValueError(f"Unknown {self.name} options {sorted(unknown)}; choose from {sorted(fields)}.")
        self.config = config
        self.output_dir = output_dir

    def decide(self, model: ModelLike, calibration_data: Iterable, keep: int) -> PruningDecision:
        config = MaskLearnerConfig(keep=keep, search=self.search, **self.config)
        with masked_view(model) as masked:
            check_keep(keep, masked.num_layers)
            with masked.unmasked() as transformer:  # the learner copies and wraps the plain model
                learner = MaskLearner(transformer, config, output_dir=self.output_dir, **masked.conditioning)
                return learner.train(calibration_data)
