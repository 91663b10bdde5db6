"""What a checkpoint adds to `accelerator.save_state`: the EMA weights as safetensors, and on resume the configured
optimiser settings over the saved ones."""

import json
import logging
import os

from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import save_file

from pruning.learner import refuse_pickled_state


logger = logging.getLogger("tinysr.distill")

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
