"""Colour correction of super-resolved images against their low-resolution input.

One-step diffusion SR keeps structure but can drift in colour; TinySR and TSD-SR correct the output against the LR
image afterwards. Two methods, as in their releases (after StableSR):

- `"adain"`: match each channel's mean and standard deviation to the LR image's (global statistics, so the LR image
  can be used at its own size).
- `"wavelet"`: keep the output's high frequencies and take the low frequencies (a 5-level a-trous wavelet
  decomposition) from the bicubically upscaled LR image.

Images are (B, C, H, W) tensors in [0, 1]; results are clamped to [0, 1].
"""

from typing import Optional

import torch
import torch.nn.functional as F


COLOR_FIX_METHODS = ("adain", "wavelet", None)


def check_color_fix(method: Optional[str]) -> None:
    """Raise a clear error for an unknown colour-fix name."""
    if method not in COLOR_FIX_METHODS:
        raise ValueError(f"`color_fix` must be one of {COLOR_FIX_METHODS}, got {method!r}.")


def _mean_std(image: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    flat = image.flatten(2)
    # A single pixel has no spread: use zero variance rather than NaN from the unbiased estimate.
    var = flat.var(dim=2, unbiased=flat.shape[2] > 1) + eps
    return flat.mean(dim=2)[..., None, None], var.sqrt()[..., None, None]


class ChannelStatistics:
    """Per-channel mean and standard deviation of an image seen in pieces (float64 sums), as `_mean_std` gives for the
    whole: the first pass of the streaming AdaIN fix."""

    def __init__(self):
        self.count, self.total, self.squares = 0, 0.0, 0.0

    def update(self, piece: torch.Tensor) -> None:
        """Add a (B, C, h, w) piece of the image: row sums in its dtype (no copy of the piece), totals in float64."""
        self.count += piece.shape[-2] * piece.shape[-1]
        self.total = self.total + piece.sum(dim=-1).double().sum(dim=-1)
        self.squares = self.squares + torch.linalg.vector_norm(piece, dim=-1).double().square().sum(dim=-1)

    def mean_std(self, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        var = (self.squares - self.count * mean * mean).clamp(min=0) / max(self.count - 1, 1) + eps
        return mean.float()[..., None, None], var.sqrt().float()[..., None, None]


def adain_color_fix(
    image: torch.Tensor,
    reference: torch.Tensor,
    image_statistics: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Give `image` the per-channel mean and standard deviation of `reference` (any size, same batch and channels).

    `image_statistics` (mean, std) of the whole image lets a band of it be corrected alone (streaming).
    """
    image_mean, image_std = image_statistics if image_statistics is not None else _mean_std(image)
    reference_mean, reference_std = _mean_std(reference)
    return ((image - image_mean) / image_std * reference_std + reference_mean).clamp(0, 1)


def _wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    """3x3 binomial blur dilated by `radius` (one a-trous level), replicate-padded."""
    kernel = torch.tensor([1.0, 2.0, 1.0], dtype=image.dtype, device=image.device)
    kernel = torch.outer(kernel, kernel) / 16
    channels = image.shape[1]
    kernel = kernel.expand(channels, 1, 3, 3)
    padded = F.pad(image, (radius,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=radius)


WAVELET_LEVELS = 5
# How far a pixel of the wavelet fix sees: the dilations 1 + 2 + 4 + 8 + 16 of its blurs. A band of rows corrected
# with this many rows above and below it equals the same rows of the whole image corrected.
WAVELET_HALO = 2**WAVELET_LEVELS - 1


def _wavelet_split(image: torch.Tensor, levels: int = WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `image` into (high frequencies, low frequencies) with `levels` a-trous levels; high + low == image."""
    low = image
    for level in range(levels):
        low = _wavelet_blur(low, 2**level)
    return image - low, low


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """High frequencies of `image` plus low frequencies of `reference` (same size: the upscaled LR image)."""
    if image.shape != reference.shape:
        raise ValueError(
            f"Wavelet colour fix needs a reference of the image's shape, got {tuple(reference.shape)} for "
            f"{tuple(image.shape)}."
        )
    high, _ = _wavelet_split(image)
    _, low = _wavelet_split(reference)
    return (high + low).clamp(0, 1)


def apply_color_fix(
    image: torch.Tensor, low_res: torch.Tensor, upscaled: torch.Tensor, method: Optional[str]
) -> torch.Tensor:
    """Correct `image` with `method`: AdaIN against `low_res`, wavelet against `upscaled` (the bicubic x4 input)."""
    check_color_fix(method)
    if method == "adain":
        return adain_color_fix(image, low_res)
    if method == "wavelet":
        return wavelet_color_fix(image, upscaled)
    return image.clamp(0, 1)
