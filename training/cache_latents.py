"""Pre-encode LR, HR and teacher latents once, for the `prune` and `latent` stages (training/README.md).

    accelerate launch training/cache_latents.py --config training/configs/latent.yaml latent_cache=runs/latents \
        [cache_epochs=4 cache_shard_size=1024]

Reads the same settings as `training/distill.py` (teacher, images, hr_size, batch_size, degradation, seed): every
pass over the images (`cache_epochs`) draws new crops and degradations, encodes them with the teacher's VAE and runs
the teacher once. The folder holds float32 safetensors shards (`lr_latents`, `hr_latents`, `teacher_latents`) and
`cache.json`; train from it with `latent_cache=<folder>`, or give it to `tinysr-prune score|learn --data`.
"""

import torch
from accelerate.utils import set_seed

from tinysr_diffusers.training_utils.degradations import DegradationConfig, RealESRGANDegradation
from training.config import load_config
from training.latents import write_latent_cache
from training.models import cast_frozen_teacher, load_teacher
from training.run import build_data, make_accelerator


def cache_latents(config) -> str:
    """Write the latent cache of `config` into `config.latent_cache`; returns the folder."""
    if not config.latent_cache:
        raise ValueError("Set latent_cache to the folder to write.")
    if not config.train_data and not config.dataset_name:
        raise ValueError("The latent cache is encoded from images: give train_data or dataset_name.")
    accelerator = make_accelerator(config)
    set_seed(config.seed)
    with accelerator.main_process_first():  # diffusers copies the pipelines' code modules: one process at a time
        teacher = load_teacher(config).to(accelerator.device)
    cast_frozen_teacher(accelerator, config, teacher)
    _, loader = build_data(config, from_cache=False)
    degrade = RealESRGANDegradation(DegradationConfig.from_dict(config.degradation))
    with torch.no_grad():
        folder = write_latent_cache(config, accelerator, teacher, accelerator.prepare(loader), degrade)
    accelerator.print(f"Latent cache written to {folder}.")
    return folder


def main(argv=None) -> None:
    try:
        config = load_config(argv)
        cache_latents(config)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        raise SystemExit(f"error: {error}")


if __name__ == "__main__":
    main()
