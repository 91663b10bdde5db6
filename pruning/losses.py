"""The loss of mask learning (paper appendix A.3) and the release's L1 + perceptual variant.

Paper (default, `kind="mse"`):
    l_task * MSE(student(z_L), z_HR) + l_distill * MSE(student(z_L), teacher(z_L)), both weights 1,
where `student(z_L)` and `teacher(z_L)` are the one-step clean-latent estimates `z_L - v`.

The authors' prune script (`kind="l1_perceptual"`):
    l_distill * L1(student(z_L), teacher(z_L)) + perceptual_weight * LPIPS(decode(student(z_L)), HR image),
i.e. L1 against the teacher's latents only and the perceptual distance against the HR target only (`task_weight` is
not used by this kind). The perceptual distance is any callable `(predicted_latents, hr_latents) -> scalar`;
[`DecodedPerceptualLoss`] turns an image metric such as LPIPS into one by decoding both with a VAE (batches hold
latents, so the HR image is the VAE's decoding of the HR latents).
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import LOSS_KINDS


PerceptualLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PruningLoss(nn.Module):
    r"""
    Task + distillation loss on clean-latent estimates.

    Parameters:
        kind (`str`, defaults to `"mse"`): `"mse"` (paper A.3) or `"l1_perceptual"` (release).
        task_weight (`float`, defaults to `1.0`): Weight of the term against the high-resolution latents.
        distill_weight (`float`, defaults to `1.0`): Weight of the term against the teacher's estimate.
        perceptual_weight (`float`, defaults to `1.0`): Weight of the perceptual term against the HR target
            (`"l1_perceptual"` only).
        perceptual_loss (`Callable`, *optional*): `(prediction, target) -> scalar` on latents; required for
            `"l1_perceptual"`.
    """

    def __init__(
        self,
        kind: str = "mse",
        task_weight: float = 1.0,
        distill_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        perceptual_loss: Optional[PerceptualLoss] = None,
    ):
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"Unknown loss {kind!r}; choose one of {LOSS_KINDS}.")
        if kind == "l1_perceptual" and perceptual_loss is None:
            raise ValueError(
                "The 'l1_perceptual' loss needs a `perceptual_loss` callable (e.g. LPIPS on decoded latents)."
            )
        self.kind = kind
        self.task_weight = task_weight
        self.distill_weight = distill_weight
        self.perceptual_weight = perceptual_weight
        self.perceptual_loss = perceptual_loss

    def forward(
        self, prediction: torch.Tensor, hr: torch.Tensor, teacher: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Returns the total loss and its two terms (as floats, for logging): `task` (against the HR latents: MSE,
        or the perceptual distance) and `distill` (against the teacher: MSE, or L1)."""
        if self.kind == "mse":
            task, distill = F.mse_loss(prediction, hr), F.mse_loss(prediction, teacher)
            total = self.task_weight * task + self.distill_weight * distill
        else:
            task, distill = self.perceptual_loss(prediction, hr), F.l1_loss(prediction, teacher)
            total = self.perceptual_weight * task + self.distill_weight * distill
        return total, {"task": task.item(), "distill": distill.item()}


class DecodedPerceptualLoss(nn.Module):
    """`image_loss(decode(prediction), decode(target))`: a perceptual image metric applied to decoded latents."""

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], image_loss: PerceptualLoss):
        super().__init__()
        self.decode = decode
        self.image_loss = image_loss

    @classmethod
    def from_vae(cls, vae: nn.Module, image_loss: PerceptualLoss) -> "DecodedPerceptualLoss":
        """Decode with a frozen diffusers-style VAE (`vae.decode(z / scaling_factor).sample`, images in [-1, 1])."""
        vae.requires_grad_(False)
        scaling_factor = vae.config.scaling_factor

        def decode(latents: torch.Tensor) -> torch.Tensor:
            return vae.decode(latents / scaling_factor).sample

        return cls(decode, image_loss)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_images = self.decode(target)
        return self.image_loss(self.decode(prediction), target_images)
