"""Probability-based methods of the paper's Table 2: TinyFusion (local gates) and TinySR (local + DIA + EC)."""

import dataclasses
from typing import Iterable, Optional

from tinysr_diffusers.utils import PathLike

from ..decision import PruningDecision
from ..learner import MaskLearner, MaskLearnerConfig
from .base import ModelLike, PruningMethod, check_keep, masked_view


class _LearnedMethod(PruningMethod):
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


class TinyFusion(_LearnedMethod):
    r"""
    Paper: TinyFusion (Fang et al. 2024): learnable depth pruning with one categorical distribution per block of M
    layers over its N-of-M patterns, sampled with Gumbel-softmax and trained jointly with LoRA; the decision is the
    most probable pattern of every block.

    Here: [`MaskLearner`] with `search="tinyfusion"` (local gates only, the static block-wise space), the paper's loss
    and LoRA; options are [`MaskLearnerConfig`] fields (e.g. `max_steps`, `block_size`). `keep` must be expressible
    as the same number of layers in every block.
    """

    name = search = "tinyfusion"


class TinySR(_LearnedMethod):
    r"""
    Paper: TinySR's mask learning: TinyFusion's local gates plus Dynamic Inter-block Activation (pair operators moving
    one kept layer between two adjacent blocks) and the Expansion-Corrosion strategy; the decision applies the most
    probable operator of each pair to the most probable pattern of each block.

    Here: [`MaskLearner`] with `search="tinysr"`; options are [`MaskLearnerConfig`] fields.
    """

    name = search = "tinysr"
