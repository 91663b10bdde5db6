"""Train a TinySR stage with accelerate (training/README.md).

    accelerate launch training/distill.py --config training/configs/latent.yaml [--key value | key=value ...]

Stages (`--help` lists every setting), one module each under `training/stages/`:
- `teacher` (`teacher.py`): the teacher's SD3 transformer learns one-step 4x SR on the TSD-SR inference path.
- `vae_encoder`, `vae_decoder` (`vae.py`): the tiny VAE's encoder learns the teacher VAE's latents of (upscaled) LR
  images, MSE; its decoder learns to decode the teacher's latents of HR images: L2 + LPIPS + GAN.
- `prune` (`prune.py`, mask learning): `pruning.MaskLearner` (gates + LoRA, paper Eq. 2 / A.3) on the teacher's
  transformer; it writes `pruning.json`, the keep-probability log and heatmap, and exports the pruned
  `TinySRPipeline` (teacher weights, the search's LoRA discarded as in TinyFusion) for the latent stage.
- `latent` (`latent.py`, stage 1): the pruned student's `z_H` matches the teacher's on the same `z_L`, MSE.
- `pixel` (`pixel.py`, stage 2): stage 1's loss + LPIPS + GAN on the decoded student images against the HR images.

This module is the training loop the stages share (`train`). `prune` and `latent` can train from a latent cache
(`latent_cache`, written once by `training/cache_latents.py`).

The GAN uses a pixel-space PatchGAN discriminator (`training/discriminator.py`). The TSD-SR release uses a projected
discriminator on DINO features, whose weights cannot be fetched offline; `train`'s `discriminator_factory` is the
slot for such a feature-network discriminator.

Checkpoints (`accelerator.save_state`, plus `training/checkpoints.py`) are written to a temporary folder and renamed,
so a kill leaves either the previous checkpoint or the new one; `--resume_from_checkpoint latest` continues
bit-for-bit (crops, shuffling and degradations are seeded per step), with the configured optimiser settings (learning
rates, schedule, weight decay) applied over the checkpoint's. Nothing in a checkpoint is unpickled beyond
`torch.load(weights_only=True)`: the EMA weights are safetensors. A checkpoint counts as good once the step after it
had a finite loss; a NaN/inf loss stops the run, renames the checkpoint whose weights gave it to
`checkpoint-<step>.nonfinite` (so `latest` skips it) and names the last good one, which `checkpoints_total_limit`
never deletes before a newer one is good; the prune stage's `pruning.MaskLearner` (and `tinysr-prune learn`) does the
same, with the same helpers. A checkpoint damaged since it was written is refused on resume, naming the one before
it (`pruning.learner.load_checkpoint`).

`output_dir` holds one run (`run.json`: its id and config); see `training.run.claim_output_dir` for what is the same
run.
"""

import contextlib
import copy
import logging
import os
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from pruning.data import epoch_batches
from pruning.learner import (
    NonFiniteLossError,
    limit_checkpoints,
    load_checkpoint,
    non_finite_loss_error,
)
from tinysr_diffusers.training_utils.degradations import DegradationConfig, RealESRGANDegradation
from tinysr_diffusers.training_utils.perceptual import LPIPS
from tinysr_diffusers.utils import checkpoint_step, resolve_checkpoint, save_checkpoint
from training.checkpoints import apply_optimiser_settings, checkpoint_ema
from training.config import LATENT_STAGES, TrainConfig, load_config
from training.data import seeded_generator
from training.discriminator import default_discriminator, hinge_discriminator_loss
from training.latents import make_batch, make_pair_batch
from training.models import cast_frozen_teacher, load_teacher
from training.run import SHARDED, build_data, claim_output_dir, export_final, full_model, make_accelerator
from training.stages import STAGE_CLASSES, Stage
from training.stages.prune import train_prune


logger = logging.getLogger("tinysr.distill")


@contextlib.contextmanager
def frozen(module: Optional[torch.nn.Module]) -> Iterator[None]:
    """Run with `module`'s parameters not requiring gradients (then restored); no-op for None."""
    if module is None:
        yield
        return
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(module.parameters(), flags):
            parameter.requires_grad_(flag)


