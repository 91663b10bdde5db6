"""Mask learning (paper Eq. 2 and appendix A.3): gates trained jointly with LoRA on a copy of the teacher.

The bi-level problem "which mask recovers best after fine-tuning" is solved jointly, as in TinyFusion: every step
samples a mask from the gates, runs the LoRA-adapted student with it (skipped layers are not computed) and minimises
the task + distillation loss against the frozen teacher, so the gates learn which layers the weights can best do
without. Runs under accelerate (CPU, one or several GPUs; `accelerate launch -m pruning.cli learn ...`); checkpoints
hold only the gates, the LoRA weights, the optimiser, the random states and the progress, written atomically.

A NaN/inf loss stops training before anything is updated, as in `training/distill.py` (one behaviour, the helpers
below): a checkpoint counts as good once the step after it had a finite loss, so the checkpoint whose weights gave
the loss is renamed `checkpoint-<step>.nonfinite` (`latest` skips it), the error names the last good one, and
`checkpoints_total_limit` never deletes that one before a newer checkpoint is good.
"""

import copy
import json
import os
import pickle
import shutil
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from diffusers.utils import logging
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tinysr_diffusers.utils import (
    PathLike,
    atomic_write_text,
    checkpoint_step,
    launched_accelerator,
    list_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)

from .config import MaskLearnerConfig
from .data import as_latent_batch, epoch_batches
from .decision import PruningDecision
from .inter_block import InterBlockGates
from .local_gates import LinearSchedule, LocalGates
from .losses import PerceptualLoss, PruningLoss
from .masked import MASKABLE_TYPES, MaskableTransformer, MaskedTransformer
from .plots import plot_keep_probabilities
from .search_space import SearchSpace


logger = logging.get_logger(__name__)


class GatedStudent(nn.Module):
    """The LoRA-adapted copy of the teacher behind layer masks, and the gates that sample those masks."""

    def __init__(self, masked: MaskedTransformer, gates: Union[LocalGates, InterBlockGates], per_sample: bool = False):
        super().__init__()
        self.masked = masked
        self.gates = gates
        self.per_sample = per_sample

    def forward(self, latents: torch.Tensor, tau: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample a mask (one per sample with `per_sample`) and return (clean-latent estimate, mask)."""
        mask = self.gates(tau, scale, latents.shape[0] if self.per_sample else None)
        return self.masked.predict_clean(latents, mask), mask


class _Progress:
    """Step counter and keep-probability history, saved in every checkpoint."""

    def __init__(self):
        self.step = 0
        self.history: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "history": json.dumps(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.history = json.loads(state["history"])


PROGRESS_FILE = "progress.json"


def refuse_pickled_state(checkpoint: PathLike) -> None:
    """Refuse a checkpoint holding accelerate's `custom_checkpoint_*.pkl` (`register_for_checkpointing`), which
    accelerate unpickles with `weights_only=False`: state is saved as JSON or safetensors instead, so such a file is
    from an older version or planted, and is never read."""
    found = sorted(path.name for path in Path(checkpoint).glob("custom_checkpoint_*.pkl"))
    if found:
        raise ValueError(f"{checkpoint} holds {', '.join(found)}: a pickle, which could run code, is never loaded "
                         f"(checkpoints keep that state as JSON or safetensors); resume from a checkpoint without it.")


# What reading a damaged checkpoint raises in `accelerator.load_state` and its hooks (a missing file, a truncated
# archive or header, broken JSON, a lost key).
_READ_ERRORS = (OSError, EOFError, KeyError, json.JSONDecodeError, UnicodeDecodeError, pickle.UnpicklingError,
                SafetensorError)


def _unreadable(path: Path) -> Optional[str]:
    """Why the checkpoint file `path` cannot be read, or None; checked by format, without loading anything."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(path, "pt"):  # the header, and that the file holds every byte it lists
                pass
        elif path.suffix in (".bin", ".pkl", ".pt"):  # `torch.save` archives: zip files with a CRC per record
            with zipfile.ZipFile(path) as archive:
                broken = archive.testzip()
            if broken is not None:
                return f"its record {broken} fails its checksum"
        elif path.suffix == ".json" and not isinstance(json.loads(path.read_text(encoding="utf-8")), dict):
            return "it holds no JSON object"
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, SafetensorError) as error:
        return str(error)
    return None


