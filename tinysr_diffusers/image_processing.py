"""Image conversion for the super-resolution pipelines: inputs of any kind to tensors, tensors to outputs.

Inputs are PIL images, numpy arrays or torch tensors (or a list of them), greyscale, RGB or RGBA, of any size. The
model sees RGB in [0, 1]; the output keeps the input's channel layout (greyscale stays greyscale, the alpha channel of
RGBA is upscaled bicubically and re-attached), so a caller gets back the kind of image it gave. Empty images, NaN and
values outside an input's range are refused with a ValueError rather than turned into a black output.

A call's images are upscaled in groups of one size (`group_by_size`); a group's output arrives in bands of rows and
is written band by band (`images_from_bands`), then resampled to `outscale` (`resample`) and converted (`postprocess`).
"""

import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F


PipelineImageInput = Union[
    PIL.Image.Image, np.ndarray, torch.Tensor, Sequence[Union[PIL.Image.Image, np.ndarray, torch.Tensor]]
]
OUTPUT_TYPES = ("pil", "np", "uint16", "pt", "latent")
_CHANNELS = (1, 2, 3, 4)  # greyscale, greyscale + alpha, RGB, RGBA
# ITU-R 601-2 luma, as PIL's RGB -> L conversion.
_LUMA = (0.299, 0.587, 0.114)
# PIL's 32-bit greyscale modes carry no range of their own: the narrowest usual one that holds the values is taken
# (F: [0, 1] like float arrays, or 0-255 as PIL's own conversions assume; I: 8 or 16 bits), so neither is near-black.
_WIDE_MODE_SCALES = {"F": (1.0, 255.0), "I": (255.0, 65535.0)}


def _pil_to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    if 0 in image.size:
        raise ValueError(f"Empty image of size {image.size}.")
    if image.mode.startswith("I;16"):  # 16-bit greyscale
        array = np.asarray(image, dtype=np.float32) / 65535.0
    elif image.mode in _WIDE_MODE_SCALES:
        array = np.asarray(image, dtype=np.float32)
        array = array / _wide_mode_scale(float(array.min()), float(array.max()), image.mode)
    else:
        has_alpha = image.mode in ("RGBA", "LA", "La", "PA") or "transparency" in image.info
        if has_alpha and image.mode in ("L", "LA", "La"):  # greyscale stays greyscale: no tint from the RGB model
            image = image.convert("LA")
        elif has_alpha:
            image = image.convert("RGBA")
        elif image.mode in ("1", "L"):
            image = image.convert("L")
        else:
            image = image.convert("RGB")
        array = np.asarray(image, dtype=np.float32) / 255.0
    return _hwc_to_tensor(np.clip(array, 0.0, 1.0))


def _hwc_to_tensor(array: np.ndarray) -> torch.Tensor:
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float()


def _wide_mode_scale(low: float, high: float, mode: str) -> float:
    if math.isnan(low) or math.isnan(high):
        raise ValueError(f"PIL mode {mode} images must not contain NaN.")
    for scale in _WIDE_MODE_SCALES[mode]:
        if low >= -1e-3 * scale and high <= (1 + 1e-3) * scale:
            return scale
    raise ValueError(
        f"PIL mode {mode} images must have values in [0, {scale:g}], got values in [{low:.3g}, {high:.3g}]."
    )


def _numpy_to_tensors(array: np.ndarray) -> list[torch.Tensor]:
    if array.size == 0:  # before the range check: the min of nothing is an error
        raise ValueError(f"Empty image of shape {array.shape}.")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    elif np.issubdtype(array.dtype, np.floating):
        _check_unit_range(float(array.min()), float(array.max()), "numpy")
        array = array.astype(np.float32)
    else:
        raise ValueError(f"numpy images must be uint8, uint16 or float in [0, 1], got dtype {array.dtype}.")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in _CHANNELS):
        return [_hwc_to_tensor(array)]
    if array.ndim == 4 and array.shape[-1] in _CHANNELS:
        return [_hwc_to_tensor(item) for item in array]
    raise ValueError(
        f"numpy images must be (H, W), (H, W, C) or (B, H, W, C) with C in {_CHANNELS}, got shape {array.shape}."
    )


def _torch_to_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    if tensor.numel() == 0:
        raise ValueError(f"Empty image of shape {tuple(tensor.shape)}.")
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255.0
    elif tensor.is_floating_point():
        tensor = tensor.detach().float()
        _check_unit_range(tensor.min().item(), tensor.max().item(), "torch")
    else:
        raise ValueError(f"torch images must be uint8 or float in [0, 1], got dtype {tensor.dtype}.")
    if tensor.ndim == 3 and tensor.shape[0] in _CHANNELS:
        return [tensor.cpu()]
    if tensor.ndim == 4 and tensor.shape[1] in _CHANNELS:
        return [item.cpu() for item in tensor]
    raise ValueError(
        f"torch images must be (C, H, W) or (B, C, H, W) with C in {_CHANNELS}, got shape {tuple(tensor.shape)}."
    )


