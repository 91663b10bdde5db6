"""Tiny random models shared by the tests (built locally; nothing is downloaded)."""

import torch
from diffusers import SD3Transformer2DModel

from tinysr_diffusers import TinySRAutoencoder


SD3_TINY = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    num_layers=4,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=16,
    pooled_projection_dim=12,
    out_channels=4,
    pos_embed_max_size=24,
)
SD35_TINY = dict(SD3_TINY, qk_norm="rms_norm", dual_attention_layers=(0, 1))
TINY_CONFIGS = {"sd3": SD3_TINY, "sd35": SD35_TINY}


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter random values, so that no gate, shift or bias is trivially zero or one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def tiny_sd3(kind: str = "sd3", seed: int = 0, **overrides) -> SD3Transformer2DModel:
    return randomize_(SD3Transformer2DModel(**{**TINY_CONFIGS[kind], **overrides}), seed).eval()


def tiny_vae(seed: int = 0, **overrides) -> TinySRAutoencoder:
    config = dict(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
    )
    torch.manual_seed(seed)
    return TinySRAutoencoder(**{**config, **overrides}).eval()