def load_checkpoint(accelerator: Accelerator, checkpoint: PathLike) -> None:
    """`accelerator.load_state(checkpoint)`, refusing a damaged checkpoint in one line that says how to go on.

    `save_checkpoint` writes a checkpoint complete or not at all, so a damaged one was changed afterwards (a failing
    disk, a partial copy): the run stops rather than silently going on from an older checkpoint. Every file is first
    checked by its format, since the loaders' errors mostly do not name the file, accelerate skips unreadable random
    states and torch does not check its archives' CRCs."""
    checkpoint = Path(checkpoint)
    files = sorted(path for path in checkpoint.rglob("*") if path.is_file())
    problems = [f"{path.relative_to(checkpoint)}: {reason}" for path in files
                if (reason := _unreadable(path)) is not None] if files else ["it holds no files"]
    if not problems:
        try:
            accelerator.load_state(os.fspath(checkpoint))
            return
        except _READ_ERRORS as error:
            problems = [f"{type(error).__name__}: {error}"]
    step = checkpoint_step(checkpoint)
    earlier = [path for path in list_checkpoints(checkpoint.parent) if checkpoint_step(path) < step]
    remedy = (f"resume from the one before it, {earlier[-1]}, or delete it and resume from latest" if earlier else
              "there is no earlier one: delete it to start the run from step 0")
    raise ValueError(f"Checkpoint {checkpoint} is damaged ({'; '.join(problems)}): {remedy}.")


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message names the last checkpoint whose weights gave a finite loss."""


def non_finite_loss_error(
    accelerator: Accelerator, folder: Optional[PathLike], step: int, unproven: Optional[int], losses: dict
) -> NonFiniteLossError:
    """The error of a non-finite loss at step `step + 1` (`losses`: the loss terms), for the checkpoints in `folder`.

    If `checkpoint-<step>` is `unproven` (no finite step since it was saved), its weights gave the loss: it is renamed
    `checkpoint-<step>.nonfinite`, so that `latest` skips it. The newest remaining checkpoint is the last good one.
    """
    path = os.path.join(folder, f"checkpoint-{step}") if folder else None
    if unproven == step and path is not None:
        if accelerator.is_main_process and os.path.isdir(path):
            shutil.rmtree(f"{path}.nonfinite", ignore_errors=True)
            os.replace(path, f"{path}.nonfinite")
        accelerator.wait_for_everyone()
    good = (list_checkpoints(folder) or [None])[-1] if folder else None
    where = f"the last good checkpoint is {good}" if good else "no checkpoint has a finite loss yet"
    return NonFiniteLossError(f"Loss became non-finite at step {step + 1} ({losses}); {where}. Lower the learning "
                              f"rate (it applies on resume) or check the data.")


def limit_checkpoints(accelerator: Accelerator, folder: PathLike, total_limit: Optional[int]) -> None:
    """Keep the newest `total_limit` checkpoints (called once the newest is known to be good)."""
    if accelerator.is_main_process and total_limit:
        for old in list_checkpoints(folder)[:-total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


class MaskLearner:
    r"""
    Learns which layers of an SD3 transformer (or a TinySR student) to keep.

    Parameters:
        teacher (`SD3Transformer2DModel` or `TinySRTransformer2DModel`): The frozen teacher; the student is a copy
            with LoRA adapters. The teacher is moved to the accelerator's device and left otherwise unchanged.
        config (`MaskLearnerConfig`): Settings.
        encoder_hidden_states, pooled_projections, timestep: The fixed SD3 conditioning (see [`MaskedTransformer`]).
        perceptual_loss (`Callable`, *optional*): `(prediction, target) -> scalar` on latents, for the
            `"l1_perceptual"` loss (e.g. [`DecodedPerceptualLoss`] around LPIPS).
        output_dir (`str`, *optional*): Where the log, heatmap, decision and checkpoints go; nothing is written
            without it.
        accelerator (`Accelerator`, *optional*): Use this one (e.g. from a training script) instead of making one.

    Writes to `output_dir`: `keep_probabilities.jsonl` (one record per `log_every` steps), `keep_probabilities.png`
    (heatmap), `pruning.json` (the decision) and `checkpoints/checkpoint-<step>/`.
    """

    def __init__(
        self,
        teacher: MaskableTransformer,
        config: MaskLearnerConfig,
        *,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        pooled_projections: Optional[torch.Tensor] = None,
        timestep: float = 1000.0,
        perceptual_loss: Optional[PerceptualLoss] = None,
        output_dir: Optional[PathLike] = None,
        accelerator: Optional[Accelerator] = None,
    ):
        self.config = config
        self.output_dir = Path(output_dir) if output_dir is not None else None
        if config.checkpointing_steps and self.output_dir is None:
            raise ValueError("`checkpointing_steps` needs an `output_dir` to write checkpoints to.")
        self.accelerator = accelerator or launched_accelerator(
            log_with=config.report_to,
            project_dir=str(self.output_dir) if self.output_dir else None,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],  # skipped layers
        )
        set_seed(config.seed, device_specific=True)

        if not isinstance(teacher, MASKABLE_TYPES):
            raise TypeError(f"The teacher must be an SD3 or TinySR transformer, got {type(teacher).__name__}.")
        if getattr(teacher, "peft_config", None):
            raise ValueError("The teacher carries LoRA adapters: merge them (`fuse_lora()`) before mask learning.")
        num_layers = len(teacher.transformer_blocks)
        self.space = SearchSpace.from_keep(num_layers, config.keep, config.block_size, config.delta)
        gates = (InterBlockGates(self.space, config.ema_decay, config.next_rule) if config.search == "tinysr"
                 else LocalGates(self.space, config.ema_decay))
        self.tau = LinearSchedule(*config.tau, config.max_steps)
        self.scale = LinearSchedule(*config.scale, config.max_steps)
        self.loss = PruningLoss(
            config.loss, config.task_weight, config.distill_weight, config.perceptual_weight, perceptual_loss
        )

        self._conditioning = {}
        if hasattr(teacher, "context_embedder"):  # SD3: the fixed conditioning of the one-step recipe
            self._conditioning = dict(
                encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections, timestep=timestep
            )
        student = copy.deepcopy(teacher).requires_grad_(False)
        student.add_adapter(
            LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha or config.lora_rank,
                init_lora_weights=True,
                target_modules=list(config.lora_target_modules),
            )
        )
        self.teacher = teacher.requires_grad_(False).eval().to(self.accelerator.device)
        self.student = GatedStudent(
            MaskedTransformer(student, **self._conditioning, skip_masked_layers=config.skip_pruned_layers),
            gates,
            per_sample=config.per_sample_masks,
        ).to(self.accelerator.device)

        lora_parameters = [p for p in self.student.masked.parameters() if p.requires_grad]
        self._trainable = lora_parameters + list(gates.parameters())
        gate_learning_rate = config.gate_learning_rate
        if gate_learning_rate is None:  # only None means "default": 0 freezes the gates
            gate_learning_rate = 10 * config.learning_rate
        self._learning_rates = [config.learning_rate, gate_learning_rate]  # of the param groups, in order
        self.optimizer = torch.optim.AdamW(
            [
                {"params": lora_parameters, "lr": config.learning_rate},
                {"params": list(gates.parameters()), "lr": gate_learning_rate},
            ],
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        self.student, self.optimizer = self.accelerator.prepare(self.student, self.optimizer)
        self.progress = _Progress()  # saved as JSON by the hooks: `register_for_checkpointing` would unpickle it
        self.accelerator.register_save_state_pre_hook(self._save_trainable)
        self.accelerator.register_load_state_pre_hook(self._load_trainable)

    # ----------------------------------------------------------------------------------------------- checkpoints
    @property
    def gates(self) -> Union[LocalGates, InterBlockGates]:
        return self.accelerator.unwrap_model(self.student).gates

    def _save_trainable(self, models: list, weights: list, output_dir: str) -> None:
        """accelerate hook: save only the LoRA weights, the gates and the progress, never the frozen transformer.

        The weights come from `accelerator.get_state_dict`, which every process calls: under FSDP or DeepSpeed it
        gathers the shards, where the unwrapped module would hold only this process's shard."""
        for model in models:
            state = self.accelerator.get_state_dict(model)
            if self.accelerator.is_main_process:
                student = self.accelerator.unwrap_model(model)
                transformer = {k[len("masked.transformer."):]: v for k, v in state.items()
                               if k.startswith("masked.transformer.")}
                lora = get_peft_model_state_dict(student.masked.transformer, state_dict=transformer)
                save_file({k: v.contiguous() for k, v in lora.items()}, os.path.join(output_dir, "lora.safetensors"))
                gates = {k[len("gates."):]: v.contiguous() for k, v in state.items() if k.startswith("gates.")}
                save_file(gates, os.path.join(output_dir, "gates.safetensors"))
        if self.accelerator.is_main_process:
            atomic_write_text(Path(output_dir) / PROGRESS_FILE, json.dumps(self.progress.state_dict()))
        weights.clear()

    def _load_trainable(self, models: list, input_dir: str) -> None:
        refuse_pickled_state(input_dir)
        while models:
            student = self.accelerator.unwrap_model(models.pop())
            lora = load_file(os.path.join(input_dir, "lora.safetensors"))
            result = set_peft_model_state_dict(student.masked.transformer, lora)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(
                    f"The checkpoint's LoRA weights do not fit the student: {result.unexpected_keys[:3]}."
                )
            student.gates.load_state_dict(load_file(os.path.join(input_dir, "gates.safetensors")))
        self.progress.load_state_dict(json.loads((Path(input_dir) / PROGRESS_FILE).read_text()))

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/checkpoint-<step>` atomically (see [`tinysr_diffusers.utils.save_checkpoint`]);
        `checkpoints_total_limit` applies once the step after it had a finite loss (see `train`)."""
        return Path(save_checkpoint(self.accelerator, self.checkpoint_dir, self.progress.step))

    def resolve_checkpoint(self, resume_from: PathLike) -> Optional[Path]:
        """`"latest"` (the highest step under `output_dir/checkpoints`, None if there is none yet) or a checkpoint
        folder."""
        if str(resume_from) == "latest" and self.output_dir is None:
            raise ValueError("Resuming from 'latest' needs an `output_dir`.")
        if str(resume_from) != "latest" and not (Path(resume_from) / "gates.safetensors").is_file():
            raise FileNotFoundError(f"{resume_from} is not a mask-learning checkpoint (no gates.safetensors).")
        checkpoint = resolve_checkpoint(self.checkpoint_dir if self.output_dir else "", resume_from)
        return Path(checkpoint) if checkpoint is not None else None

    def _apply_optimiser_settings(self) -> None:
        """After a resume: the configured learning rates and weight decay replace the checkpoint's (logged)."""
        groups = self.optimizer.param_groups
        before = [(group["lr"], group["weight_decay"]) for group in groups]
        for group, learning_rate in zip(groups, self._learning_rates):
            group["lr"], group["weight_decay"] = learning_rate, self.config.weight_decay
        after = [(group["lr"], group["weight_decay"]) for group in groups]
        if after != before:
            logger.info(f"Resumed with the configured (learning rate, weight decay) of the LoRA weights and the gates "
                        f"{after}, the checkpoint's {before}.")

    # ------------------------------------------------------------------------------------------------- training
    @torch.no_grad()
    def _teacher_estimate(self, latents: torch.Tensor) -> torch.Tensor:
        with self.accelerator.autocast():
            return self._teacher_masked.predict_clean(latents)

    def base_transformer(self) -> MaskableTransformer:
        """The student's frozen base weights (the teacher's, in the copy made at construction) without its LoRA
        adapters and mask hooks: what a decision is applied to, the search's LoRA being discarded as in TinyFusion.
        It takes the student apart: call it once training is over."""
        masked = self.accelerator.unwrap_model(self.student).masked
        transformer = masked.remove()
        transformer.unload_lora()
        return transformer.requires_grad_(False).eval()

    def record(self, step: int, losses: dict[str, float], mask: torch.Tensor) -> dict[str, Any]:
        """Log the keep probabilities (from the moving-average gates) at `step`."""
        scale = self.scale(step - 1)
        entry = {
            "step": step,
            "tau": self.tau(step - 1),
            "scale": scale,
            **losses,
            "sampled_mask": [int(v) for v in mask.detach().reshape(-1, mask.shape[-1])[0].round().tolist()],
            "keep_probabilities": self.gates.keep_probabilities(scale, ema=True).tolist(),
        }
        self.progress.history.append(entry)
        self.accelerator.log(
            {**losses, **{f"keep_probability/layer_{i:02d}": p for i, p in enumerate(entry["keep_probabilities"])}},
            step=step,
        )
        if self.output_dir is not None and self.accelerator.is_main_process:
            self._write_history()
        return entry

    def _write_history(self) -> None:
        atomic_write_text(
            self.output_dir / "keep_probabilities.jsonl",
            "".join(json.dumps(entry) + "\n" for entry in self.progress.history),
        )

    def plot(self, path: Optional[PathLike] = None, keep_layers: Optional[list[int]] = None) -> Optional[Path]:
        """Write the keep-probability heatmap (default `output_dir/keep_probabilities.png`)."""
        history = self.progress.history
        if not history or not self.accelerator.is_main_process:
            return None
        path = Path(path) if path is not None else self.output_dir / "keep_probabilities.png"
        title = f"{self.config.search}: keep probability per layer"
        plot_keep_probabilities(
            [e["step"] for e in history], [e["keep_probabilities"] for e in history], path, keep_layers, title
        )
        return path

    def decision(self) -> PruningDecision:
        """The current decision from the moving-average gates."""
        gates, scale = self.gates, self.scale(max(self.progress.step - 1, 0))
        probabilities = gates.keep_probabilities(scale, ema=True).tolist()
        details = {
            **gates.decision_details(scale, ema=True),
            "steps": self.progress.step,
            "config": asdict(self.config),
        }
        return PruningDecision.from_mask(
            self.config.search,
            gates.decide(ema=True, scale=scale),
            scores=probabilities,
            probabilities=probabilities,
            details=details,
        )

    def train(self, data: Iterable, resume_from: Optional[PathLike] = None) -> PruningDecision:
        """
        Learn the mask for `config.max_steps` steps (resuming from a checkpoint if asked) and return the decision.

        Args:
            data: Iterable of latent batches (see [`pruning.data`]), re-iterated epoch after epoch. A
                `torch.utils.data.DataLoader` is sharded across processes by accelerate; for an exact resume the
                iteration order of each epoch must be reproducible (a seeded DataLoader is).
            resume_from: `"latest"` (a new run when there is no complete checkpoint yet) or a checkpoint folder.
        """
        accelerator, config = self.accelerator, self.config
        if isinstance(data, DataLoader):
            data = accelerator.prepare(data)
        checkpoint = self.resolve_checkpoint(resume_from) if resume_from is not None else None
        if checkpoint is not None:
            load_checkpoint(accelerator, checkpoint)
            logger.info(f"Resumed mask learning from {checkpoint} at step {self.progress.step}.")
            self._apply_optimiser_settings()
        if accelerator.is_main_process and config.report_to:
            accelerator.init_trackers("tinysr-prune", config={k: str(v) for k, v in asdict(config).items()})

        self._teacher_masked = MaskedTransformer(self.teacher, **self._conditioning)
        device = accelerator.device
        batches = epoch_batches(data, self.progress.step)
        checkpoints = self.checkpoint_dir if self.output_dir is not None else None
        unproven = self.progress.step if checkpoint is not None else None  # the newest checkpoint, until a finite step
        bar = tqdm(
            total=config.max_steps,
            initial=self.progress.step,
            desc=f"Mask learning ({config.search})",
            disable=not accelerator.is_local_main_process,
        )
        running, count = {}, 0
        try:
            self.student.train()
            while self.progress.step < config.max_steps:
                step = self.progress.step
                batch = as_latent_batch(next(batches)[2]).to(device)
                teacher = batch.teacher if batch.teacher is not None else self._teacher_estimate(batch.lr)
                tau, scale = self.tau(step), self.scale(step)
                prediction, mask = self.student(batch.lr, tau, scale)
                loss, parts = self.loss(prediction.float(), batch.hr.float(), teacher.float())
                if not torch.isfinite(accelerator.reduce(loss.detach().float().reshape(1), "mean")).all():
                    raise non_finite_loss_error(accelerator, checkpoints, step, unproven,
                                                {"loss": loss.item(), **parts})
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(self._trainable, config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.gates.update_ema()
                self.progress.step = step + 1
                if unproven is not None:  # its weights gave a finite step: older checkpoints may go
                    limit_checkpoints(accelerator, checkpoints, config.checkpoints_total_limit)
                    unproven = None

                for key, value in {"loss": loss.item(), **parts}.items():
                    running[key] = running.get(key, 0.0) + value
                count += 1
                bar.update(1)
                if self.progress.step % config.log_every == 0 or self.progress.step == config.max_steps:
                    means = torch.tensor([running[k] / count for k in running], device=device)
                    means = accelerator.reduce(means, reduction="mean").tolist()
                    entry = self.record(self.progress.step, dict(zip(running, means)), mask)
                    bar.set_postfix(loss=f"{entry['loss']:.4g}", tau=f"{tau:.3g}")
                    running, count = {}, 0
                if config.checkpointing_steps and self.progress.step % config.checkpointing_steps == 0:
                    self.save_checkpoint()
                    self.plot()
                    unproven = self.progress.step
        finally:
            bar.close()
            self._teacher_masked.remove()
        if checkpoints is not None:
            limit_checkpoints(accelerator, checkpoints, config.checkpoints_total_limit)

        decision = self.decision()
        if self.output_dir is not None and accelerator.is_main_process:
            decision.save(self.output_dir / "pruning.json")
            self.plot(keep_layers=decision.keep_layers)
        accelerator.wait_for_everyone()
        if config.report_to:
            accelerator.end_training()
        return decision