def _check_unit_range(low: float, high: float, kind: str) -> None:
    if math.isnan(low) or math.isnan(high):  # min and max propagate NaN; one NaN pixel would blacken the output
        raise ValueError(f"Floating-point {kind} images must not contain NaN.")
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(f"Floating-point {kind} images must be in [0, 1], got values in [{low:.3g}, {high:.3g}].")


def to_tensors(image: PipelineImageInput) -> list[torch.Tensor]:
    """Any supported input (or list of them) -> list of (C, H, W) float32 tensors in [0, 1], C in {1, 3, 4}, on CPU."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError("No image given.")
    tensors = []
    for item in items:
        if isinstance(item, PIL.Image.Image):
            tensors.append(_pil_to_tensor(item))
        elif isinstance(item, np.ndarray):
            tensors.extend(_numpy_to_tensors(item))
        elif isinstance(item, torch.Tensor):
            tensors.extend(_torch_to_tensors(item))
        else:
            raise TypeError(
                "Images must be PIL images, numpy arrays or torch tensors (or a list of them), "
                f"got {type(item).__name__}."
            )
    return [tensor.clamp(0, 1) for tensor in tensors]


def split_alpha(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(C, H, W) -> (RGB (3, H, W), alpha (1, H, W) or None); greyscale is replicated to three channels."""
    if image.shape[0] == 4:
        return image[:3], image[3:]
    if image.shape[0] == 2:
        return image[:1].expand(3, -1, -1), image[1:]
    if image.shape[0] == 1:
        return image.expand(3, -1, -1), None
    return image, None


def merge_channels(rgb: torch.Tensor, alpha: torch.Tensor | None, channels: int) -> torch.Tensor:
    """Inverse of `split_alpha` on an output: back to `channels` (1: luma, 2: luma + `alpha`, 3: RGB, 4: RGB +
    `alpha`)."""
    if channels in (1, 2):
        luma = torch.tensor(_LUMA, dtype=rgb.dtype, device=rgb.device)
        grey = (rgb * luma[:, None, None]).sum(0, keepdim=True)
        return grey if channels == 1 else torch.cat([grey, alpha.to(rgb)])
    if channels == 4:
        return torch.cat([rgb, alpha.to(rgb)])
    return rgb


@dataclass
class ImageGroup:
    """Same-size images of one call: their places in its list of images, their RGB batch, and what restores their
    channel layout (`merge_channels`)."""

    indices: list[int]
    rgb: torch.Tensor  # (B, 3, h, w) in [0, 1]
    alphas: list[Optional[torch.Tensor]]  # (1, h, w) each, or None
    channels: list[int]  # 1, 2, 3 or 4 each (`_CHANNELS`)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.rgb.shape[-2:])


def group_by_size(images: list[torch.Tensor]) -> list[ImageGroup]:
    """`to_tensors`' images in groups of one size (in the order of their first image), split by `split_alpha`."""
    places: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        places.setdefault(tuple(image.shape[-2:]), []).append(index)
    groups = []
    for indices in places.values():
        rgb, alphas = zip(*(split_alpha(images[index]) for index in indices))
        channels = [images[index].shape[0] for index in indices]
        groups.append(ImageGroup(indices, torch.stack(rgb), list(alphas), channels))
    return groups


