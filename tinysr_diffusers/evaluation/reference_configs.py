"""Configurations of the paper's reference architectures, for counting and benchmarking without weights.

SD3-medium's transformer and VAE configs as published with `stabilityai/stable-diffusion-3-medium-diffusers`, the
teacher TSD-SR's fixed prompt length, and the TinySR student layout of the paper (12 of 24 layers).
"""

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel

from ..models import TinySRAutoencoder, TinySRTransformer2DModel


SD3_MEDIUM_TRANSFORMER_CONFIG = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)

SD3_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

# TSD-SR's fixed prompt: 77 CLIP + 256 T5 tokens of width 4096, pooled embedding of width 2048.
TSDSR_PROMPT_TOKENS = 333

# The paper's TinySR student keeps 12 of SD3-medium's 24 layers. The image-stream counts do not depend on which;
# the with-text-and-time count (paper: 1010 M) does, and matches only if the last (`context_pre_only`) block is kept.
TINYSR_KEEP_LAYERS = tuple(range(1, 24, 2))


def sd3_medium_transformer(device: "str | torch.device" = "meta") -> SD3Transformer2DModel:
    """SD3-medium's transformer with uninitialised (meta) or random weights."""
    with torch.device(device):
        return SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER_CONFIG).eval()


def sd3_vae(device: "str | torch.device" = "meta") -> AutoencoderKL:
    """SD3's VAE with uninitialised (meta) or random weights."""
    with torch.device(device):
        return AutoencoderKL(**SD3_VAE_CONFIG).eval()


def tinysr_transformer(
    teacher: SD3Transformer2DModel, keep_layers=TINYSR_KEEP_LAYERS
) -> TinySRTransformer2DModel:
    """The paper's student cut from `teacher` (on the teacher's device)."""
    return TinySRTransformer2DModel.from_sd3(
        teacher, keep_layers, pooled_projections=torch.zeros(teacher.config.pooled_projection_dim)
    )


def tinysr_vae(device: "str | torch.device" = "meta", **config) -> TinySRAutoencoder:
    """The TinySR tiny VAE (paper defaults: separable encoder, standard decoder) with any config overrides."""
    with torch.device(device):
        return TinySRAutoencoder(**config).eval()
