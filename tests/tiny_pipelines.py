"""Tiny random components and real photos shared by the pipeline, loading and CLI tests (CPU, built here)."""

import numpy as np
import PIL.Image
import skimage.data
import torch

from diffusers import AutoencoderKL, AutoencoderTiny, SD3Transformer2DModel
from pruning.testing import tiny_sd3, tiny_sd3_config
from tinysr_diffusers import (
    PromptEmbeddings,
    TinySRAutoencoder,
    TinySRPipeline,
    TinySRTransformer2DModel,
    TSDSRPipeline,
)
from tinysr_diffusers.evaluation.reference_configs import SD3_VAE_CONFIG


LATENT_CHANNELS = 16
JOINT_DIM = 32
POOLED_DIM = 24
TEXT_TOKENS = 7


# pruning.testing's tiny SD3 (2 heads of 8) in SD3's 16-channel latent space, with room for 96x96 latents; the
# image-stream part of it is the student's geometry.
_SD3_OVERRIDES = dict(sample_size=16, pos_embed_max_size=48, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                      joint_attention_dim=JOINT_DIM, pooled_projection_dim=POOLED_DIM)  # fmt: skip
_IMAGE_STREAM = ("sample_size", "patch_size", "in_channels", "attention_head_dim", "num_attention_heads",
                 "pos_embed_max_size")  # fmt: skip
TINY_DIT = {key: tiny_sd3_config("sd3", **_SD3_OVERRIDES)[key] for key in _IMAGE_STREAM}


def tiny_student_transformer(seed: int = 0, num_layers: int = 2) -> TinySRTransformer2DModel:
    torch.manual_seed(seed)
    return TinySRTransformer2DModel(**TINY_DIT, num_layers=num_layers).eval()


def tiny_sd3_transformer(seed: int = 0, num_layers: int = 4) -> SD3Transformer2DModel:
    return tiny_sd3("sd3", seed, num_layers=num_layers, **_SD3_OVERRIDES)


# TAESD topology at 8 channels and one block per resolution, for both tiny-VAE classes.
TINY_TAESD = {
    "encoder_block_out_channels": (8, 8, 8, 8),
    "decoder_block_out_channels": (8, 8, 8, 8),
    "num_encoder_blocks": (1, 1, 1, 1),
    "num_decoder_blocks": (1, 1, 1, 1),
    "latent_channels": LATENT_CHANNELS,
}


def tiny_tinysr_vae(seed: int = 0, **overrides) -> TinySRAutoencoder:
    torch.manual_seed(seed)
    return TinySRAutoencoder(**{**TINY_TAESD, **overrides}).eval()


def tiny_autoencoder_tiny(seed: int = 0, **overrides) -> AutoencoderTiny:
    """diffusers' TAESD class in the SD3 latent space (TAESD3-like: 16 channels, SD3's scaling factor)."""
    torch.manual_seed(seed)
    return AutoencoderTiny(**{**TINY_TAESD, "scaling_factor": SD3_VAE_CONFIG["scaling_factor"], **overrides}).eval()


def tiny_autoencoder_kl(seed: int = 0, **overrides) -> AutoencoderKL:
    """SD3's VAE config (16 latent channels, no quant convs, SD3's scaling and shift factors) at tiny widths."""
    torch.manual_seed(seed)
    tiny = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64)
    return AutoencoderKL(**{**SD3_VAE_CONFIG, **tiny, **overrides}).eval()


def tiny_prompt_embeddings(seed: int = 0) -> PromptEmbeddings:
    generator = torch.Generator().manual_seed(seed)
    return PromptEmbeddings.from_tensors(
        torch.randn(TEXT_TOKENS, JOINT_DIM, generator=generator),
        torch.randn(POOLED_DIM, generator=generator),
        prompt="a test prompt",
    )


def tiny_student(vae=None, seed: int = 0, **kwargs) -> TinySRPipeline:
    pipe = TinySRPipeline(transformer=tiny_student_transformer(seed), vae=vae or tiny_tinysr_vae(seed), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_teacher(seed: int = 0, **kwargs) -> TSDSRPipeline:
    pipe = TSDSRPipeline(
        transformer=tiny_sd3_transformer(seed),
        vae=tiny_autoencoder_kl(seed),
        prompt_embeddings=tiny_prompt_embeddings(seed),
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def photo(name: str = "astronaut", size: tuple[int, int] | None = None) -> PIL.Image.Image:
    """A real scikit-image photo (CC0), optionally resized to `size` = (width, height) as a low-resolution input."""
    image = PIL.Image.fromarray(np.asarray(getattr(skimage.data, name)()))
    return image.resize(size, PIL.Image.Resampling.BICUBIC) if size else image