def bicubic_upscale(image: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic x`scale` of (B, C, H, W) in [0, 1] (torch, as the TinySR/TSD-SR releases), clamped to [0, 1]."""
    return F.interpolate(image, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)


def reflect_pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad (B, C, H, W) at the bottom and right by reflection so both sides are multiples of `multiple`.

    Reflection pads at most `size - 1` at a time, so tiny images are reflected repeatedly until they are large enough.
    """
    height, width = image.shape[-2:]
    target_h, target_w = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    while image.shape[-2] < target_h or image.shape[-1] < target_w:
        pad_h = min(target_h - image.shape[-2], image.shape[-2] - 1)
        pad_w = min(target_w - image.shape[-1], image.shape[-1] - 1)
        if pad_h == 0 and pad_w == 0:  # a 1-pixel side cannot reflect: repeat it instead
            return F.pad(image, (0, target_w - image.shape[-1], 0, target_h - image.shape[-2]), mode="replicate")
        image = F.pad(image, (0, pad_w, 0, pad_h), mode="reflect")
    return image


def bicubic_crop(image: torch.Tensor, scale: int, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Rows [top, bottom) and columns [left, right) of `bicubic_upscale(image, scale)`, computed from the crop of
    `image` they depend on (the 4-tap kernel reaches 2 input pixels beyond), so equal to the crop of the full upscale
    without making it."""
    height, width = image.shape[-2:]
    low_top, low_bottom = max(0, top // scale - 2), min(height, (bottom - 1) // scale + 3)
    low_left, low_right = max(0, left // scale - 2), min(width, (right - 1) // scale + 3)
    upscaled = bicubic_upscale(image[..., low_top:low_bottom, low_left:low_right], scale)
    rows = slice(top - scale * low_top, bottom - scale * low_top)
    return upscaled[..., rows, left - scale * low_left : right - scale * low_left]


def padded_index(length: int, multiple: int) -> torch.Tensor:
    """For each position of a side of `length` padded by `reflect_pad_to_multiple`, the position it copies."""
    index = torch.arange(length, dtype=torch.float64).view(1, 1, length, 1)
    return reflect_pad_to_multiple(index, multiple)[0, 0, :, 0].long()


class UpscaledPixels:
    """The model's input, `reflect_pad_to_multiple(bicubic_upscale(low_res), multiple) * 2 - 1`, made crop by crop.

    It has the `shape`, `device`, `dtype` and `[..., rows, cols]` crops that `tiled_map` uses, so VAE tiles are
    encoded from the low-resolution image without the full-resolution float image ever existing.
    """

    def __init__(self, low_res: torch.Tensor, scale: int, multiple: int, dtype: torch.dtype):
        self.low_res, self.scale, self.dtype, self.device = low_res, scale, dtype, low_res.device
        height, width = low_res.shape[-2] * scale, low_res.shape[-1] * scale
        self.rows, self.cols = padded_index(height, multiple), padded_index(width, multiple)
        self.shape = (*low_res.shape[:-2], len(self.rows), len(self.cols))

    def __getitem__(self, key: tuple) -> torch.Tensor:
        _, row_slice, col_slice = key  # (..., rows, cols), as tiled_map crops
        rows, cols = self.rows[row_slice], self.cols[col_slice]
        top, left = int(rows.min()), int(cols.min())
        crop = bicubic_crop(self.low_res, self.scale, top, int(rows.max()) + 1, left, int(cols.max()) + 1)
        crop = crop.index_select(-2, (rows - top).to(self.device)).index_select(-1, (cols - left).to(self.device))
        return (crop * 2 - 1).to(self.dtype)


def check_outscale(outscale: Union[float, None]) -> None:
    """Raise a clear error unless `outscale` is None (the model's own 4x) or a finite number > 0."""
    if outscale is None:
        return
    if isinstance(outscale, bool) or not isinstance(outscale, (int, float)) or not math.isfinite(outscale):
        raise ValueError(f"`outscale` must be a finite number > 0 or None, got {outscale!r}.")
    if outscale <= 0:
        raise ValueError(f"`outscale` must be > 0, got {outscale!r}.")


def outscale_size(height: int, width: int, outscale: float) -> tuple[int, int]:
    """(height, width) of an output at `outscale` times an input of `height` x `width`: Python's round (halves to
    even), at least 1 pixel, as Real-ESRGAN's `--outscale`."""
    return max(1, round(outscale * height)), max(1, round(outscale * width))


def lanczos_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resample (C, H, W) in [0, 1] to `height` x `width` with PIL's Lanczos filter, channel by channel in float32.

    Float PIL images keep the precision of the model's output (16-bit outputs, numpy and torch outputs). Lanczos
    overshoots at edges, so each pass (horizontal, then vertical) is clamped to [0, 1], as PIL's 8-bit resampling
    clips between its passes: a PIL output equals PIL's own Lanczos of the 4x PIL output within one level.
    """
    if tuple(image.shape[-2:]) == (height, width):
        return image
    resized = []
    for channel in image.detach().float().cpu().numpy():
        for size in ((width, channel.shape[0]), (width, height)):
            channel = PIL.Image.fromarray(channel).resize(size, PIL.Image.Resampling.LANCZOS)
            channel = np.clip(np.asarray(channel), 0, 1)
        resized.append(channel)
    return torch.from_numpy(np.stack(resized)).to(image.device)


def resample(
    image: Union[PIL.Image.Image, np.ndarray, torch.Tensor], size: tuple[int, int], outscale: Optional[float]
) -> Union[PIL.Image.Image, np.ndarray, torch.Tensor]:
    """The 4x output of an input of `size` (height, width), as `images_from_bands` gives it, resampled to `outscale`
    (None: as it is) with Lanczos: an 8-bit PIL image with PIL's own, the others in float32."""
    if outscale is None:
        return image
    height, width = outscale_size(*size, outscale)
    if isinstance(image, PIL.Image.Image):
        same = image.size == (width, height)
        return image if same else image.resize((width, height), PIL.Image.Resampling.LANCZOS)
    if isinstance(image, np.ndarray):  # uint16 (H, W, C)
        if image.shape[:2] == (height, width):
            return image
        floats = torch.from_numpy(image.astype(np.float32) / 65535).permute(2, 0, 1)
        return to_uint16(lanczos_resize(floats, height, width))
    return lanczos_resize(image, height, width)


def images_from_bands(
    bands: Iterable[tuple[int, torch.Tensor]],
    *,
    height: int,
    scale: int,
    alphas: list[Optional[torch.Tensor]],
    channels: list[int],
    output_type: str,
) -> list[Union[PIL.Image.Image, np.ndarray, torch.Tensor]]:
    """The outputs of a batch given in bands of RGB rows (first row, (B, 3, n, W) in [0, 1]) top to bottom, `height`
    rows in all, in each input's channel layout (`merge_channels`; the low-resolution `alphas` upscaled `scale` times
    bicubically, band by band).

    An image in one band stays a (C, H, W) float tensor (`postprocess` converts it, after `resample`). Otherwise the
    bands are written as they come into one array per image, so that 8- and 16-bit outputs never exist as full-size
    floats: uint8 made into a PIL image for "pil", uint16 (H, W, C) for "uint16", else float32 (C, H, W) tensors.
    """
    bands = iter(bands)
    top, rgb = next(bands)
    width = rgb.shape[-1]

    def merged(index: int, rows: torch.Tensor, top: int) -> torch.Tensor:
        alpha = alphas[index]
        if alpha is not None:
            alpha = bicubic_crop(alpha[None].to(rows.device), scale, top, top + rows.shape[-2], 0, width)[0]
        return merge_channels(rows, alpha, channels[index])

    if rgb.shape[-2] == height:
        return [merged(index, rows, 0) for index, rows in enumerate(rgb)]
    dtype, levels = {"pil": (np.uint8, 255), "uint16": (np.uint16, 65535)}.get(output_type, (np.float32, None))
    outputs = [np.empty((height, width, count), dtype=dtype) for count in channels]
    device = rgb.device
    for top, rgb in itertools.chain([(top, rgb)], bands):
        for index, output in enumerate(outputs):
            band = merged(index, rgb[index], top).permute(1, 2, 0)
            output[top : top + rgb.shape[-2]] = (band.mul(levels).round_() if levels else band).cpu().numpy()
    del rgb, bands  # the last band and what made it, before the PIL images are made
    if output_type == "pil":
        return [_array_to_pil(outputs.pop(0)) for _ in range(len(outputs))]  # each array is freed once copied
    if output_type == "uint16":
        return outputs
    return [torch.from_numpy(output).permute(2, 0, 1).to(device) for output in outputs]


def _array_to_pil(array: np.ndarray) -> PIL.Image.Image:
    """uint8 (H, W, C) -> PIL image of mode L, RGB or RGBA."""
    return PIL.Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def to_pil(image: torch.Tensor) -> PIL.Image.Image:
    """(C, H, W) in [0, 1] -> PIL image of mode L, RGB or RGBA."""
    return _array_to_pil((image.clamp(0, 1).permute(1, 2, 0).cpu().float().numpy() * 255).round().astype(np.uint8))


def to_uint16(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> uint16 numpy (H, W, C), `round(x * 65535)`: all the precision a 16-bit file keeps."""
    array = image.detach().clamp(0, 1).permute(1, 2, 0).cpu().float().numpy()
    return (array * 65535).round().astype(np.uint16)


def postprocess(images: list[Union[torch.Tensor, PIL.Image.Image, np.ndarray]], output_type: str):
    """(C, H, W) tensors -> `output_type`: PIL list, numpy (B, H, W, C) float32 or uint16, torch (B, C, H, W), or
    latents.

    numpy and torch outputs are stacked when every image has the same shape, otherwise returned as a list. PIL images
    and uint16 arrays that `images_from_bands` made pass through.
    """
    if output_type == "pil":
        return [image if isinstance(image, PIL.Image.Image) else to_pil(image) for image in images]
    if output_type == "uint16":
        images = [image if isinstance(image, np.ndarray) else to_uint16(image) for image in images]
        if len(images) == 1:  # a view, not a copy: a large output is not held twice
            return images[0][None]
        same_shape = all(image.shape == images[0].shape for image in images)
        return np.stack(images) if same_shape else images
    same_shape = all(image.shape == images[0].shape for image in images)
    if output_type == "np":
        arrays = [image.permute(1, 2, 0).cpu().float().numpy() for image in images]
        return np.stack(arrays) if same_shape else arrays
    if output_type in ("pt", "latent"):
        return torch.stack(images) if same_shape else images
    raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
