"""The `latent` stage (stage 1): the pruned student's clean latents `z_H` match the teacher's on the same `z_L`, MSE."""

import torch
import torch.nn.functional as F

from tinysr_diffusers import TinySRAutoencoder, TinySRPipeline, TSDSRPipeline
from tinysr_diffusers.pipelines.pipeline_one_step_sr import step_latents
from training.config import TrainConfig
from training.latents import teacher_estimate, training_latents
from training.models import add_lora, merged_transformer
from training.stages.base import Stage


def load_student(config: TrainConfig, teacher: TSDSRPipeline) -> TinySRPipeline:
    vae = TinySRAutoencoder.from_pretrained(config.student_vae) if config.student_vae else None
    if config.student:
        student = TinySRPipeline.from_pretrained(config.student)
        if vae is not None:
            student = TinySRPipeline(student.transformer, vae, student.config.use_shift_factor)
        return student
    return TinySRPipeline.from_teacher(teacher, config.keep_layers, vae=vae)


class LatentStage(Stage):
    def __init__(self, config, teacher):
        super().__init__(config, teacher)
        self.student = load_student(config, teacher)
        self.student.vae.requires_grad_(False).eval()
        if config.lora_rank:
            add_lora(self.student.transformer, config)

    def trainable(self):
        return self.student.transformer

    def _latents(self, model, batch):
        if "lr_latents" in batch:  # from the latent cache (teacher latents computed here if it has none)
            z_low = batch["lr_latents"]
            z_teacher = batch["teacher_latents"] if "teacher_latents" in batch else teacher_estimate(self.teacher,
                                                                                                        z_low)
        else:
            with torch.no_grad():
                z_low = training_latents(self.teacher, batch["lr_up"])
            z_teacher = teacher_estimate(self.teacher, z_low)
        return self._student_estimate(model, z_low), z_teacher

    def _student_estimate(self, model, z_low: torch.Tensor) -> torch.Tensor:
        return step_latents(z_low, self.student.predict_velocity(z_low, model), self.student.sigma)

    def generator_outputs(self, model, batch, generator):
        z_student, z_teacher = self._latents(model, batch)
        return {"loss_terms": {"latent": F.mse_loss(z_student.float(), z_teacher.float())}, "z_student": z_student}

    def export(self, model, folder):
        student = self.student
        TinySRPipeline(merged_transformer(model), student.vae, student.config.use_shift_factor).save_pretrained(folder)
