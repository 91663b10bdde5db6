"""Tiny random models shared by the tests (built locally; nothing is downloaded)."""

import torch
from diffusers import SD3Transformer2DModel

from pruning.testing import tiny_sd3_config
from tinysr_diffusers import TinySRAutoencoder


# pruning.testing's tiny SD3 with 4 layers, room for latents up to 48x48 and wider text and pooled embeddings.
_TRANSFORMER_TESTS = dict(num_layers=4, sample_size=16, pos_embed_max_size=24, joint_attention_dim=32,
                          pooled_projection_dim=12)  # fmt: skip
TINY_CONFIGS = {
    "sd3": tiny_sd3_config("sd3", **_TRANSFORMER_TESTS),
    "sd35": tiny_sd3_config("sd3.5", **_TRANSFORMER_TESTS, dual_attention_layers=(0, 1)),
}


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
