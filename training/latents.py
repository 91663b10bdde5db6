"""Latent pairs from the teacher: what the prune and latent stages learn from, on the fly or from a cache.

A crop batch becomes scaled teacher-VAE latents `lr_latents` (z_L of the degraded, upscaled image), `hr_latents`
(z_H of the HR crop) and, for the cache, `teacher_latents` (the teacher's one-step estimate `z_L - sigma * v`).

Training encodes with the posterior mode of an `AutoencoderKL` teacher VAE, never a sample: the student meets, at
inference, its tiny encoder's latents, which the `vae_encoder` stage fits to that mode; so every stage (and the
cache) learns from the latents the student will see, and a pair no longer depends on the random generator. The
teacher pipeline's inference keeps the releases' posterior sample (`encode_latents(sample_posterior=True)`).
`training/cache_latents.py` writes them once as safetensors shards in the layout `pruning.data.LatentPairDataset`
reads, so a cache also serves `tinysr-prune score|learn --data`.
"""

import json
import os
import shutil
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pruning.data import data_length, epoch_batches
from tinysr_diffusers import OneStepSRPipeline, TSDSRPipeline
from tinysr_diffusers.training_utils.degradations import RealESRGANDegradation
from tinysr_diffusers.image_processing import bicubic_upscale
from tinysr_diffusers.pipelines.pipeline_one_step_sr import step_latents
from tinysr_diffusers.utils import atomic_path, write_json
from training.data import seeded_generator


CACHE_INFO = "cache.json"
CACHE_INFO_KEYS = ("teacher", "samples", "hr_size")  # what training reads from it


def make_batch(hr: torch.Tensor, degrade: RealESRGANDegradation, generator: torch.Generator) -> dict:
    """HR crops in [0, 1] -> {"lr_up": bicubic-upscaled degraded LR, "hr": HR}, both in [-1, 1]."""
    lr = degrade(hr, generator=generator)
    lr_up = bicubic_upscale(lr, degrade.config.scale)
    return {"lr_up": lr_up * 2 - 1, "hr": hr * 2 - 1}


def make_pair_batch(pairs: dict, hr_mix: float) -> dict:
    """A `training.data.PairShardDataset` batch -> {"lr_up": bicubic-upscaled LR, "hr": the target with `hr_mix` of the
    HR mixed in}, both in [-1, 1], as `make_batch` returns for degraded HR crops."""
    target = (1 - hr_mix) * pairs["target"] + hr_mix * pairs["hr"]
    return {"lr_up": bicubic_upscale(pairs["lr"], 4) * 2 - 1, "hr": target * 2 - 1}


def training_latents(pipe: OneStepSRPipeline, images: torch.Tensor) -> torch.Tensor:
    """Scaled latents of images in [-1, 1] as training uses them: an `AutoencoderKL`'s posterior mode."""
    return pipe.encode_latents(images, sample_posterior=False)


@torch.no_grad()
def teacher_estimate(teacher: TSDSRPipeline, lr_latents: torch.Tensor) -> torch.Tensor:
    """The teacher's one-step estimate of the clean latents, `z_L - sigma * v`."""
    return step_latents(lr_latents, teacher.predict_velocity(lr_latents), teacher.sigma)


@torch.no_grad()
def encode_batch(teacher: TSDSRPipeline, batch: dict, with_teacher: bool) -> dict:
    """Image batch (`make_batch`) -> latent batch with the keys of `pruning.data.LATENT_KEYS`."""
    lr_latents = training_latents(teacher, batch["lr_up"])
    latents = {"lr_latents": lr_latents, "hr_latents": training_latents(teacher, batch["hr"])}
    if with_teacher:
        latents["teacher_latents"] = teacher_estimate(teacher, lr_latents)
    return latents


