"""Colour correction of super-resolved images against their low-resolution input.

One-step diffusion SR keeps structure but can drift in colour; TinySR and TSD-SR correct the output against the LR
image afterwards. Two methods, as in their releases (after StableSR):

- `"adain"`: match each channel's mean and standard deviation to the LR image's (global statistics, so the LR image
  can be used at its own size).
- `"wavelet"`: keep the output's high frequencies and take the low frequencies (a 5-level a-trous wavelet
  decomposition) from the bicubically upscaled LR image.

Images are (B, C, H, W) tensors in [0, 1]; results are clamped to [0, 1]. `apply_color_fix` corrects a whole image,
`color_fixed_bands` the same image handed over in bands of rows (the pipelines' streamed output), with equal results.
"""

import itertools
from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F

from .image_processing import bicubic_crop
from .tiling import BAND_ROWS


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
    image: torch.Tensor,
    low_res: torch.Tensor,
    method: Optional[str],
    *,
    upscaled: Optional[torch.Tensor] = None,
    statistics: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Correct `image` with `method`: AdaIN against `low_res` (with the whole image's `statistics` when `image` is a
    band of it), the wavelet fix against `upscaled` (the bicubic upscale of `low_res` at `image`'s place)."""
    check_color_fix(method)
    if method == "adain":
        return adain_color_fix(image, low_res, statistics)
    if method == "wavelet":
        return wavelet_color_fix(image, upscaled)
    return image.clamp(0, 1)


Bands = Iterable[tuple[int, torch.Tensor]]


def color_fixed_bands(
    bands: Bands, method: Optional[str], low_res: torch.Tensor, scale: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """`apply_color_fix` of an image given in bands: (first row, rows (B, 3, n, W) in [0, 1]) top to bottom, covering
    the `scale` times upscale of `low_res`; yields the fixed image in bands, each equal to the same rows of the whole
    image fixed.

    The wavelet fix sees `WAVELET_HALO` rows on each side of a band (the reach of its blurs); AdaIN needs the whole
    image's statistics first (`_two_passes`); no fix clamps. Only a band and its halo are held.
    """
    height, width = low_res.shape[-2] * scale, low_res.shape[-1] * scale
    statistics = None
    if method == "adain":
        bands, statistics = _two_passes(bands, height)
    halo = WAVELET_HALO if method == "wavelet" else 0
    window, window_top, done = None, 0, 0  # rows from `window_top` on: later bands may still need them
    for top, piece in bands:
        window = piece if window is None else torch.cat([window, piece], dim=-2)
        end = top + piece.shape[-2]
        ready = height if end >= height else end - halo  # rows above `ready` have all their context
        if ready <= done:
            continue
        first, last = max(0, done - halo), min(height, ready + halo)
        context = window[..., first - window_top : last - window_top, :]
        upscaled = bicubic_crop(low_res, scale, first, last, 0, width) if method == "wavelet" else None
        fixed = apply_color_fix(context, low_res, method, upscaled=upscaled, statistics=statistics)
        yield done, fixed[..., done - first : ready - first, :]
        done, keep = ready, max(0, ready - halo)
        window, window_top = window[..., keep - window_top :, :], keep


def _two_passes(bands: Bands, height: int) -> tuple[Bands, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """AdaIN's statistics of an image given in bands, and its bands again for the fix.

    An image in one band is its own statistics (None: `adain_color_fix` takes them from the band). Otherwise the first
    pass keeps the image as uint16 on the CPU (a 16-bit output loses nothing; the sums see the floats) while the
    statistics are summed, and the second reads it back in bands: one allocation, committed as it is written.
    """
    bands = iter(bands)
    top, rows = next(bands)
    if rows.shape[-2] == height:
        return [(top, rows)], None
    device = rows.device
    kept = torch.empty(*rows.shape[:-2], height, rows.shape[-1], dtype=torch.uint16)
    sums = ChannelStatistics()
    for top, rows in itertools.chain([(top, rows)], bands):
        sums.update(rows)
        kept[..., top : top + rows.shape[-2], :] = rows.mul_(65535).round_().to(torch.uint16).cpu()
    read_back = (
        (top, kept[..., top : top + BAND_ROWS, :].to(device).float() / 65535) for top in range(0, height, BAND_ROWS)
    )
    return read_back, sums.mean_std()
