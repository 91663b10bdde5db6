"""Train a TinySR stage with accelerate (DESIGN section 6).

    accelerate launch training/distill.py --config training/configs/latent.yaml [--key value | key=value ...]

Stages (each a `Stage` below; `--help` lists every setting):
- `teacher`: the teacher's SD3 transformer learns one-step 4x SR on the TSD-SR inference path (fixed prompt
  embeddings, t = 1000, `z_H = z_L - v`): velocity MSE against `z_L - z_H` plus pixel MSE and LPIPS on decoded
  images. Fully
  trained with `lora_rank=0` (the mini recipe's teacher, from scratch) or through LoRA (TSD-SR's setting).
- `vae_encoder`: the tiny VAE's encoder learns the teacher VAE's latents of (upscaled) LR images, MSE.
- `vae_decoder`: the tiny VAE's decoder learns to decode the teacher's latents of HR images: L2 + LPIPS + GAN.
- `prune` (mask learning): `pruning.MaskLearner` (gates + LoRA, paper Eq. 2 / A.3) on the teacher's transformer; it
  writes `pruning.json`, the keep-probability log and heatmap, and exports the pruned `TinySRPipeline` (teacher
  weights, the search's LoRA discarded as in TinyFusion) for the latent stage.
- `latent` (stage 1): the pruned student's `z_H` matches the teacher's on the same `z_L`, MSE.
- `pixel` (stage 2): stage 1's loss + LPIPS + GAN on the decoded student images against the HR images.

`prune` and `latent` can train from a latent cache (`latent_cache`, written once by `training/cache_latents.py`).

The GAN uses a pixel-space PatchGAN discriminator (`training/discriminator.py`). The TSD-SR release uses a projected
discriminator on DINO features, whose weights cannot be fetched offline; `discriminator_factory` is the slot for
such a feature-network discriminator.

Checkpoints (`accelerator.save_state`) are written to a temporary folder and renamed, so a kill leaves either the
previous checkpoint or the new one; `--resume_from_checkpoint latest` continues bit-for-bit (crops, shuffling and
degradations are seeded per step), with the configured optimiser settings (learning rates, schedule, weight decay)
applied over the checkpoint's. Nothing in a checkpoint is unpickled beyond `torch.load(weights_only=True)`: the EMA
weights are safetensors. A checkpoint counts as good once the step after it had a finite loss; a NaN/inf loss stops
the run, renames the checkpoint whose weights gave it to `checkpoint-<step>.nonfinite` (so `latest` skips it) and
names the last good one, which `checkpoints_total_limit` never deletes before a newer one is good; the prune stage's
`pruning.MaskLearner` (and `tinysr-prune learn`) does the same, with the same helpers.

`output_dir` holds one run (`run.json`: its id and config); see `claim_output_dir` for what is the same run.
"""

import contextlib
import copy
import fnmatch
import json
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    DistributedType,
    ProjectConfiguration,
    set_seed,
)
from diffusers.optimization import get_scheduler
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the repository

from tinysr_diffusers import TinySRAutoencoder, TinySRPipeline, TSDSRPipeline  # noqa: E402
from pruning import DecodedPerceptualLoss, MaskLearner, PruningDecision  # noqa: E402
from pruning.data import LatentPairDataset, epoch_batches  # noqa: E402
from pruning.learner import (  # noqa: E402
    NonFiniteLossError,  # noqa: F401 (the error a run of this script stops with)
    limit_checkpoints,
    non_finite_loss_error,
    refuse_pickled_state,
)
from tinysr_diffusers.conversion import merge_lora  # noqa: E402
from tinysr_diffusers.degradations import DegradationConfig, RealESRGANDegradation  # noqa: E402
from tinysr_diffusers.perceptual import LPIPS  # noqa: E402
from tinysr_diffusers.pipelines.pipeline_one_step_sr import step_latents  # noqa: E402
from tinysr_diffusers.utils import (  # noqa: E402
    atomic_directory,
    checkpoint_step,
    launched_accelerator,
    list_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    write_json,
)
from training.config import LATENT_STAGES, RESUMABLE_SETTINGS, TrainConfig, load_config  # noqa: E402
from training.data import build_dataset, seeded_generator  # noqa: E402
from training.discriminator import PatchDiscriminator, hinge_discriminator_loss  # noqa: E402
from training.latents import (  # noqa: E402
    EncodedBatches,
    check_latent_cache,
    encode_batch,
    make_batch,
    teacher_estimate,
    training_latents,
)


