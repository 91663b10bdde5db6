"""What training encodes: the posterior mode of an `AutoencoderKL` teacher VAE, the latents the tiny encoder learns."""

import torch

from training.latents import encode_batch, training_latents
from training.stages.vae import unscaled_latents

from .tiny_pipelines import tiny_teacher


def test_training_latents_are_the_posterior_mode_that_the_vae_encoder_stage_targets():
    teacher = tiny_teacher(use_shift_factor=True)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    config = teacher.vae.config
    with torch.no_grad():
        posterior = teacher.vae.encode(images).latent_dist
        latents = training_latents(teacher, images)
        batch = encode_batch(teacher, {"lr_up": images, "hr": images}, with_teacher=False)
        target = unscaled_latents(teacher.vae, images)  # the vae_encoder stage's target, unscaled
        sampled = teacher.encode_latents(images, torch.Generator().manual_seed(0))
    expected = (posterior.mean - config.shift_factor) * config.scaling_factor
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)
    torch.testing.assert_close(batch["lr_latents"], expected, rtol=0, atol=0)  # no draw: the same on every call
    torch.testing.assert_close((target - config.shift_factor) * config.scaling_factor, expected, rtol=0, atol=0)
    # inference keeps the releases' posterior sample, a draw around the mode of the posterior's std
    noise = (sampled / config.scaling_factor + config.shift_factor - posterior.mean) / posterior.std
    assert not torch.equal(sampled, latents) and 0.5 < noise.std().item() < 1.5
