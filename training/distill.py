"""Train a TinySR stage with accelerate (DESIGN section 6).

    accelerate launch training/distill.py --config training/configs/latent.yaml [--key value | key=value ...]

Stages (each a `Stage` below; `--help` lists every setting):
- `vae_encoder`: the tiny VAE's encoder learns the teacher VAE's latents of (upscaled) LR images, MSE.
- `vae_decoder`: the tiny VAE's decoder learns to decode the teacher's latents of HR images: L2 + LPIPS + GAN.
- `latent` (stage 1): the pruned student's `z_H` matches the teacher's on the same `z_L`, MSE.
- `pixel` (stage 2): stage 1's loss + LPIPS + GAN on the decoded student images against the HR images.
- `prune` (mask learning) runs the pruning package's learner; not wired here yet.

The GAN uses a pixel-space PatchGAN discriminator (`training/discriminator.py`). The TSD-SR release uses a projected
discriminator on DINO features, whose weights cannot be fetched offline; `discriminator_factory` is the slot for
such a feature-network discriminator.

Checkpoints (`accelerator.save_state`) are written to a temporary folder and renamed, so a kill leaves either the
previous checkpoint or the new one; `--resume_from_checkpoint latest` continues bit-for-bit (crops, shuffling and
degradations are seeded per step). A NaN/inf loss saves a checkpoint of the last good state and stops.
"""

import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the repository

from tinysr_diffusers import TinySRAutoencoder, TinySRPipeline, TSDSRPipeline  # noqa: E402
from tinysr_diffusers.degradations import DegradationConfig, RealESRGANDegradation  # noqa: E402
from tinysr_diffusers.image_processing import bicubic_upscale  # noqa: E402
from tinysr_diffusers.perceptual import LPIPS  # noqa: E402
from training.config import TrainConfig, load_config  # noqa: E402
from training.data import build_dataset, collate_crops  # noqa: E402
from training.discriminator import PatchDiscriminator, hinge_discriminator_loss  # noqa: E402


logger = logging.getLogger("tinysr.distill")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class NonFiniteLossError(RuntimeError):
    pass


def default_discriminator(config: TrainConfig) -> torch.nn.Module:
    return PatchDiscriminator(channels=config.disc_channels, num_layers=config.disc_layers)


# The slot for another discriminator (e.g. a projected one on frozen DINO features): a callable config -> module that
# maps images in [-1, 1] to real/fake logits of any shape.
discriminator_factory: Callable[[TrainConfig], torch.nn.Module] = default_discriminator


# ------------------------------------------------------------------------------------------------------------ models
def load_teacher(config: TrainConfig) -> TSDSRPipeline:
    teacher = TSDSRPipeline.from_pretrained(config.teacher)
    for module in (teacher.transformer, teacher.vae, teacher.prompt_embeddings):
        module.requires_grad_(False).eval()
    return teacher


def load_student(config: TrainConfig, teacher: TSDSRPipeline) -> TinySRPipeline:
    vae = TinySRAutoencoder.from_pretrained(config.student_vae) if config.student_vae else None
    if config.student:
        student = TinySRPipeline.from_pretrained(config.student)
        if vae is not None:
            student = TinySRPipeline(student.transformer, vae, student.config.use_shift_factor)
        return student
    return TinySRPipeline.from_teacher(teacher, config.keep_layers, vae=vae)


def new_student_vae(config: TrainConfig, teacher: TSDSRPipeline) -> TinySRAutoencoder:
    if config.student_vae:
        return TinySRAutoencoder.from_pretrained(config.student_vae)
    vae_config = {"latent_channels": teacher.vae.config.latent_channels,
                  "scaling_factor": teacher.vae.config.scaling_factor, **config.vae_config}
    return TinySRAutoencoder(**vae_config)


def add_lora(transformer: torch.nn.Module, config: TrainConfig) -> None:
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, init_lora_weights="gaussian",
                                       target_modules=config.lora_target_modules))


