"""Real-ESRGAN's second-order degradation model, batched and device-agnostic in torch.

Real-world LR images are blurred, resized, noisy and compressed, often more than once. Real-ESRGAN (Wang et al.,
ICCV-W 2021) synthesises training pairs by applying blur -> resize -> noise -> JPEG twice to a (USM-sharpened) HR
image, then resizing to 1/scale with a final sinc filter and JPEG in random order. TinySR trains on such pairs and
the quality benchmark makes its test inputs the same way.

Every parameter lives in `DegradationConfig`, whose defaults are the published `train_realesrgan_x4plus.yml` values
(field names follow that file, so its values paste in). Every random draw comes from the `torch.Generator` passed to
`RealESRGANDegradation.__call__`: a seed gives the same LR images on every run. Choices that change the tensor shape
(resize scale and mode, the order of the final steps) are made once per batch as in Real-ESRGAN; everything else
(kernels, noise kind, level and colour, JPEG quality, whether the second blur happens) is drawn per image.
"""

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F


KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")
RESIZE_DIRECTIONS = ("up", "down", "keep")

# ITU-T T.81 Annex K quantisation tables (luminance, chrominance), quality 50.
_JPEG_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_JPEG_CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
)


@dataclass
class DegradationConfig:
    """All parameters of the second-order degradation. Defaults: Real-ESRGAN's `train_realesrgan_x4plus.yml`.

    Fields ending in `2` belong to the second degradation round. Ranges are `(low, high)` for uniform draws; noise
    levels are in 8-bit units (sigma 30 means 30/255); `*_prob` triples are for `RESIZE_DIRECTIONS` (up, down, keep).
    """

    scale: int = 4

    # Unsharp masking of the HR image before degrading it (Real-ESRGAN degrades the USM-sharpened ground truth).
    usm_sharpen: bool = True
    usm_kernel_size: int = 51
    usm_sigma: float = 8.0  # OpenCV's sigma for a 51-tap Gaussian, as in basicsr's USMSharp
    usm_weight: float = 0.5
    usm_threshold: float = 10.0

    # Blur kernels: side drawn from kernel_range, then padded to its maximum.
    kernel_range: tuple = (7, 9, 11, 13, 15, 17, 19, 21)
    rotation_range: tuple = (-math.pi, math.pi)
    sinc_cutoff_range: tuple = (math.pi / 3, math.pi)  # kernels under 13 px and the final sinc
    sinc_cutoff_range_large: tuple = (math.pi / 5, math.pi)  # kernels of 13 px and more

    kernel_list: tuple = KERNEL_TYPES
    kernel_prob: tuple = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple = (0.2, 3.0)
    betag_range: tuple = (0.5, 4.0)
    betap_range: tuple = (1.0, 2.0)

    # The second round's kernels: the first round's defaults (as in Real-ESRGAN) but for a narrower blur_sigma2.
    kernel_list2: tuple = kernel_list
    kernel_prob2: tuple = kernel_prob
    sinc_prob2: float = sinc_prob
    blur_sigma2: tuple = (0.2, 1.5)
    betag_range2: tuple = betag_range
    betap_range2: tuple = betap_range

    final_sinc_prob: float = 0.8

    # First degradation round.
    resize_prob: tuple = (0.2, 0.7, 0.1)
    resize_range: tuple = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple = (1.0, 30.0)
    poisson_scale_range: tuple = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple = (30.0, 95.0)

    # Second degradation round: milder resizing and noise; the noise kinds and JPEG qualities of the first.
    second_blur_prob: float = 0.8
    resize_prob2: tuple = (0.3, 0.4, 0.3)
    resize_range2: tuple = (0.3, 1.2)
    gaussian_noise_prob2: float = gaussian_noise_prob
    noise_range2: tuple = (1.0, 25.0)
    poisson_scale_range2: tuple = (0.05, 2.5)
    gray_noise_prob2: float = gray_noise_prob
    jpeg_range2: tuple = jpeg_range

    resize_modes: tuple = RESIZE_MODES
    # Probability that the last JPEG comes before [resize to 1/scale + sinc] rather than after (Real-ESRGAN: 0.5).
    jpeg_first_prob: float = 0.5

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))
        if not isinstance(self.scale, int) or self.scale < 1:
            raise ValueError(f"scale must be a positive integer, got {self.scale!r}.")
        if any(k % 2 == 0 or k < 1 for k in self.kernel_range) or not self.kernel_range:
            raise ValueError(f"kernel_range must hold odd positive sizes, got {self.kernel_range}.")
        if self.usm_kernel_size % 2 == 0:
            raise ValueError(f"usm_kernel_size must be odd, got {self.usm_kernel_size}.")
        for suffix in ("", "2"):
            kernel_list, kernel_prob = getattr(self, "kernel_list" + suffix), getattr(self, "kernel_prob" + suffix)
            unknown = set(kernel_list) - set(KERNEL_TYPES)
            if unknown:
                raise ValueError(f"kernel_list{suffix} has unknown types {sorted(unknown)}; known: {KERNEL_TYPES}.")
            if len(kernel_list) != len(kernel_prob):
                raise ValueError(f"kernel_list{suffix} and kernel_prob{suffix} must have the same length.")
            _check_distribution("kernel_prob" + suffix, kernel_prob)
            _check_distribution("resize_prob" + suffix, getattr(self, "resize_prob" + suffix), len(RESIZE_DIRECTIONS))
            for name in ("blur_sigma", "betag_range", "betap_range", "resize_range", "noise_range",
                         "poisson_scale_range", "jpeg_range"):
                _check_range(name + suffix, getattr(self, name + suffix))
            if getattr(self, "blur_sigma" + suffix)[0] <= 0:
                raise ValueError(f"blur_sigma{suffix} must be positive, got {getattr(self, 'blur_sigma' + suffix)}.")
        for name in ("rotation_range", "sinc_cutoff_range", "sinc_cutoff_range_large"):
            _check_range(name, getattr(self, name))
        for name in ("jpeg_range", "jpeg_range2"):
            low, high = getattr(self, name)
            if low < 1 or high > 100:
                raise ValueError(f"{name} must lie in [1, 100], got {(low, high)}.")
        unknown = set(self.resize_modes) - set(RESIZE_MODES)
        if unknown or not self.resize_modes:
            raise ValueError(f"resize_modes must be a non-empty subset of {RESIZE_MODES}, got {self.resize_modes}.")
        for name in ("sinc_prob", "sinc_prob2", "final_sinc_prob", "gaussian_noise_prob", "gaussian_noise_prob2",
                     "gray_noise_prob", "gray_noise_prob2", "second_blur_prob", "jpeg_first_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}.")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DegradationConfig":
        """Build from a mapping (e.g. a YAML section), rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown degradation parameters {unknown}; known: {sorted(known)}.")
        return cls(**values)

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def _check_distribution(name: str, probs: Sequence[float], length: Optional[int] = None):
    if length is not None and len(probs) != length:
        raise ValueError(f"{name} needs {length} probabilities, got {len(probs)}.")
    if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(f"{name} must be non-negative and sum to 1, got {probs}.")


def _check_range(name: str, value: Sequence[float]):
    if len(value) != 2 or value[0] > value[1]:
        raise ValueError(f"{name} must be a (low, high) pair with low <= high, got {value}.")


# --------------------------------------------------------------------------------------------------- kernels


def _kernel_grid(size: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Column (x) and row (y) offsets from the centre of a `size` x `size` kernel."""
    axis = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return x, y


