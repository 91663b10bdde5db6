"""Toy SD3 / SD3.5 transformers for checking pruning code: tiny random models, and teachers with a planted answer.

A planted teacher has exact identity layers beside layers that all matter, so the right mask is known in advance:
the tests and `benchmarks/pruning_planted.py` use it to check that a method finds it.
"""

from typing import Sequence

import torch
from diffusers import SD3Transformer2DModel

from tinysr_diffusers.evaluation.reference_configs import SD3_MEDIUM_TRANSFORMER_CONFIG


# SD3-medium's transformer (same keys, patch size and block layout) shrunk to a few thousand parameters: the one
# tiny SD3 configuration of the project. The test fixtures in `tests/` derive theirs with `tiny_sd3_config`.
SD3_TINY = dict(
    SD3_MEDIUM_TRANSFORMER_CONFIG,
    sample_size=8, pos_embed_max_size=8, in_channels=4, out_channels=4,  # 8x8 latents of 4 channels
    num_layers=8, num_attention_heads=2, attention_head_dim=8,  # 8 blocks of width 16
    joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6,  # text and pooled widths
)  # fmt: skip
SD35_TINY = dict(SD3_TINY, qk_norm="rms_norm", dual_attention_layers=(0, 1, 2, 6))
CONFIGS = {"sd3": SD3_TINY, "sd3.5": SD35_TINY}


def tiny_sd3_config(kind: str = "sd3", **overrides) -> dict:
    """The tiny `SD3Transformer2DModel` config of `kind` (`"sd3"` or `"sd3.5"`) with `overrides` applied."""
    return dict(CONFIGS[kind], **overrides)


def tiny_sd3(kind: str = "sd3", seed: int = 0, **overrides) -> SD3Transformer2DModel:
    """A randomly initialised 8-layer SD3 (`"sd3"`) or SD3.5-style (`"sd3.5"`: qk-norm, dual attention) model."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**tiny_sd3_config(kind, **overrides)).eval()


def planted_teacher(
    kind: str, identity_layers: Sequence[int], strength: float = 1.0, seed: int = 0
) -> SD3Transformer2DModel:
    """
    A teacher whose `identity_layers` are exact identities (every residual gate zero: image, dual-attention and text
    streams) while all other layers are one and the same block (shared weights, residual gates `strength`), so they
    push the image stream the same way and each of them clearly matters.
    """
    transformer = tiny_sd3(kind, seed=seed)
    blocks, dim = transformer.transformer_blocks, transformer.inner_dim
    important = [layer for layer in range(len(blocks)) if layer not in identity_layers]
    reference = blocks[important[0]].state_dict()
    with torch.no_grad():
        for layer in important[1:]:
            own = blocks[layer].state_dict()
            blocks[layer].load_state_dict(
                {k: v for k, v in reference.items() if k in own and own[k].shape == v.shape}, strict=False
            )
        for layer, block in enumerate(blocks):
            value = 0.0 if layer in identity_layers else strength
            gates = (2, 5, 8) if block.use_dual_attention else (2, 5)  # gate_msa, gate_mlp, gate_msa2
            for chunk in gates:
                block.norm1.linear.weight[chunk * dim : (chunk + 1) * dim] = 0
                block.norm1.linear.bias[chunk * dim : (chunk + 1) * dim] = value
            if not block.context_pre_only:
                for chunk in (2, 5):  # c_gate_msa, c_gate_mlp
                    block.norm1_context.linear.weight[chunk * dim : (chunk + 1) * dim] = 0
                    block.norm1_context.linear.bias[chunk * dim : (chunk + 1) * dim] = value
    return transformer
