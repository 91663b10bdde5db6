"""What every stage's run shares: its accelerator, its `output_dir` (`run.json`), its data and its export.

`output_dir` holds one run (`run.json`: its id and config); see `claim_output_dir` for what is the same run.
"""

import fnmatch
import json
import logging
import os
import shutil
import uuid
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration
from torch.utils.data import DataLoader, Dataset

from pruning.data import LatentPairDataset
from tinysr_diffusers.utils import atomic_directory, launched_accelerator, list_checkpoints, write_json
from training.config import RESUMABLE_SETTINGS, TrainConfig
from training.data import build_dataset
from training.latents import check_latent_cache
from training.models import autocast_dtype


logger = logging.getLogger("tinysr.distill")

# The distributed types under which a process holds only a shard of the weights (see `full_model`).
SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)
RUN_RECORD = "run.json"
# What a run writes into its output_dir (the prune stage's files included): what `overwrite_output_dir` deletes.
RUN_OUTPUTS = (RUN_RECORD, "checkpoint-*", ".checkpoint-*", "checkpoints", "final", ".final.*", "logs", "pruning.json",
               "keep_probabilities.*")


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


def build_data(config: TrainConfig, from_cache: bool) -> tuple[Dataset, DataLoader]:
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


def export_final(accelerator: Accelerator, config: TrainConfig, save: Callable[[str], None]) -> str:
    """`save` into `output_dir/final` atomically (main process), then wait for every process."""
    export = os.path.join(config.output_dir, "final")
    if accelerator.is_main_process:
        with atomic_directory(export, overwrite=True) as folder:
            save(folder)
    accelerator.wait_for_everyone()
    return export
