"""TinySR: a probability-based method of the paper's Table 2 (local gates, Dynamic Inter-block Activation and
Expansion-Corrosion)."""

from .learned import _LearnedMethod


class TinySR(_LearnedMethod):
    r"""
    Paper: TinySR's mask learning: TinyFusion's local gates plus Dynamic Inter-block Activation (pair operators moving
    one kept layer between two adjacent blocks) and the Expansion-Corrosion strategy; the decision applies the most
    probable operator of each pair to the most probable pattern of each block.

    Here: [`MaskLearner`] with `search="tinysr"`; options are [`MaskLearnerConfig`] fields.
    """

    name = search = "tinysr"
