"""The settings of mask learning, in a module that imports neither torch nor diffusers.

`tinysr-prune learn`, the training prune stage (the `prune` section of `training/config.py`) and the benchmarks all
build a [`MaskLearnerConfig`] with `MaskLearnerConfig.from_dict`, so the same search has the same defaults whatever
starts it.
"""

from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional


SEARCHES = ("tinysr", "tinyfusion")
# The choices of `pruning.losses.PruningLoss` and `pruning.inter_block.InterBlockGates`, here to validate a config
# without importing torch.
LOSS_KINDS = ("mse", "l1_perceptual")
NEXT_RULES = ("pattern", "marginal")
# The LoRA targets of the authors' prune script (attention of both streams, feed-forward `proj`, adaLN `linear`,
# output projection): the one default of mask learning, for `tinysr-prune learn` and the training prune stage alike.
DEFAULT_LORA_TARGETS = (
    "to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "proj", "linear", "proj_out",
)  # fmt: skip


@dataclass
class MaskLearnerConfig:
    r"""
    Settings of mask learning; defaults are the paper's (appendix A.3) and TinyFusion's release where the paper is
    silent.

    Attributes:
        keep (`int`): Layers to keep in total (the paper: 12 of 24).
        block_size (`int`): Layers per block M (the paper: 4, keeping 2 per block).
        search (`str`): `"tinysr"` (local gates + Dynamic Inter-block Activation + Expansion-Corrosion) or
            `"tinyfusion"` (local gates only).
        delta (`int`): Layers the inter-block operators move (the paper: 1).
        max_steps (`int`): Optimiser steps (the paper: 100k at batch 8).
        learning_rate (`float`): AdamW learning rate of the LoRA weights (the paper: 5e-5).
        gate_learning_rate (`float`, *optional*): Learning rate of the gate logits; `None` (only) means 10x
            `learning_rate` (TinyFusion's release); 0 freezes the gates.
        weight_decay (`float`): AdamW weight decay (TinyFusion: 0).
        max_grad_norm (`float`): Gradient clipping norm (TinyFusion: 1).
        lora_rank (`int`): LoRA rank (the paper: 64). `lora_alpha` defaults to the rank.
        lora_target_modules (`tuple[str]`): Module names LoRA adapts (default: `DEFAULT_LORA_TARGETS`).
        tau (`tuple[float, float]`): Gumbel-softmax temperature, linear from first to second (TinyFusion: 4 -> 0.1).
        scale (`tuple[float, float]`): Logit scale, linear from first to second (TinyFusion: 100 -> 100).
        ema_decay (`float`): Moving average of the logits that makes the decision (TinyFusion: 0.999).
        skip_pruned_layers (`bool`): Do not compute the layers a sampled mask prunes, as the paper's text says
            ("calculation is bypassed if its mask is 0"). An ablation, off by default: a skipped layer returns its
            input whatever its mask, so the loss's gradient with respect to a pruned layer's mask is exactly zero and
            the gates only see the slope at m = 1 of kept layers, which on a real teacher points the wrong way for
            the most important layers (measured in `docs/method.md` and `benchmarks/results/pruning_planted.md`).
            The default computes every layer and mixes `m * f(h) + (1 - m) * h`, as both public codes do.
        next_rule (`str`): How Expansion-Corrosion picks `next` (`"pattern"`: the authors' code; `"marginal"`: the
            paper's text); see [`pruning.inter_block`].
        per_sample_masks (`bool`, *optional*): Sample one mask per sample of a batch (TinyFusion's
            `gate.repeat(N, 1)`) instead of one per batch; `None`: per sample for `tinyfusion`, per batch for
            `tinysr`.
        loss (`str`): `"mse"` (paper A.3) or `"l1_perceptual"` (release); see [`PruningLoss`].
        task_weight, distill_weight, perceptual_weight (`float`): Loss weights (the paper: 1, 1).
        seed (`int`): Random seed (the paper: 80); each process adds its index.
        log_every (`int`): Steps between keep-probability records (and tracker logs).
        checkpointing_steps (`int`, *optional*): Steps between checkpoints (needs an output folder).
        checkpoints_total_limit (`int`, *optional*): Keep at most this many checkpoints.
        report_to (`str`, *optional*): accelerate tracker (e.g. `"tensorboard"`).
    """

    keep: int
    block_size: int = 4
    search: str = "tinysr"
    delta: int = 1
    max_steps: int = 100_000
    learning_rate: float = 5e-5
    gate_learning_rate: Optional[float] = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int = 64
    lora_alpha: Optional[int] = None
    lora_target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    tau: tuple[float, float] = (4.0, 0.1)
    scale: tuple[float, float] = (100.0, 100.0)
    ema_decay: float = 0.999
    skip_pruned_layers: bool = False
    next_rule: str = "pattern"
    per_sample_masks: Optional[bool] = None
    loss: str = "mse"
    task_weight: float = 1.0
    distill_weight: float = 1.0
    perceptual_weight: float = 1.0
    seed: int = 80
    log_every: int = 100
    checkpointing_steps: Optional[int] = None
    checkpoints_total_limit: Optional[int] = None
    report_to: Optional[str] = None

    def __post_init__(self):
        if self.search not in SEARCHES:
            raise ValueError(f"Unknown search {self.search!r}; choose one of {SEARCHES}.")
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"Unknown loss {self.loss!r}; choose one of {LOSS_KINDS}.")
        for name in ("max_steps", "lora_rank", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.checkpointing_steps is not None and self.checkpointing_steps < 1:
            raise ValueError(f"`checkpointing_steps` must be >= 1, got {self.checkpointing_steps}.")
        if self.next_rule not in NEXT_RULES:
            raise ValueError(f"Unknown next_rule {self.next_rule!r}; choose one of {NEXT_RULES}.")
        if self.gate_learning_rate is not None and not self.gate_learning_rate >= 0:
            raise ValueError(f"`gate_learning_rate` must be >= 0 (or None), got {self.gate_learning_rate}.")
        for name in ("tau", "scale"):
            if len(getattr(self, name)) != 2:
                raise ValueError(f"`{name}` must be (start, end), got {getattr(self, name)}.")
        if self.per_sample_masks is None:
            self.per_sample_masks = self.search == "tinyfusion"
        self.tau, self.scale = tuple(self.tau), tuple(self.scale)
        self.lora_target_modules = tuple(self.lora_target_modules)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "MaskLearnerConfig":
        """Build from a mapping (command-line options, a YAML section), rejecting unknown keys by name."""
        known = {spec.name for spec in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown mask-learning settings {unknown}; known: {sorted(known)}.")
        if "keep" not in values:
            raise ValueError("Mask learning needs `keep`, the number of layers to keep (the paper: 12 of 24).")
        return cls(**values)