logger = logging.getLogger("tinysr.distill")


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


def autocast_dtype(accelerator: Accelerator) -> Optional[torch.dtype]:
    """The dtype mixed precision computes in; None for float32 (accelerate runs fp16 on a CPU in float32)."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        return None
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(accelerator.mixed_precision))


def cast_frozen_teacher(accelerator: Accelerator, config: TrainConfig, teacher: TSDSRPipeline) -> None:
    """Keep the frozen teacher transformer in the mixed-precision dtype, as diffusers' training scripts keep frozen
    models in `weight_dtype`: half its memory, and autocast computes in that dtype anyway. Call it after the student
    has been copied from the teacher (the VAE stays float32: a student may share it)."""
    dtype = autocast_dtype(accelerator)
    if dtype is not None and config.cast_teacher:
        teacher.transformer.to(dtype=dtype)


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
    teacher_config = teacher.vae.config  # the student VAE works in the teacher's latent space
    vae_config = {"latent_channels": teacher_config.latent_channels, "scaling_factor": teacher_config.scaling_factor,
                  "shift_factor": teacher_config.shift_factor or 0.0, **config.vae_config}
    return TinySRAutoencoder(**vae_config)


def add_lora(transformer: torch.nn.Module, config: TrainConfig) -> None:
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, init_lora_weights="gaussian",
                                       target_modules=config.lora_target_modules))


def merged_transformer(transformer: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of `transformer` with its LoRA (if any) merged into the base weights."""
    transformer = copy.deepcopy(transformer)
    return merge_lora(transformer) if getattr(transformer, "_hf_peft_config_loaded", False) else transformer


# ------------------------------------------------------------------------------------------------------------ stages
class Stage:
    """What one stage trains and how its loss is computed from a batch: images `{"lr_up", "hr"}` in [-1, 1]
    (`make_batch`), or for the latent stages cached latents `{"lr_latents", "hr_latents"[, "teacher_latents"]}`.

    LPIPS compares the outputs' `fake` images with their `real` ones (default: the batch's HR images)."""

    uses_gan = False
    uses_lpips = False

    def __init__(self, config: TrainConfig, teacher: TSDSRPipeline):
        self.config, self.teacher = config, teacher

    def trainable(self) -> torch.nn.Module:
        raise NotImplementedError

    def generator_outputs(self, model, batch: dict, generator) -> dict:
        """Differentiable outputs: always `loss_terms` (name -> tensor) and, for GAN stages, `fake` images."""
        raise NotImplementedError

    def export(self, model: torch.nn.Module, folder: str) -> None:
        raise NotImplementedError


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


def latent_windows(shape, size: int, count: int, generator) -> list[Optional[tuple[int, int]]]:
    """Top-left corners of one random `size` window per sample (inside a margin), or None (whole latents) for 0."""
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


STAGE_CLASSES = {"teacher": TeacherStage, "vae_encoder": VAEEncoderStage, "vae_decoder": VAEDecoderStage,
                 "latent": LatentStage, "pixel": PixelStage}  # `prune` runs the pruning package's learner: see `train_prune`


# --------------------------------------------------------------------------------------------------------- training
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


# ------------------------------------------------------------------------------------------------------ output_dir
RUN_RECORD = "run.json"
# What a run writes into its output_dir (the prune stage's files included): what `overwrite_output_dir` deletes.
RUN_OUTPUTS = (RUN_RECORD, "checkpoint-*", ".checkpoint-*", "checkpoints", "final", ".final.*", "logs", "pruning.json",
               "keep_probabilities.*")


