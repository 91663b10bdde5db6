"""TinyFusion: a probability-based method of the paper's Table 2 (local gates only)."""

from .learned import _LearnedMethod


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
