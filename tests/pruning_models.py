"""Latent data and conditioning helpers for the pruning tests (the toy models live in `pruning.testing`)."""

import torch
from diffusers import SD3Transformer2DModel

from pruning.testing import planted_teacher, tiny_sd3  # noqa: F401  (re-exported for the test modules)


def conditioning(transformer: SD3Transformer2DModel, tokens: int = 3, seed: int = 1) -> dict:
    """Random prompt embeddings and pooled embedding (both streams exercised when tokens > 0)."""
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    return dict(
        encoder_hidden_states=torch.randn(1, tokens, config.joint_attention_dim, generator=generator),
        pooled_projections=torch.randn(config.pooled_projection_dim, generator=generator),
    )


def latents(batch: int = 2, channels: int = 4, size: int = 8, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))