class EncodedBatches:
    """The prune stage's on-the-fly data: crop batches degraded and encoded by the teacher, as `(z_L, z_H)` pairs.

    `pruning.MaskLearner` iterates it one epoch at a time (`set_epoch`) and skips to its resume point by reading, so
    a resume re-encodes the batches of the current epoch that came before the checkpoint.
    """

    def __init__(self, loader, dataset, teacher: TSDSRPipeline, degrade: RealESRGANDegradation, seed: int,
                 accelerator):
        self.loader, self.dataset, self.teacher, self.degrade = loader, dataset, teacher, degrade
        self.seed, self.accelerator = seed, accelerator
        self.epoch = 0

    def __len__(self) -> int:
        length = data_length(self.loader)
        if length is None:
            raise TypeError("A streamed dataset has no length.")
        return length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        accelerator = self.accelerator
        self.dataset.epoch = self.epoch
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        for index, crops in enumerate(self.loader):
            generator = seeded_generator(self.seed, self.epoch, index, accelerator.process_index,
                                         device=accelerator.device)
            batch = make_batch(crops.to(accelerator.device), self.degrade, generator)
            latents = encode_batch(self.teacher, batch, with_teacher=False)
            yield latents["lr_latents"], latents["hr_latents"]


def write_latent_cache(config, accelerator, teacher: TSDSRPipeline, loader, degrade: RealESRGANDegradation) -> str:
    """
    Encode `config.cache_epochs` passes over the images into `config.latent_cache` (float32 safetensors shards of
    `cache_shard_size` samples, one series per process, and `cache.json`). Written into `<folder>.tmp` and renamed
    when every process is done, so the folder appears complete or not at all.
    """
    final = os.path.abspath(config.latent_cache)
    if os.path.exists(final):
        raise FileExistsError(f"{final} already exists; choose another latent_cache folder or remove it.")
    temporary = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    accelerator.wait_for_everyone()

    rank, pending, shard, samples = accelerator.process_index, [], 0, 0

    def flush(parts: list) -> None:
        nonlocal shard
        tensors = {key: torch.cat([part[key] for part in parts]).contiguous() for key in parts[0]}
        with atomic_path(os.path.join(temporary, f"shard-{rank:03d}-{shard:06d}.safetensors")) as path:
            save_file(tensors, path)
        shard += 1

    length = data_length(loader)
    total = config.cache_epochs * length if length else None
    progress = tqdm(total=total, desc="Encoding latents", disable=not accelerator.is_local_main_process)
    buffered = 0
    for epoch, position, crops in epoch_batches(loader):
        if epoch >= config.cache_epochs:
            break
        progress.update(1)
        generator = seeded_generator(config.seed, position, rank, device=accelerator.device)
        batch = make_batch(crops.to(accelerator.device), degrade, generator)
        with accelerator.autocast():  # the teacher transformer may be in the mixed-precision dtype
            latents = encode_batch(teacher, batch, with_teacher=config.cache_teacher_latents)
        pending.append({key: value.float().cpu() for key, value in latents.items()})
        buffered += len(crops)
        samples += len(crops)
        if buffered >= config.cache_shard_size:
            flush(pending)
            pending, buffered = [], 0
    if pending:
        flush(pending)
    progress.close()

    counts = accelerator.gather(torch.tensor([samples], device=accelerator.device)).tolist()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        info = {
            "teacher": config.teacher,
            "teacher_latents": config.cache_teacher_latents,
            "samples": sum(counts),
            "hr_size": config.hr_size,
            "epochs": config.cache_epochs,
            "seed": config.seed,
            "degradation": degrade.config.to_dict(),
        }
        write_json(os.path.join(temporary, CACHE_INFO), info)
        os.replace(temporary, final)
    accelerator.wait_for_everyone()
    return final


def check_latent_cache(folder: str) -> dict:
    """The `cache.json` of a complete cache; a clear error for a folder that is not one."""
    path = os.path.join(folder, CACHE_INFO)
    if not os.path.isfile(path):
        hint = " (an interrupted cache_latents.py run leaves a .tmp folder: rerun it)" if os.path.isdir(
            folder + ".tmp") else ""
        raise FileNotFoundError(f"{folder} is not a latent cache written by training/cache_latents.py: no "
                                f"{CACHE_INFO}{hint}.")
    try:
        with open(path, encoding="utf-8") as handle:
            info = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rerun training/cache_latents.py.") from None
    missing = [key for key in CACHE_INFO_KEYS if not isinstance(info, dict) or key not in info]
    if missing:
        raise ValueError(f"{path} lacks {missing}: not the {CACHE_INFO} of a latent cache; rerun cache_latents.py.")
    return info
