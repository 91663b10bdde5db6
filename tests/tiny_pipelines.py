"""Tiny random components and real photos shared by the pipeline, loading and CLI tests (CPU, built here)."""

import numpy as np
import PIL.Image
import skimage.data
import torch

from diffusers import AutoencoderKL, AutoencoderTiny, SD3Transformer2DModel
from tinysr_diffusers import (
    PromptEmbeddings,
    TinySRAutoencoder,
    TinySRPipeline,
    TinySRTransformer2DModel,
    TSDSRPipeline,
)


LATENT_CHANNELS = 16
JOINT_DIM = 32
POOLED_DIM = 24
TEXT_TOKENS = 7


# Image-stream geometry shared by the student and the SD3 teacher (inner width 16).
TINY_DIT = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": LATENT_CHANNELS,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "pos_embed_max_size": 48,
}


def tiny_student_transformer(seed: int = 0, num_layers: int = 2) -> TinySRTransformer2DModel:
    torch.manual_seed(seed)
    return TinySRTransformer2DModel(**TINY_DIT, num_layers=num_layers).eval()


def tiny_sd3_transformer(seed: int = 0, num_layers: int = 4) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        **TINY_DIT,
        num_layers=num_layers,
        joint_attention_dim=JOINT_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=POOLED_DIM,
        out_channels=LATENT_CHANNELS,
    ).eval()


# TAESD topology at 8 channels and one block per resolution, for both tiny-VAE classes.
TINY_TAESD = {
    "encoder_block_out_channels": (8, 8, 8, 8),
    "decoder_block_out_channels": (8, 8, 8, 8),
    "num_encoder_blocks": (1, 1, 1, 1),
    "num_decoder_blocks": (1, 1, 1, 1),
    "latent_channels": LATENT_CHANNELS,
}


def tiny_tinysr_vae(seed: int = 0) -> TinySRAutoencoder:
    torch.manual_seed(seed)
    return TinySRAutoencoder(**TINY_TAESD).eval()


def tiny_autoencoder_tiny(seed: int = 0) -> AutoencoderTiny:
    """diffusers' TAESD class in the SD3 latent space (TAESD3-like: 16 channels, SD3's scaling factor)."""
    torch.manual_seed(seed)
    return AutoencoderTiny(**TINY_TAESD, scaling_factor=1.5305).eval()


def tiny_autoencoder_kl(seed: int = 0, **overrides) -> AutoencoderKL:
    """SD3-style VAE (16 latent channels, no quant convs, SD3's scaling and shift factors), tiny widths."""
    torch.manual_seed(seed)
    config = dict(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return AutoencoderKL(**{**config, **overrides}).eval()


def tiny_prompt_embeddings(seed: int = 0) -> PromptEmbeddings:
    generator = torch.Generator().manual_seed(seed)
    return PromptEmbeddings.from_tensors(
        torch.randn(TEXT_TOKENS, JOINT_DIM, generator=generator),
        torch.randn(POOLED_DIM, generator=generator),
        prompt="a test prompt",
    )


def tiny_student(vae=None, seed: int = 0) -> TinySRPipeline:
    pipe = TinySRPipeline(transformer=tiny_student_transformer(seed), vae=vae or tiny_tinysr_vae(seed))
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
