"""The models a stage starts from: the frozen teacher, LoRA adapters, and the mixed-precision cast of the teacher."""

import copy
from typing import Optional

import torch
from accelerate import Accelerator

from tinysr_diffusers import TSDSRPipeline
from tinysr_diffusers.hub.conversion import merge_lora
from training.config import TrainConfig


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


def add_lora(transformer: torch.nn.Module, config: TrainConfig) -> None:
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, init_lora_weights="gaussian",
                                       target_modules=config.lora_target_modules))


def merged_transformer(transformer: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of `transformer` with its LoRA (if any) merged into the base weights by `merge_lora`: the export
    must leave the trained module, adapters included, as it is."""
    transformer = copy.deepcopy(transformer)
    return merge_lora(transformer) if getattr(transformer, "_hf_peft_config_loaded", False) else transformer
