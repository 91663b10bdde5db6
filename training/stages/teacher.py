"""The `teacher` stage: the teacher's SD3 transformer learns one-step 4x SR on the TSD-SR inference path (fixed prompt
embeddings, t = 1000, `z_H = z_L - v`: docs/method.md, "One-step super-resolution (teacher and student)"), with
velocity MSE plus pixel MSE and LPIPS on decoded windows. Fully trained with `lora_rank=0` (the mini recipe's
teacher, from scratch) or through LoRA (TSD-SR's setting)."""

from typing import Optional

import torch
import torch.nn.functional as F

from tinysr_diffusers import TSDSRPipeline
from tinysr_diffusers.pipelines.pipeline_one_step_sr import step_latents
from training.latents import encode_batch
from training.models import add_lora, merged_transformer
from training.stages.base import Stage


class TeacherStage(Stage):
    """Trains the teacher pipeline's own transformer (the rest of the pipeline stays frozen); exports the pipeline."""

    def __init__(self, config, teacher):
        super().__init__(config, teacher)
        self.transformer = teacher.transformer
        self.transformer.requires_grad_(not config.lora_rank)
        if config.lora_rank:
            add_lora(self.transformer, config)

    uses_lpips = True

    def trainable(self):
        return self.transformer

    def _latents(self, batch):
        latents = batch if "lr_latents" in batch else encode_batch(self.teacher, batch, with_teacher=False)
        return latents["lr_latents"], latents["hr_latents"]

    def generator_outputs(self, model, batch, generator):
        z_low, z_high = self._latents(batch)
        velocity = self.teacher.predict_velocity(z_low, model)
        target = (z_low - z_high).float() / self.teacher.sigma  # the velocity that gives z_H in one step
        outputs = {"loss_terms": {"latent": F.mse_loss(velocity.float(), target)}}
        if self.config.lpips_weight or self.config.pixel_weight:
            z_pred = step_latents(z_low, velocity, self.teacher.sigma)
            count = self.config.decode_samples or len(z_pred)
            windows = latent_windows(z_pred.shape, self.config.decode_crop, count, generator)
            outputs["fake"] = decode_windows(self.teacher, z_pred[:count], windows)
            if "hr" in batch:
                outputs["real"] = crop_windows(batch["hr"][:count], windows, self.teacher.vae_scale_factor)
            else:  # from the cache: the teacher VAE's own image of the HR latents, the best it can decode
                with torch.no_grad():
                    outputs["real"] = decode_windows(self.teacher, z_high[:count], windows)
        return outputs

    def export(self, model, folder):
        teacher = self.teacher
        TSDSRPipeline(merged_transformer(model).float(), teacher.vae, teacher.prompt_embeddings,
                      use_shift_factor=teacher.config.use_shift_factor).save_pretrained(folder)


WINDOW_MARGIN = 2  # latent pixels decoded around an LPIPS window, then cropped away: no decoder border effects


def latent_windows(shape, size: int, count: int, generator) -> list[Optional[tuple[int, int, int]]]:
    """(top, left, size) of one random `size` window per sample (inside a margin), or None (whole latents) for 0."""
    height, width = shape[-2:]
    if not size or size + 2 * WINDOW_MARGIN > min(height, width):
        return [None] * count
    corners = torch.randint(WINDOW_MARGIN, min(height, width) - size - WINDOW_MARGIN + 1, (count, 2),
                            generator=generator, device=generator.device)
    return [(int(top), int(left), size) for top, left in corners.tolist()]


def decode_windows(pipe, latents: torch.Tensor, windows) -> torch.Tensor:
    """Decoded images of the latent windows (each decoded with its margin, which is then cropped off)."""
    factor = pipe.vae_scale_factor
    if windows[0] is None:
        return pipe.decode_latents(latents)
    m = WINDOW_MARGIN
    padded = torch.stack([z[:, top - m: top + size + m, left - m: left + size + m]
                          for z, (top, left, size) in zip(latents, windows)])
    return pipe.decode_latents(padded)[..., m * factor: -m * factor, m * factor: -m * factor]


def crop_windows(images: torch.Tensor, windows, factor: int) -> torch.Tensor:
    """The image pixels under the latent windows."""
    if windows[0] is None:
        return images
    return torch.stack([image[:, top * factor: (top + size) * factor, left * factor: (left + size) * factor]
                        for image, (top, left, size) in zip(images, windows)])
