"""Local gates (TinyFusion): learnable logits over the local patterns of every block, sampled with Gumbel-softmax.

Block k of M layers has logits alpha_k over its C(M, N) patterns (initialised equal). A training step samples
`y_k = gumbel_softmax(alpha_k * scale, tau, hard=True)`, a one-hot choice whose straight-through gradient reaches every
logit, and keeps the layers of `cur_k = y_k @ patterns`. The temperature `tau` and the logit `scale` follow linear
schedules (TinyFusion's release: tau 4 -> 0.1, scale 100 constant). An exponential moving average (EMA) of the logits,
updated after every optimiser step, makes the decision: the argmax pattern of every block.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .search_space import SearchSpace, local_patterns


@dataclass(frozen=True)
class LinearSchedule:
    """A value going linearly from `start` (step 0) to `end` (step `num_steps - 1`), as TinyFusion schedules tau."""

    start: float
    end: float
    num_steps: int

    def __call__(self, step: int) -> float:
        progress = min(step, self.num_steps - 1) / max(self.num_steps - 1, 1)
        return self.start + (self.end - self.start) * progress


class LocalGates(nn.Module):
    r"""
    TinyFusion's local gates over a [`SearchSpace`]: one row of logits per block over its local patterns.

    Parameters:
        space (`SearchSpace`): The block layout (layers, block size, layers kept per block).
        ema_decay (`float`, defaults to `0.999`): Decay of the moving average of the logits that makes the decision.
    """

    def __init__(self, space: SearchSpace, ema_decay: float = 0.999):
        super().__init__()
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {ema_decay}.")
        self.space = space
        self.ema_decay = ema_decay
        self.register_buffer("patterns", local_patterns(space.block_size, space.keep_per_block), persistent=False)
        self.logits = nn.Parameter(torch.zeros(space.num_blocks, space.num_patterns))
        self.register_buffer("ema_logits", torch.zeros(space.num_blocks, space.num_patterns))

    def sample_patterns(self, tau: float, scale: float, num_samples: Optional[int] = None) -> torch.Tensor:
        """One straight-through one-hot pattern choice per block, shape (num_blocks, num_patterns), or per sample
        and block, shape (num_samples, num_blocks, num_patterns)."""
        logits = self.logits * scale
        if num_samples is not None:
            logits = logits.expand(num_samples, -1, -1)
        return F.gumbel_softmax(logits, tau=tau, hard=True, dim=-1)

    def forward(self, tau: float, scale: float, num_samples: Optional[int] = None) -> torch.Tensor:
        """A sampled layer mask of shape (num_layers,), or (num_samples, num_layers) with one mask per sample
        (TinyFusion's sampling): exactly 0/1 forward, differentiable w.r.t. the logits."""
        masks = self.sample_patterns(tau, scale, num_samples) @ self.patterns
        return masks.reshape(-1) if num_samples is None else masks.reshape(num_samples, -1)

    def gate_logits(self, ema: bool = True) -> torch.Tensor:
        """The moving-average (default) or live logits, detached, shape (num_blocks, num_patterns)."""
        return (self.ema_logits if ema else self.logits).detach()

    def probabilities(self, scale: float, ema: bool = True) -> torch.Tensor:
        """Pattern probabilities `softmax(alpha * scale)` per block, shape (num_blocks, num_patterns)."""
        return torch.softmax(self.gate_logits(ema).float() * scale, dim=-1)

    def keep_probabilities(self, scale: float, ema: bool = True) -> torch.Tensor:
        """Marginal probability that each layer is kept, shape (num_layers,)."""
        return (self.probabilities(scale, ema) @ self.patterns).reshape(-1)

    def confidence(self, scale: float, ema: bool = True) -> torch.Tensor:
        """Probability of the chosen pattern of every block (TinyFusion's "confidence"), shape (num_blocks,)."""
        return self.probabilities(scale, ema).max(dim=-1).values

    def choices(self, ema: bool = True) -> torch.Tensor:
        """Index of the decided pattern per block: the argmax logit, the lowest index on ties."""
        return self.gate_logits(ema).argmax(dim=-1)

    def decide(self, ema: bool = True, scale: float = 100.0) -> torch.Tensor:
        """The final hard layer mask (num_layers,), deterministic (`scale` is unused: the argmax ignores it)."""
        return self.patterns[self.choices(ema)].reshape(-1)

    @torch.no_grad()
    def update_ema(self) -> None:
        self.ema_logits.lerp_(self.logits.detach().to(self.ema_logits.dtype), 1.0 - self.ema_decay)

    def decision_details(self, scale: float, ema: bool = True) -> dict:
        """JSON-ready record of the decision: chosen pattern and its probability per block."""
        return {
            "block_size": self.space.block_size,
            "keep_per_block": self.space.keep_per_block,
            "patterns": self.choices(ema).tolist(),
            "confidence": self.confidence(scale, ema).tolist(),
        }