def _is_run_output(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_OUTPUTS)


def _identity(settings: dict) -> dict:
    """The settings that define a run: all but `RESUMABLE_SETTINGS` (`<section>.<key>` for a key of a section)."""
    return {key: {name: v for name, v in value.items() if f"{key}.{name}" not in RESUMABLE_SETTINGS}
            if isinstance(value, dict) else value for key, value in settings.items() if key not in RESUMABLE_SETTINGS}


def claim_output_dir(accelerator: Accelerator, config: TrainConfig) -> str:
    """Make `output_dir` this run's (writing `run.json`) or refuse it with one line; returns the run id.

    The same run is one whose saved config (`run.json`) equals this config in every setting but
    `RESUMABLE_SETTINGS` (its length, optimiser settings and bookkeeping: `max_steps` or the learning rate may change
    on resume). It continues under its run id when resumed, or when it has no checkpoint yet. A folder without
    `run.json` that holds only what a run writes (checkpoints, logs, export: a run from before run records) is taken
    as the same run when resumed; its saved config cannot be compared, since it has none. Anything else non-empty
    (another run, this run's checkpoints without a resume, other files) is refused unless `overwrite_output_dir`,
    which deletes the previous run's outputs (`RUN_OUTPUTS`; other files stay) and starts a new run."""
    folder = config.output_dir
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    record_path = os.path.join(folder, RUN_RECORD)
    record = None
    if os.path.isfile(record_path):
        with open(record_path, encoding="utf-8") as handle:
            record = json.load(handle)
    settings = json.loads(json.dumps(config.to_dict()))
    has_checkpoints = bool(list_checkpoints(folder) or list_checkpoints(os.path.join(folder, "checkpoints")))
    problem = None
    if record is not None:
        saved, current = _identity(record["config"]), _identity(settings)
        changed = [f"{key}: {saved[key]!r} -> {current[key]!r}" for key in saved
                   if key in current and saved[key] != current[key]]
        if changed:
            problem = f"holds another run ({RUN_RECORD} differs in {'; '.join(changed)})"
        elif has_checkpoints and not config.resume_from_checkpoint:
            problem = "holds checkpoints of this run: resume it with resume_from_checkpoint=latest"
    elif names and not (config.resume_from_checkpoint and all(map(_is_run_output, names))):
        problem = (f"is not empty and has no {RUN_RECORD} (contents: {', '.join(names[:5])}"
                   f"{', ...' if len(names) > 5 else ''})")
    if problem is not None and not config.overwrite_output_dir:
        raise FileExistsError(f"output_dir {folder} {problem}; choose another output_dir, or set "
                              f"overwrite_output_dir=true to replace it.")
    if problem is not None and config.resume_from_checkpoint not in (None, "latest") and os.path.abspath(
            config.resume_from_checkpoint).startswith(os.path.abspath(folder) + os.sep):
        raise ValueError(f"overwrite_output_dir would delete resume_from_checkpoint {config.resume_from_checkpoint}: "
                         f"resume it into another output_dir.")
    run_id = record["run_id"] if record is not None and problem is None else uuid.uuid4().hex
    accelerator.wait_for_everyone()  # every process has read the folder before it changes
    if accelerator.is_main_process:
        if problem is not None:
            logger.warning("overwrite_output_dir: deleting the previous run's outputs in %s.", folder)
            for name in filter(_is_run_output, names):
                path = os.path.join(folder, name)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        elif record is None and names:
            logger.warning("%s holds a run from before run records (no %s): resuming it as this run.", folder,
                           RUN_RECORD)
        write_json(record_path, {"run_id": run_id, "config": settings})
    accelerator.wait_for_everyone()
    return run_id


# ----------------------------------------------------------------------------------------------------- checkpoints
EMA_FILE = "ema.safetensors"


