"""Three levels of degradation that real photos meet, for training mixtures and for benchmarks.

- `clean`: bicubic 4x downscaling (antialiased, as PIL's `Image.resize(..., BICUBIC)`), nothing else.
- `mild`: Gaussian blur, bicubic 4x downscaling, Gaussian noise (8-bit units), JPEG. The benchmark's fixed setting
  (`MILD_BENCHMARK`: blur sigma 1.2, noise sigma 4, quality 75) is what a phone photo shared once looks like.
- `realesrgan`: Real-ESRGAN's second-order degradation (`RealESRGANDegradation`, the published ranges by default).

A model trained on only the last smooths every input (it learns that every LR is heavily damaged); one trained on the
mixture keeps the detail of clean inputs. JPEG is real JPEG (PIL, 4:2:0), as in the files users upscale.
"""

import io
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .degradations import DegradationConfig, RealESRGANDegradation, filter2d


LEVELS = ("clean", "mild", "realesrgan")


@dataclass(frozen=True)
class MildConfig:
    """Ranges `(low, high)` drawn uniformly per image; equal ends give a fixed setting."""

    blur_sigma: tuple = (1.2, 1.2)
    noise_sigma: tuple = (4.0, 4.0)
    jpeg_quality: tuple = (75, 75)


MILD_BENCHMARK = MildConfig()
MILD_TRAINING = MildConfig(blur_sigma=(0.3, 2.0), noise_sigma=(0.0, 8.0), jpeg_quality=(60, 95))


def bicubic_downscale(hr: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, H/scale, W/scale), antialiased bicubic."""
    return F.interpolate(hr, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(x[:, None] ** 2 + x[None] ** 2) / (2 * sigma**2))
    return (kernel / kernel.sum()).float()


def jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """(3, H, W) in [0, 1] through a real JPEG file at `quality` (8-bit, 4:2:0)."""
    pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality))
    decoded = np.asarray(PIL.Image.open(buffer).convert("RGB"))
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1).float() / 255


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64))


def mild_degradation(hr: torch.Tensor, config: MildConfig, generator: torch.Generator, scale: int = 4) -> torch.Tensor:
    """HR (B, 3, H, W) in [0, 1] -> LR quantised to 8 bits: blur, bicubic down, noise, JPEG, drawn per image."""
    images = []
    for image in hr:
        sigma = _uniform(generator, *config.blur_sigma)
        noise = _uniform(generator, *config.noise_sigma)
        quality = round(_uniform(generator, *config.jpeg_quality))
        lr = bicubic_downscale(filter2d(image[None].float(), gaussian_kernel(sigma)), scale)[0]
        lr = lr + torch.randn(lr.shape, generator=generator) * (noise / 255)
        images.append(jpeg(lr, quality))
    return torch.stack(images)


def degrade(
    hr: torch.Tensor,
    level: str,
    generator: torch.Generator,
    *,
    mild: MildConfig = MILD_BENCHMARK,
    realesrgan: Optional[DegradationConfig] = None,
    scale: int = 4,
) -> torch.Tensor:
    """HR (B, 3, H, W) in [0, 1] on the CPU -> 8-bit LR (B, 3, H/scale, W/scale) at one of `LEVELS`."""
    if level == "clean":
        return (bicubic_downscale(hr.float(), scale) * 255).round() / 255
    if level == "mild":
        return mild_degradation(hr, mild, generator, scale)
    if level == "realesrgan":
        return RealESRGANDegradation(realesrgan or DegradationConfig(scale=scale))(hr.float(), generator=generator)
    raise ValueError(f"Unknown degradation level {level!r}; known: {LEVELS}.")