def generator_loss(stage: Stage, model, batch: dict, generator, lpips=None, discriminator=None):
    """The student's weighted loss, its terms and the stage outputs; LPIPS/GAN terms when those modules are given."""
    config = stage.config
    outputs = stage.generator_outputs(model, batch, generator)
    terms = dict(outputs["loss_terms"])
    if lpips is not None:
        terms["lpips"] = lpips(outputs["fake"].float(), outputs.get("real", batch.get("hr")).float()).mean()
    if discriminator is not None:
        terms["gan"] = -discriminator(outputs["fake"]).float().mean()
    if config.pixel_weight and "fake" in outputs:
        terms["pixel"] = F.mse_loss(outputs["fake"].float(), outputs.get("real", batch.get("hr")).float())
    weights = {"latent": config.latent_weight, "lpips": config.lpips_weight, "gan": config.gan_weight,
               "pixel": config.pixel_weight}
    return sum(weights[name] * value for name, value in terms.items()), terms, outputs


def train(config: TrainConfig,
          discriminator_factory: Callable[[TrainConfig], torch.nn.Module] = default_discriminator) -> dict:
    """Run one stage; returns {"step", "losses" and "learning_rates" (per step of this run), "export"}; the prune
    stage returns its decision instead of per-step values (they are in `keep_probabilities.jsonl`).

    `discriminator_factory` makes the GAN stages' discriminator from the config: any module that maps images in
    [-1, 1] to real/fake logits of any shape (e.g. a projected one on frozen DINO features)."""
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise NotADirectoryError(f"output_dir {config.output_dir} is a file, not a folder; choose another output_dir.")
    os.makedirs(config.output_dir, exist_ok=True)
    if config.stage == "prune":
        return train_prune(config)
    accelerator = make_accelerator(config, gradient_accumulation_steps=config.gradient_accumulation_steps)
    run_id = claim_output_dir(accelerator, config)
    set_seed(config.seed)
    device = accelerator.device
    sharded = accelerator.distributed_type in SHARDED
    if sharded and config.ema_decay:
        raise ValueError(f"ema_decay averages whole weights, which {accelerator.distributed_type.value} shards across "
                         f"processes: train without EMA (ema_decay=0) or with DDP.")

    with accelerator.main_process_first():  # diffusers copies the pipelines' code modules: one process at a time
        teacher = load_teacher(config).to(device)
        stage = STAGE_CLASSES[config.stage](config, teacher)
    if config.stage != "teacher":  # the teacher stage trains the teacher's transformer: it stays float32
        cast_frozen_teacher(accelerator, config, teacher)
    model = stage.trainable()
    if config.stage in ("teacher", "latent", "pixel") and not config.lora_rank:
        model.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    template = copy.deepcopy(model).cpu() if sharded else None  # the unsharded module the export gathers into
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    # accelerate steps a prepared scheduler once per process at every optimizer step, hence the scaling (as in
    # diffusers' training scripts).
    scheduler = get_scheduler(config.lr_scheduler, optimizer,
                              num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                              num_training_steps=config.max_steps * accelerator.num_processes)

    from_cache = bool(config.latent_cache) and config.stage in LATENT_STAGES
    if config.latent_cache and not from_cache:
        raise ValueError(f"The {config.stage} stage needs images, not a latent cache: unset latent_cache.")
    _, loader = build_data(config, from_cache)
    uses_gan = stage.uses_gan and config.gan_weight > 0
    discriminator = None
    lpips = LPIPS(config.lpips_net).to(device) if config.lpips_weight > 0 and stage.uses_lpips else None
    if uses_gan:
        discriminator = discriminator_factory(config)
        disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=config.disc_learning_rate,
                                           weight_decay=config.weight_decay)
        model, optimizer, scheduler, discriminator, disc_optimizer, loader = accelerator.prepare(
            model, optimizer, scheduler, discriminator, disc_optimizer, loader)
    else:
        model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)

    ema = None
    if config.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel([p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad],
                       decay=config.ema_decay)
        ema.to(device)
        checkpoint_ema(accelerator, ema)

    degrade = RealESRGANDegradation(DegradationConfig.from_dict(config.degradation))
    if config.hr_size % degrade.config.scale:
        raise ValueError(f"hr_size {config.hr_size} is not a multiple of the degradation scale.")

    step = 0
    checkpoint = resolve_checkpoint(config.output_dir, config.resume_from_checkpoint) \
        if config.resume_from_checkpoint else None
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint)
        step = checkpoint_step(checkpoint)
        logger.info("Resumed run %s from %s at step %d.", run_id, checkpoint, step)
        apply_optimiser_settings(optimizer, scheduler, [config.learning_rate], config.weight_decay, "the optimiser")
        if uses_gan:
            apply_optimiser_settings(disc_optimizer, None, [config.disc_learning_rate], config.weight_decay,
                                     "the discriminator's optimiser")
    unproven = step if checkpoint is not None else None  # the newest checkpoint, until the step after it is finite

    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers(f"tinysr-{config.stage}", config={k: str(v) for k, v in config.to_dict().items()})

    losses, learning_rates, micro_losses = [], [], []
    progress = tqdm(total=config.max_steps, initial=step, desc=config.stage,
                    disable=not accelerator.is_local_main_process)
    batches = epoch_batches(loader, step * config.gradient_accumulation_steps, accelerator.skip_first_batches)
    critic = accelerator.unwrap_model(discriminator) if uses_gan else None  # the generator's GAN term: no DDP sync
    for _, position, data in batches:
        if step >= config.max_steps:  # resumed from the last checkpoint: nothing left to train
            break
        # seeded by the batch's place in the run, so that a resume repeats its degradation
        generator = seeded_generator(config.seed, position, accelerator.process_index, device=device)
        if from_cache:
            batch = data
        elif config.pair_data:
            batch = make_pair_batch(data, config.pair_hr_mix)
        else:
            batch = make_batch(data, degrade, generator)
        with accelerator.accumulate(*([model, discriminator] if uses_gan else [model])):
            with accelerator.autocast():
                with frozen(critic):  # the generator's GAN term must not train the discriminator
                    loss, terms, outputs = generator_loss(stage, model, batch, generator, lpips, critic)
                if uses_gan:  # on the same fake images, before either model is updated
                    terms["discriminator"] = hinge_discriminator_loss(discriminator(batch["hr"]),
                                                                      discriminator(outputs["fake"].detach()))
            checked = torch.stack([loss.detach().float(), *(v.detach().float() for v in terms.values())])
            checked = accelerator.reduce(checked, "mean")
            if not torch.isfinite(checked).all():
                raise non_finite_loss_error(accelerator, config.output_dir, step, unproven,
                                            dict(zip(["loss", *terms], checked.tolist())))
            micro_losses.append(checked[0].item())
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if uses_gan:
                accelerator.backward(terms["discriminator"])
                disc_optimizer.step()
                disc_optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        step += 1
        if unproven is not None:  # its weights gave a finite step: older checkpoints may go
            limit_checkpoints(accelerator, config.output_dir, config.checkpoints_total_limit)
            unproven = None
        if ema is not None:
            ema.step([p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad])
        losses.append(sum(micro_losses) / len(micro_losses))  # the mean over the accumulated micro-batches
        micro_losses.clear()
        learning_rates.append(optimizer.param_groups[0]["lr"])
        progress.update(1)
        progress.set_postfix(loss=f"{losses[-1]:.4g}")
        if step % config.logging_steps == 0 and config.report_to != "none":
            accelerator.log({"loss": losses[-1], "lr": learning_rates[-1],
                             **{f"loss/{k}": v.item() for k, v in terms.items()}}, step=step)
        if config.sample_steps and step % config.sample_steps == 0 and "fake" in outputs and "lr_up" in batch:
            log_samples(accelerator, batch["lr_up"], outputs["fake"], batch["hr"], step)
        if step % config.checkpointing_steps == 0 or step == config.max_steps:
            save_checkpoint(accelerator, config.output_dir, step)  # the limit applies once it is known to be good
            unproven = step
    progress.close()
    limit_checkpoints(accelerator, config.output_dir, config.checkpoints_total_limit)

    if ema is not None:
        ema.copy_to([p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad])
    trained = full_model(accelerator, model, template)
    export = export_final(accelerator, config, lambda folder: stage.export(trained, folder))
    accelerator.end_training()
    return {"step": step, "losses": losses, "learning_rates": learning_rates, "export": export, "run_id": run_id}


def log_samples(accelerator: Accelerator, lr_up, fake, hr, step: int) -> None:
    """LR (upscaled) | output | HR rows of the first images, to the tensorboard tracker."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            grid = torch.cat([lr_up[:4], fake[:4].detach(), hr[:4]]).float().clamp(-1, 1) * 0.5 + 0.5
            tracker.writer.add_images("samples/lr_output_hr", grid.cpu(), step)


def main(argv=None) -> None:
    """Train, reporting a refused configuration, output_dir, teacher or checkpoint, or a loss that stopped being
    finite (with the checkpoint to resume from), in one line (exit status 1)."""
    try:
        train(load_config(argv))
    except (ValueError, OSError, NonFiniteLossError) as error:
        raise SystemExit(f"error: {error}")


if __name__ == "__main__":
    main()