def checkpoint_ema(accelerator: Accelerator, ema) -> None:
    """Save and load `ema` with every checkpoint as safetensors (tensors, and the settings as JSON metadata):
    accelerate's `register_for_checkpointing` unpickles with `weights_only=False`, so a replaced checkpoint file
    would run code on resume."""

    def save(models, weights, folder):
        if accelerator.is_main_process:
            state = ema.state_dict()
            tensors = {f"shadow_params.{i}": p.detach().cpu().contiguous()
                       for i, p in enumerate(state.pop("shadow_params"))}
            save_file(tensors, os.path.join(folder, EMA_FILE), metadata={"ema": json.dumps(state)})

    def load(models, folder):
        refuse_pickled_state(folder)
        with safe_open(os.path.join(folder, EMA_FILE), "pt") as handle:
            state = json.loads(handle.metadata()["ema"])
            state["shadow_params"] = [handle.get_tensor(f"shadow_params.{i}") for i in range(len(handle.keys()))]
        ema.load_state_dict(state)
        ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def apply_optimiser_settings(optimizer, scheduler, learning_rates: list[float], weight_decay: float,
                             name: str) -> None:
    """After a resume: the configured learning rates (of the param groups, in order), schedule and weight decay
    replace the checkpoint's, which `load_state` restored; logged when they differ. The schedule's progress
    (`last_epoch`) and the optimiser's moments stay the checkpoint's."""
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps the LambdaLR
    groups = optimizer.param_groups
    before = [(group["lr"], group["weight_decay"]) for group in groups]
    for index, (group, base) in enumerate(zip(groups, learning_rates)):
        group["weight_decay"] = weight_decay
        if inner is None:
            group["lr"] = base
            continue
        inner.base_lrs[index] = group["initial_lr"] = base
        group["lr"] = base * inner.lr_lambdas[index](inner.last_epoch)
    if inner is not None:
        inner._last_lr = [group["lr"] for group in groups]
    after = [(group["lr"], group["weight_decay"]) for group in groups]
    if after != before:
        logger.info("Resumed %s with the configured settings: (learning rate, weight decay) %s, the checkpoint's %s.",
                    name, after, before)


def full_model(accelerator: Accelerator, model: torch.nn.Module,
               template: Optional[torch.nn.Module]) -> Optional[torch.nn.Module]:
    """The trained module with all its weights, on the main process (None elsewhere); every process must call it.

    Under FSDP or DeepSpeed a process holds only its shard: `accelerator.get_state_dict` gathers the full weights,
    loaded into `template` (an unsharded copy of the module made before `prepare`)."""
    if template is None:
        return accelerator.unwrap_model(model) if accelerator.is_main_process else None
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    template.load_state_dict(state)
    return template


SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)


