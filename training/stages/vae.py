"""The tiny VAE's stages: `vae_encoder` learns the teacher VAE's latents of (upscaled) LR images, `vae_decoder`
decodes the teacher VAE's latents of HR images (L2 + LPIPS + GAN)."""

import torch
import torch.nn.functional as F

from tinysr_diffusers import TinySRAutoencoder, TSDSRPipeline
from training.config import TrainConfig
from training.stages.base import Stage


def new_student_vae(config: TrainConfig, teacher: TSDSRPipeline) -> TinySRAutoencoder:
    if config.student_vae:
        return TinySRAutoencoder.from_pretrained(config.student_vae)
    teacher_config = teacher.vae.config  # the student VAE works in the teacher's latent space
    vae_config = {"latent_channels": teacher_config.latent_channels, "scaling_factor": teacher_config.scaling_factor,
                  "shift_factor": teacher_config.shift_factor or 0.0, **config.vae_config}
    return TinySRAutoencoder(**vae_config)


def unscaled_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """The teacher VAE's latents of `images` as its encoder gives them: the posterior mode of an `AutoencoderKL`,
    the latents of a tiny autoencoder (e.g. TAEF2); unscaled, the `training_latents` of the other stages."""
    encoded = vae.encode(images)
    return encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents


class VAEEncoderStage(Stage):
    frozen_part = "decoder"

    def __init__(self, config, teacher):
        super().__init__(config, teacher)
        self.vae = new_student_vae(config, teacher)
        getattr(self.vae, self.frozen_part).requires_grad_(False)

    def trainable(self):
        return self.vae

    def generator_outputs(self, model, batch, generator):
        with torch.no_grad():
            target = unscaled_latents(self.teacher.vae, batch["lr_up"])
        prediction = model.encode(batch["lr_up"]).latents
        return {"loss_terms": {"latent": F.mse_loss(prediction.float(), target.float())}}

    def export(self, model, folder):
        model.save_pretrained(folder)


class VAEDecoderStage(VAEEncoderStage):
    frozen_part = "encoder"
    uses_gan = True
    uses_lpips = True

    def generator_outputs(self, model, batch, generator):
        with torch.no_grad():
            latents = unscaled_latents(self.teacher.vae, batch["hr"])
        fake = model.decode(latents).sample
        return {"loss_terms": {"latent": F.mse_loss(fake.float(), batch["hr"].float())}, "fake": fake}