def _quadratic_form(size: int, sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """d^T Sigma^-1 d on the kernel grid, Sigma = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T; (B, size, size)."""
    x, y = _kernel_grid(size, sigma_x.dtype, sigma_x.device)
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    inv_x, inv_y = sigma_x[:, None, None] ** -2, sigma_y[:, None, None] ** -2
    a = cos**2 * inv_x + sin**2 * inv_y
    b = cos * sin * (inv_x - inv_y)
    c = sin**2 * inv_x + cos**2 * inv_y
    return a * x**2 + 2 * b * x * y + c * y**2


def generalized_gaussian_kernel(
    size: int, sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """Normalised kernels exp(-0.5 * q^beta) for q = d^T Sigma^-1 d; beta = 1 is the plain Gaussian. (B, size, size)."""
    kernel = torch.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta) ** beta[:, None, None])
    return kernel / kernel.sum(dim=(-2, -1), keepdim=True)


def plateau_kernel(
    size: int, sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """Normalised plateau-shaped kernels 1 / (1 + q^beta) (flat top, heavy tails). (B, size, size)."""
    kernel = 1.0 / (1.0 + _quadratic_form(size, sigma_x, sigma_y, theta) ** beta[:, None, None])
    return kernel / kernel.sum(dim=(-2, -1), keepdim=True)


def sinc_kernel(size: int, cutoff: torch.Tensor) -> torch.Tensor:
    """Normalised circular low-pass (2-D sinc) kernels with cutoff frequency `cutoff` in radians. (B, size, size).

    They model the ringing and overshoot artifacts of real resizing and sharpening.
    """
    x, y = _kernel_grid(size, cutoff.dtype, cutoff.device)
    radius = torch.sqrt(x**2 + y**2)
    cutoff = cutoff[:, None, None]
    safe_radius = torch.where(radius > 0, radius, torch.ones_like(radius))
    kernel = cutoff * torch.special.bessel_j1(cutoff * safe_radius) / (2 * math.pi * safe_radius)
    kernel = torch.where(radius > 0, kernel, cutoff**2 / (4 * math.pi))
    return kernel / kernel.sum(dim=(-2, -1), keepdim=True)


def limit_support(kernels: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Zero each kernel outside its centred `sizes[i]` x `sizes[i]` window and renormalise.

    Equal to building the kernel at that size and zero-padding it to the common size, which batches kernels of
    different sizes.
    """
    x, y = _kernel_grid(kernels.shape[-1], kernels.dtype, kernels.device)
    half = (sizes.to(kernels.dtype)[:, None, None] - 1) / 2
    kernels = kernels * ((x.abs() <= half) & (y.abs() <= half))
    return kernels / kernels.sum(dim=(-2, -1), keepdim=True)


def _pad(img: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect padding like cv2.filter2D's default border; replicate where the image is too small to reflect."""
    mode = "reflect" if pad < min(img.shape[-2:]) else "replicate"
    return F.pad(img, (pad, pad, pad, pad), mode=mode)


def filter2d(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Filter each image of `img` (B, C, H, W) with its own odd-sized kernel (B, k, k) or one shared kernel (k, k)."""
    b, c, h, w = img.shape
    if kernel.ndim == 2:
        kernel = kernel.expand(b, -1, -1)
    size = kernel.shape[-1]
    if size % 2 == 0 or kernel.shape[0] != b:
        raise ValueError(f"Need one odd-sized kernel per image, got kernels {tuple(kernel.shape)} for {b} images.")
    padded = _pad(img, size // 2).reshape(1, b * c, h + size - 1, w + size - 1)
    weight = kernel.to(img.dtype).repeat_interleave(c, dim=0)[:, None]
    return F.conv2d(padded, weight, groups=b * c).reshape(b, c, h, w)


def usm_sharpen(
    img: torch.Tensor, weight: float = 0.5, threshold: float = 10.0, kernel_size: int = 51, sigma: float = 8.0
) -> torch.Tensor:
    """Unsharp masking: add `weight` x the high-pass residual where it exceeds `threshold`/255 (soft-masked).

    Real-ESRGAN degrades, and trains its pixel and perceptual losses against, the USM-sharpened ground truth.
    """
    axis = torch.arange(kernel_size, dtype=torch.float64, device=img.device) - (kernel_size - 1) / 2
    taps = torch.exp(-(axis**2) / (2 * sigma**2))
    taps = (taps / taps.sum()).to(img.dtype)
    pad = kernel_size // 2

    def blur(x: torch.Tensor) -> torch.Tensor:  # separable Gaussian: 2k instead of k^2 taps per pixel
        b, c, h, w = x.shape
        x = _pad(x, pad).reshape(b * c, 1, h + 2 * pad, w + 2 * pad)
        x = F.conv2d(F.conv2d(x, taps.view(1, 1, 1, -1)), taps.view(1, 1, -1, 1))
        return x.reshape(b, c, h, w)

    residual = img - blur(img)
    soft_mask = blur((residual.abs() * 255 > threshold).to(img.dtype))
    sharp = (img + weight * residual).clamp(0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img


# --------------------------------------------------------------------------------------------------- noise and JPEG


def _to_gray(img: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma, (B, 1, H, W)."""
    weights = img.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (img * weights).sum(dim=1, keepdim=True)


def _random_tensor(sample, shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """Draw with `sample` (torch.randn / torch.rand) on the generator's device, return it on `device`."""
    source = generator.device if generator is not None else device
    return sample(shape, generator=generator, device=source).to(device)


def gaussian_noise(
    img: torch.Tensor, sigma: torch.Tensor, gray: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Additive white Gaussian noise for a batch: std `sigma` (B,) in 8-bit units, one channel copied where `gray`."""
    b, c, h, w = img.shape
    std = (sigma.to(img) / 255).view(b, 1, 1, 1)
    noise = _random_tensor(torch.randn, (b, c, h, w), generator, img.device).to(img.dtype) * std
    if gray.any():
        gray_noise = _random_tensor(torch.randn, (b, 1, h, w), generator, img.device).to(img.dtype) * std
        noise = torch.where(gray.view(b, 1, 1, 1), gray_noise.expand(b, c, h, w), noise)
    return noise


def _shot_noise(img: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Poisson noise of an image quantised to 8 bits, photon count per level = the next power of two of its number of
    distinct 8-bit values (Real-ESRGAN's model)."""
    b = img.shape[0]
    levels = (img * 255).round().clamp(0, 255)
    counts = torch.zeros(b, 256, device=img.device).scatter_add_(
        1, levels.flatten(1).long(), torch.ones_like(levels.flatten(1))
    )
    distinct = (counts > 0).sum(dim=1).to(img.dtype)
    photons = (2 ** torch.ceil(torch.log2(distinct))).view(b, 1, 1, 1)
    quantised = levels / 255
    rates = quantised * photons
    source = generator.device if generator is not None else img.device
    counts = torch.poisson(rates.to(source), generator=generator).to(img.device)
    return counts / photons - quantised


def poisson_noise(
    img: torch.Tensor, scale: torch.Tensor, gray: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Shot noise for a batch in [0, 1], multiplied by `scale` (B,); drawn on the luma and copied where `gray`."""
    b, c, h, w = img.shape
    noise = _shot_noise(img, generator)
    if gray.any():
        gray_noise = _shot_noise(_to_gray(img), generator)
        noise = torch.where(gray.view(b, 1, 1, 1), gray_noise.expand(b, c, h, w), noise)
    return noise * scale.to(img).view(b, 1, 1, 1)


def _dct_matrix(dtype: torch.dtype, device) -> torch.Tensor:
    """Orthonormal 8-point DCT-II matrix D (rows: frequencies); the JPEG 2-D DCT of a block X is D X D^T."""
    freq = torch.arange(8, dtype=torch.float64, device=device)[:, None]
    pos = torch.arange(8, dtype=torch.float64, device=device)[None, :]
    matrix = torch.cos((2 * pos + 1) * freq * math.pi / 16) * math.sqrt(2 / 8)
    matrix[0] /= math.sqrt(2)
    return matrix.to(dtype)


def jpeg_quantization_tables(quality: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """libjpeg's quality scaling of the standard tables: (B, 2, 8, 8) luma and chroma tables for qualities (B,)."""
    quality = quality.to(torch.float64).clamp(1, 100)[:, None, None, None]
    base = torch.tensor([_JPEG_LUMA_TABLE, _JPEG_CHROMA_TABLE], dtype=torch.float64, device=quality.device)
    scale = torch.where(quality < 50, 5000 / quality, 200 - 2 * quality)
    return torch.floor((base * scale + 50) / 100).clamp(1, 255).to(dtype)


def jpeg_compress(img: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Baseline JPEG round trip (YCbCr, 4:2:0 chroma, 8x8 DCT, quantisation at `quality` (B,) in [1, 100]).

    Rounding uses a straight-through estimator: the values are those of real JPEG and gradients pass unchanged.
    """
    b, _, h, w = img.shape
    pad_h, pad_w = -h % 16, -w % 16
    x = F.pad(img * 255, (0, pad_w, 0, pad_h), mode="replicate")
    r, g, bl = x.unbind(dim=1)
    y = 0.299 * r + 0.587 * g + 0.114 * bl
    cb = -0.168736 * r - 0.331264 * g + 0.5 * bl + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * bl + 128
    chroma = F.avg_pool2d(torch.stack([cb, cr], dim=1), 2)
    tables = jpeg_quantization_tables(quality, img.dtype).to(img.device)
    dct = _dct_matrix(img.dtype, img.device)

    def code(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:  # (B, C, H, W), table (B, 8, 8)
        n, c, ph, pw = plane.shape
        blocks = (plane - 128).reshape(n, c, ph // 8, 8, pw // 8, 8).transpose(3, 4)
        coefficients = dct @ blocks @ dct.T
        scaled = coefficients / table[:, None, None, None]
        quantised = scaled + (scaled.round() - scaled).detach()
        blocks = dct.T @ (quantised * table[:, None, None, None]) @ dct
        return blocks.transpose(3, 4).reshape(n, c, ph, pw) + 128

    y = code(y[:, None], tables[:, 0])[:, 0]
    cb, cr = code(chroma, tables[:, 1]).repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1).unbind(dim=1)
    rgb = torch.stack(
        [y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)], dim=1
    )
    return (rgb[..., :h, :w] / 255).clamp(0, 1)


# --------------------------------------------------------------------------------------------------- the model


class RealESRGANDegradation:
    """Real-ESRGAN's second-order degradation: HR (B, 3, H, W) in [0, 1] -> LR (B, 3, H/scale, W/scale).

    ```py
    degrade = RealESRGANDegradation()  # or RealESRGANDegradation(DegradationConfig(noise_range=(1, 10)))
    lr = degrade(hr, generator=torch.Generator().manual_seed(0))
    ```

    Runs on the device of `hr`. Random values are drawn on the generator's device: a CPU generator gives the same
    draws for CPU and CUDA inputs (results then differ only by float rounding); a generator on the input's device
    avoids host-device copies. The LR output is quantised to 8 bits like a saved image.
    """

    def __init__(self, config: Optional[DegradationConfig] = None, **overrides):
        if config is not None and overrides:
            raise ValueError("Pass either a DegradationConfig or keyword overrides, not both.")
        self.config = config if config is not None else DegradationConfig.from_dict(overrides)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def __call__(self, hr: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        cfg = self.config
        self._check_input(hr)
        dtype = hr.dtype
        hr = hr.float()
        batch, _, height, width = hr.shape
        rng = _Sampler(generator, hr.device)
        kernel1, kernel2, final_kernel = self.sample_kernels(batch, generator, hr.device)

        out = hr
        if cfg.usm_sharpen:
            out = usm_sharpen(hr, cfg.usm_weight, cfg.usm_threshold, cfg.usm_kernel_size, cfg.usm_sigma)

        # First round: blur, resize, noise, JPEG.
        out = filter2d(out, kernel1)
        factor = self._resize_factor(rng, cfg.resize_prob, cfg.resize_range)
        out = self._resize(out, (int(height * factor), int(width * factor)), rng)
        out = self._add_noise(out, rng, cfg.gaussian_noise_prob, cfg.noise_range, cfg.poisson_scale_range,
                              cfg.gray_noise_prob)
        out = jpeg_compress(out.clamp(0, 1), rng.uniform(batch, *cfg.jpeg_range))

        # Second round: blur (per image with probability second_blur_prob), resize around the target size, noise.
        out = filter2d(out, kernel2)
        factor = self._resize_factor(rng, cfg.resize_prob2, cfg.resize_range2)
        out = self._resize(out, (int(height / cfg.scale * factor), int(width / cfg.scale * factor)), rng)
        out = self._add_noise(out, rng, cfg.gaussian_noise_prob2, cfg.noise_range2, cfg.poisson_scale_range2,
                              cfg.gray_noise_prob2)

        # [resize to the target size + final sinc] and JPEG, in random order.
        target = (height // cfg.scale, width // cfg.scale)
        quality = rng.uniform(batch, *cfg.jpeg_range2)
        if rng.uniform(1).item() < cfg.jpeg_first_prob:
            out = jpeg_compress(out.clamp(0, 1), quality)
            out = filter2d(self._resize(out, target, rng), final_kernel)
        else:
            out = filter2d(self._resize(out, target, rng), final_kernel)
            out = jpeg_compress(out.clamp(0, 1), quality)
        return ((out * 255).round().clamp(0, 255) / 255).to(dtype)

    def sample_kernels(
        self, batch_size: int, generator: Optional[torch.Generator] = None, device=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image kernels (B, K, K) for the first blur, the second blur (identity where skipped) and the final sinc
        (identity with probability 1 - final_sinc_prob); K = max(kernel_range). Float32 on `device`."""
        cfg = self.config
        device = torch.device(device) if device is not None else torch.device("cpu")
        rng = _Sampler(generator, device)
        kernel1 = self._blur_kernels(
            batch_size, rng, kernel_list=cfg.kernel_list, kernel_prob=cfg.kernel_prob, sinc_prob=cfg.sinc_prob,
            blur_sigma=cfg.blur_sigma, betag=cfg.betag_range, betap=cfg.betap_range,
        )  # fmt: skip
        kernel2 = self._blur_kernels(
            batch_size, rng, kernel_list=cfg.kernel_list2, kernel_prob=cfg.kernel_prob2, sinc_prob=cfg.sinc_prob2,
            blur_sigma=cfg.blur_sigma2, betag=cfg.betag_range2, betap=cfg.betap_range2,
        )  # fmt: skip
        identity = torch.zeros_like(kernel1)
        identity[:, identity.shape[-1] // 2, identity.shape[-1] // 2] = 1
        kernel2 = torch.where((rng.uniform(batch_size) < cfg.second_blur_prob).view(-1, 1, 1), kernel2, identity)
        sizes = rng.choice(batch_size, cfg.kernel_range)
        cutoff = rng.uniform(batch_size, *cfg.sinc_cutoff_range, dtype=torch.float64)
        final = limit_support(sinc_kernel(max(cfg.kernel_range), cutoff), sizes)
        final = torch.where((rng.uniform(batch_size) < cfg.final_sinc_prob).view(-1, 1, 1), final, identity)
        return kernel1.float(), kernel2.float(), final.float()

    def _blur_kernels(
        self, batch: int, rng: "_Sampler", *, kernel_list, kernel_prob, sinc_prob, blur_sigma, betag, betap
    ) -> torch.Tensor:
        """Random kernels of one round (float64): sinc with probability sinc_prob, else a mixture of Gaussian types."""
        cfg = self.config
        size = max(cfg.kernel_range)
        sizes = rng.choice(batch, cfg.kernel_range)
        kinds = [kernel_list[i] for i in rng.categorical(batch, kernel_prob).tolist()]
        isotropic = torch.tensor([not kind.endswith("aniso") for kind in kinds], device=rng.device)
        plateau = torch.tensor([kind.startswith("plateau") for kind in kinds], device=rng.device)
        generalized = torch.tensor([kind.startswith("generalized") for kind in kinds], device=rng.device)

        sigma_x = rng.uniform(batch, *blur_sigma, dtype=torch.float64)
        sigma_y = torch.where(isotropic, sigma_x, rng.uniform(batch, *blur_sigma, dtype=torch.float64))
        theta = torch.where(isotropic, 0.0, rng.uniform(batch, *cfg.rotation_range, dtype=torch.float64))
        # Shape parameter: below or above 1 with equal chance (Real-ESRGAN), 1 for the plain Gaussians.
        below = rng.uniform(batch) < 0.5
        beta_g = torch.where(below, rng.uniform(batch, betag[0], 1.0, dtype=torch.float64),
                             rng.uniform(batch, 1.0, betag[1], dtype=torch.float64))
        beta_p = torch.where(below, rng.uniform(batch, betap[0], 1.0, dtype=torch.float64),
                             rng.uniform(batch, 1.0, betap[1], dtype=torch.float64))
        beta = torch.where(generalized, beta_g, torch.where(plateau, beta_p, torch.ones_like(beta_g)))
        kernels = torch.where(
            plateau.view(-1, 1, 1),
            plateau_kernel(size, sigma_x, sigma_y, theta, beta),
            generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, beta),
        )

        # Sinc kernels: wider cutoff range for large kernels, as in Real-ESRGAN.
        low = torch.where(sizes < 13, cfg.sinc_cutoff_range[0], cfg.sinc_cutoff_range_large[0])
        high = torch.where(sizes < 13, cfg.sinc_cutoff_range[1], cfg.sinc_cutoff_range_large[1])
        cutoff = low + (high - low) * rng.uniform(batch, dtype=torch.float64)
        use_sinc = rng.uniform(batch) < sinc_prob
        kernels = torch.where(use_sinc.view(-1, 1, 1), sinc_kernel(size, cutoff), kernels)
        return limit_support(kernels, sizes)

    def _resize_factor(self, rng: "_Sampler", probs: Sequence[float], factor_range: Sequence[float]) -> float:
        direction = RESIZE_DIRECTIONS[rng.categorical(1, probs).item()]
        if direction == "up":
            return rng.uniform(1, 1.0, factor_range[1]).item()
        if direction == "down":
            return rng.uniform(1, factor_range[0], 1.0).item()
        return 1.0

    def _resize(self, img: torch.Tensor, size: tuple[int, int], rng: "_Sampler") -> torch.Tensor:
        mode = self.config.resize_modes[rng.categorical(1, [1.0] * len(self.config.resize_modes)).item()]
        size = (max(size[0], 1), max(size[1], 1))
        return F.interpolate(img, size=size, mode=mode)

    def _add_noise(self, img, rng: "_Sampler", gaussian_prob, sigma_range, poisson_range, gray_prob) -> torch.Tensor:
        """Gaussian (with probability `gaussian_prob`) or Poisson noise per image, grey with `gray_prob`; clipped."""
        batch = img.shape[0]
        use_gaussian = (rng.uniform(batch) < gaussian_prob).view(-1, 1, 1, 1)
        gray = rng.uniform(batch) < gray_prob
        noise = torch.zeros_like(img)
        if use_gaussian.any():
            noise = gaussian_noise(img, rng.uniform(batch, *sigma_range), gray, rng.generator)
        if not use_gaussian.all():
            shot = poisson_noise(img, rng.uniform(batch, *poisson_range), gray, rng.generator)
            noise = torch.where(use_gaussian, noise, shot)
        return (img + noise).clamp(0, 1)

    def _check_input(self, hr: torch.Tensor):
        if not isinstance(hr, torch.Tensor) or hr.ndim != 4 or hr.shape[1] != 3:
            shape = tuple(hr.shape) if isinstance(hr, torch.Tensor) else type(hr).__name__
            raise ValueError(f"Expected HR images as a (B, 3, H, W) tensor, got {shape}.")
        if not hr.is_floating_point():
            raise ValueError(f"Expected floating-point HR images in [0, 1], got dtype {hr.dtype}.")
        height, width = hr.shape[-2:]
        if height % self.config.scale or width % self.config.scale:
            raise ValueError(f"HR size {height}x{width} is not a multiple of the scale {self.config.scale}; crop it.")
        if hr.numel() and (hr.min() < -1e-3 or hr.max() > 1 + 1e-3):
            raise ValueError(f"HR values must lie in [0, 1], got [{hr.min().item():.3f}, {hr.max().item():.3f}].")


class _Sampler:
    """Uniform and categorical draws from one generator (or the global RNG), returned on `device`."""

    def __init__(self, generator: Optional[torch.Generator], device):
        self.generator = generator
        self.device = torch.device(device)

    def uniform(self, n: int, low: float = 0.0, high: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        unit = _random_tensor(torch.rand, (n,), self.generator, self.device).to(dtype)
        return low + (high - low) * unit

    def categorical(self, n: int, probs: Sequence[float]) -> torch.Tensor:
        """Indices drawn with the given probabilities, by inverse CDF of uniform draws."""
        cdf = torch.tensor(probs, dtype=torch.float64, device=self.device).cumsum(0)
        cdf = cdf / cdf[-1]
        index = torch.searchsorted(cdf, self.uniform(n, dtype=torch.float64), right=True)
        return index.clamp(max=len(probs) - 1)

    def choice(self, n: int, values: Sequence[int]) -> torch.Tensor:
        return torch.tensor(values, device=self.device)[self.categorical(n, [1.0] * len(values))]