def make_accelerator(config: TrainConfig, **kwargs) -> Accelerator:
    """The run's accelerator (one process group for every launched process, see `launched_accelerator`)."""
    accelerator = launched_accelerator(
        mixed_precision=None if os.environ.get("ACCELERATE_MIXED_PRECISION") else config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=os.path.join(
            config.output_dir, "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        **kwargs,
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if accelerator.mixed_precision == "fp16" and autocast_dtype(accelerator) is None:
        logger.warning("fp16 mixed precision needs a GPU: on %s this run trains in float32.", accelerator.device)
    accelerator.print(f"Stage {config.stage} on {accelerator.device}: {accelerator.distributed_type.value}, "
                      f"{accelerator.num_processes} process(es).")
    return accelerator


def build_data(config: TrainConfig, from_cache: bool):
    """(dataset, DataLoader): cached latent pairs, or HR crops (corrupt images replaced by readable ones)."""
    if from_cache:
        info = check_latent_cache(config.latent_cache)
        logger.info("Training from the latent cache %s (%d samples).", config.latent_cache, info["samples"])
        # a cache of VAE latents only (no teacher estimates) serves any teacher on that VAE
        cache_teacher = info["teacher"] if info.get("teacher_latents", True) else config.teacher
        if (cache_teacher, info["hr_size"]) != (config.teacher, config.hr_size):
            logger.warning("The latent cache was written for teacher=%s hr_size=%s; this run has teacher=%s "
                           "hr_size=%s.", info["teacher"], info["hr_size"], config.teacher, config.hr_size)
        dataset = LatentPairDataset(config.latent_cache)
    else:
        dataset = build_dataset(config)
    streamed = isinstance(dataset, torch.utils.data.IterableDataset)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=not streamed, num_workers=config.num_workers,
                        drop_last=from_cache,
                        generator=None if streamed else torch.Generator().manual_seed(config.seed))
    return dataset, loader


def train(config: TrainConfig) -> dict:
    """Run one stage; returns {"step", "losses" and "learning_rates" (per step of this run), "export"}; the prune
    stage returns its decision instead of per-step values (they are in `keep_probabilities.jsonl`)."""
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
        accelerator.load_state(checkpoint)
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
        batch = data if from_cache else make_batch(data, degrade, generator)
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


def export_final(accelerator: Accelerator, config: TrainConfig, save: Callable[[str], None]) -> str:
    """`save` into `output_dir/final` atomically (main process), then wait for every process."""
    export = os.path.join(config.output_dir, "final")
    if accelerator.is_main_process:
        with atomic_directory(export, overwrite=True) as folder:
            save(folder)
    accelerator.wait_for_everyone()
    return export


def train_prune(config: TrainConfig) -> dict:
    """The `prune` stage: mask learning on the teacher's transformer, then the pruned TinySRPipeline in `final/`."""
    accelerator = make_accelerator(
        config, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])  # skipped layers
    run_id = claim_output_dir(accelerator, config)
    with accelerator.main_process_first():  # diffusers copies the pipelines' code modules: one process at a time
        teacher = load_teacher(config).to(accelerator.device)
    prompt_embeds, pooled = teacher.prompt_embeddings(1)
    learner_config = config.mask_learner_config()
    perceptual = None
    if learner_config.loss == "l1_perceptual":
        lpips = LPIPS(config.lpips_net).to(accelerator.device)
        perceptual = DecodedPerceptualLoss(teacher.decode_latents,
                                           lambda fake, real: lpips(fake.float(), real.float()).mean())
    learner = MaskLearner(
        teacher.transformer, learner_config, encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
        timestep=teacher.timestep, perceptual_loss=perceptual, output_dir=config.output_dir, accelerator=accelerator,
    )  # the learner's student is a float32 copy of the teacher transformer made here
    cast_frozen_teacher(accelerator, config, teacher)
    dataset, loader = build_data(config, from_cache=bool(config.latent_cache))
    if config.latent_cache:
        data = loader  # MaskLearner shards it across processes
    else:
        degrade = RealESRGANDegradation(DegradationConfig.from_dict(config.degradation))
        data = EncodedBatches(accelerator.prepare(loader), dataset, teacher, degrade, config.seed, accelerator)
    decision: PruningDecision = learner.train(data, resume_from=config.resume_from_checkpoint)
    accelerator.print(f"{learner_config.search}: keep layers {decision.keep_layers} "
                      f"(-> {os.path.join(config.output_dir, 'pruning.json')})")
    # The student is cut from the teacher's full-precision weights (the search's LoRA is discarded, as in TinyFusion):
    # the learner's float32 copy of them, since the teacher itself may have been cast to the mixed-precision dtype.
    teacher.register_modules(transformer=learner.base_transformer())

    def save(folder: str) -> None:  # main process only
        student_vae = TinySRAutoencoder.from_pretrained(config.student_vae) if config.student_vae else None
        TinySRPipeline.from_teacher(teacher, decision.keep_layers, vae=student_vae).save_pretrained(folder)

    export = export_final(accelerator, config, save)
    return {"step": learner.progress.step, "export": export, "decision": decision, "run_id": run_id}


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