def merged_transformer(transformer: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of `transformer` with its LoRA (if any) merged into the base weights."""
    import copy

    transformer = copy.deepcopy(transformer)
    if getattr(transformer, "_hf_peft_config_loaded", False):
        transformer.fuse_lora()
        transformer.unload_lora()
    return transformer


# ------------------------------------------------------------------------------------------------------------ stages
class Stage:
    """What one stage trains and how its loss is computed from a batch `(lr_up, hr)` of images in [-1, 1]."""

    uses_gan = False

    def __init__(self, config: TrainConfig, teacher: TSDSRPipeline):
        self.config, self.teacher = config, teacher

    def trainable(self) -> torch.nn.Module:
        raise NotImplementedError

    def generator_outputs(self, model, lr_up, hr, generator) -> dict:
        """Differentiable outputs: always `loss_terms` (name -> tensor) and, for GAN stages, `fake` images."""
        raise NotImplementedError

    def export(self, model: torch.nn.Module, folder: str) -> None:
        raise NotImplementedError


class VAEEncoderStage(Stage):
    frozen_part = "decoder"

    def __init__(self, config, teacher):
        super().__init__(config, teacher)
        self.vae = new_student_vae(config, teacher)
        getattr(self.vae, self.frozen_part).requires_grad_(False)

    def trainable(self):
        return self.vae

    def generator_outputs(self, model, lr_up, hr, generator):
        with torch.no_grad():
            target = self.teacher.vae.encode(lr_up).latent_dist.mode()
        return {"loss_terms": {"latent": F.mse_loss(model.encode(lr_up).latents.float(), target.float())}}

    def export(self, model, folder):
        model.save_pretrained(folder)


class VAEDecoderStage(VAEEncoderStage):
    frozen_part = "encoder"
    uses_gan = True

    def generator_outputs(self, model, lr_up, hr, generator):
        with torch.no_grad():
            latents = self.teacher.vae.encode(hr).latent_dist.mode()
        fake = model.decode(latents).sample
        return {"loss_terms": {"latent": F.mse_loss(fake.float(), hr.float())}, "fake": fake}


class LatentStage(Stage):
    def __init__(self, config, teacher):
        super().__init__(config, teacher)
        self.student = load_student(config, teacher)
        self.student.vae.requires_grad_(False).eval()
        if config.lora_rank:
            add_lora(self.student.transformer, config)

    def trainable(self):
        return self.student.transformer

    def _latents(self, model, lr_up, generator):
        with torch.no_grad():
            z_low = self.teacher._encode(lr_up, generator, None)
            z_teacher = z_low - self.teacher.sigma * self.teacher._predict_velocity(z_low)
        z_student = z_low - self.student.sigma * model(z_low).sample
        return z_student, z_teacher

    def generator_outputs(self, model, lr_up, hr, generator):
        z_student, z_teacher = self._latents(model, lr_up, generator)
        return {"loss_terms": {"latent": F.mse_loss(z_student.float(), z_teacher.float())}, "z_student": z_student}

    def export(self, model, folder):
        student = self.student
        TinySRPipeline(merged_transformer(model), student.vae, student.config.use_shift_factor).save_pretrained(folder)


class PixelStage(LatentStage):
    uses_gan = True

    def generator_outputs(self, model, lr_up, hr, generator):
        outputs = super().generator_outputs(model, lr_up, hr, generator)
        outputs["fake"] = self.student._decode(outputs["z_student"], None)
        return outputs


STAGE_CLASSES = {"vae_encoder": VAEEncoderStage, "vae_decoder": VAEDecoderStage, "latent": LatentStage,
                 "pixel": PixelStage}


# ------------------------------------------------------------------------------------------------------ checkpoints
def find_checkpoint(output_dir: str, name: str) -> Optional[str]:
    """`latest` -> the newest complete checkpoint in output_dir (None if there is none); else the given folder."""
    if name != "latest":
        if not os.path.isdir(name):
            raise FileNotFoundError(f"Checkpoint folder {name!r} does not exist.")
        return name
    steps = [int(m.group(1)) for m in map(CHECKPOINT_PATTERN.match, os.listdir(output_dir)) if m] \
        if os.path.isdir(output_dir) else []
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def save_checkpoint(accelerator: Accelerator, config: TrainConfig, step: int) -> str:
    """Save the full state atomically: every process writes into `checkpoint-N.tmp`, the main one renames it."""
    final = os.path.join(config.output_dir, f"checkpoint-{step}")
    temp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(temp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(temp, final)
        if config.checkpoints_total_limit:
            steps = sorted(int(m.group(1)) for m in map(CHECKPOINT_PATTERN.match, os.listdir(config.output_dir)) if m)
            for old in steps[: -config.checkpoints_total_limit]:
                shutil.rmtree(os.path.join(config.output_dir, f"checkpoint-{old}"))
    accelerator.wait_for_everyone()
    return final


# --------------------------------------------------------------------------------------------------------- training
def make_batch(hr: torch.Tensor, degrade: RealESRGANDegradation, generator: torch.Generator):
    """HR crops in [0, 1] -> (bicubic-upscaled degraded LR, HR), both in [-1, 1]."""
    lr = degrade(hr, generator=generator)
    lr_up = bicubic_upscale(lr, degrade.config.scale)
    return lr_up * 2 - 1, hr * 2 - 1


def generator_loss(stage: Stage, model, lr_up, hr, generator, lpips=None, discriminator=None):
    """The student's weighted loss, its terms and the stage outputs; LPIPS/GAN terms when those modules are given."""
    config = stage.config
    outputs = stage.generator_outputs(model, lr_up, hr, generator)
    terms = dict(outputs["loss_terms"])
    if lpips is not None:
        terms["lpips"] = lpips(outputs["fake"].float(), hr.float()).mean()
    if discriminator is not None:
        terms["gan"] = -discriminator(outputs["fake"]).float().mean()
    weights = {"latent": config.latent_weight, "lpips": config.lpips_weight, "gan": config.gan_weight}
    return sum(weights[name] * value for name, value in terms.items()), terms, outputs


def train(config: TrainConfig) -> dict:
    """Run one stage; returns {"step", "losses" (total per step, this run), "export"}."""
    os.makedirs(config.output_dir, exist_ok=True)
    # A multi-process launch on a machine without CUDA must say so, or accelerate starts independent single
    # processes (DistributedType.NO) that would all write the same checkpoints; with cpu=True they form gloo DDP.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        cpu=world_size > 1 and not torch.cuda.is_available(),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=None if os.environ.get("ACCELERATE_MIXED_PRECISION") else config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=os.path.join(
            config.output_dir, "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if accelerator.num_processes != world_size:
        raise RuntimeError(f"Launched {world_size} processes but accelerate formed a group of "
                           f"{accelerator.num_processes} ({accelerator.distributed_type.value}); check the launch.")
    accelerator.print(f"Stage {config.stage} on {accelerator.device}: {accelerator.distributed_type.value}, "
                      f"{accelerator.num_processes} process(es).")
    set_seed(config.seed)
    device = accelerator.device

    teacher = load_teacher(config).to(device)
    stage = STAGE_CLASSES[config.stage](config, teacher)
    model = stage.trainable()
    if config.stage in ("latent", "pixel") and not config.lora_rank:
        model.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)

    dataset = build_dataset(config)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, num_workers=config.num_workers,
                        collate_fn=collate_crops, drop_last=False,
                        generator=torch.Generator().manual_seed(config.seed))
    uses_gan = stage.uses_gan and config.gan_weight > 0
    discriminator = None
    lpips = LPIPS(config.lpips_net).to(device) if config.lpips_weight > 0 and stage.uses_gan else None
    if uses_gan:
        discriminator = discriminator_factory(config)
        disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=config.disc_learning_rate,
                                           weight_decay=config.weight_decay)
        model, optimizer, discriminator, disc_optimizer, loader = accelerator.prepare(
            model, optimizer, discriminator, disc_optimizer, loader)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    ema = None
    if config.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel([p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad],
                       decay=config.ema_decay)
        ema.to(device)
        accelerator.register_for_checkpointing(ema)

    degrade = RealESRGANDegradation(DegradationConfig.from_dict(config.degradation))
    if config.hr_size % degrade.config.scale:
        raise ValueError(f"hr_size {config.hr_size} is not a multiple of the degradation scale.")

    step = 0
    if config.resume_from_checkpoint:
        checkpoint = find_checkpoint(config.output_dir, config.resume_from_checkpoint)
        if checkpoint is None:
            logger.info("No checkpoint in %s: starting from scratch.", config.output_dir)
        else:
            accelerator.load_state(checkpoint)
            step = int(CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(checkpoint))).group(1))
            logger.info("Resumed from %s at step %d.", checkpoint, step)

    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers(f"tinysr-{config.stage}", config={k: str(v) for k, v in config.to_dict().items()})

    batches_per_epoch = len(loader)
    batch_index = step * config.gradient_accumulation_steps
    losses = []
    progress = tqdm(total=config.max_steps, initial=step, desc=config.stage,
                    disable=not accelerator.is_local_main_process)
    while step < config.max_steps:
        epoch, skip = divmod(batch_index, batches_per_epoch)
        dataset.epoch = epoch
        loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        for crops in epoch_loader:
            batch_index += 1
            if crops is None:
                logger.warning("Batch %d had only corrupt images; skipped.", batch_index)
                continue
            generator = torch.Generator(device).manual_seed(
                config.seed + batch_index * accelerator.num_processes + accelerator.process_index)
            lr_up, hr = make_batch(crops, degrade, generator)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss, terms, outputs = generator_loss(stage, model, lr_up, hr, generator, lpips,
                                                          discriminator if uses_gan else None)
                total = accelerator.reduce(loss.detach().float(), "mean")
                if not torch.isfinite(total):
                    path = save_checkpoint(accelerator, config, step)
                    raise NonFiniteLossError(
                        f"Loss became {total.item()} at step {step + 1} ({ {k: v.item() for k, v in terms.items()} }); "
                        f"the last good state is saved in {path}. Lower the learning rate or check the data.")
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if uses_gan:
                    with accelerator.autocast():
                        disc_loss = hinge_discriminator_loss(discriminator(hr), discriminator(outputs["fake"].detach()))
                    disc_optimizer.zero_grad(set_to_none=True)  # drop the grads of the generator's GAN term
                    accelerator.backward(disc_loss)
                    disc_optimizer.step()
                    disc_optimizer.zero_grad(set_to_none=True)
                    terms["discriminator"] = disc_loss
            if not accelerator.sync_gradients:
                continue
            step += 1
            if ema is not None:
                ema.step([p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad])
            losses.append(total.item())
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4g}")
            if step % config.logging_steps == 0 and config.report_to != "none":
                accelerator.log({"loss": losses[-1], **{f"loss/{k}": v.item() for k, v in terms.items()}}, step=step)
            if config.sample_steps and step % config.sample_steps == 0 and "fake" in outputs:
                log_samples(accelerator, lr_up, outputs["fake"], hr, step)
            if step % config.checkpointing_steps == 0 or step == config.max_steps:
                save_checkpoint(accelerator, config, step)
            if step >= config.max_steps:
                break
    progress.close()

    export = os.path.join(config.output_dir, "final")
    unwrapped = accelerator.unwrap_model(model)
    if ema is not None:
        ema.copy_to([p for p in unwrapped.parameters() if p.requires_grad])
    if accelerator.is_main_process:
        temp = export + ".tmp"
        shutil.rmtree(temp, ignore_errors=True)
        stage.export(unwrapped, temp)
        shutil.rmtree(export, ignore_errors=True)
        os.replace(temp, export)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"step": step, "losses": losses, "export": export}


def log_samples(accelerator: Accelerator, lr_up, fake, hr, step: int) -> None:
    """LR (upscaled) | output | HR rows of the first images, to the tensorboard tracker."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            grid = torch.cat([lr_up[:4], fake[:4].detach(), hr[:4]]).float().clamp(-1, 1) * 0.5 + 0.5
            tracker.writer.add_images("samples/lr_output_hr", grid.cpu(), step)


def main(argv=None) -> None:
    try:
        config = load_config(argv)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")
    train(config)


if __name__ == "__main__":
    main()
