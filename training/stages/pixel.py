"""The `pixel` stage (stage 2): stage 1's latent loss plus LPIPS and GAN on the student's decoded images against the
HR images."""

import torch

from training.latents import teacher_estimate, training_latents
from training.stages.latent import LatentStage


class PixelStage(LatentStage):
    uses_gan = True
    uses_lpips = True

    def _latents(self, model, batch):
        if not self.config.student_encodes:
            return super()._latents(model, batch)
        with torch.no_grad():
            z_teacher = teacher_estimate(self.teacher, training_latents(self.teacher, batch["lr_up"]))
            z_low = training_latents(self.student, batch["lr_up"])
        return self._student_estimate(model, z_low), z_teacher

    def generator_outputs(self, model, batch, generator):
        outputs = super().generator_outputs(model, batch, generator)
        outputs["fake"] = self.student.decode_latents(outputs["z_student"])
        return outputs
