"""Overlapping-tile processing with blended seams.

One mechanism serves every tiled path of the toolkit: the tiny VAE's tiled encode (pixels -> latents, scale 1/8) and
decode (latents -> pixels, scale 8), and the pipelines' latent tiles (scale 1). Peak memory is bounded by the tile
size and the number of tiles run together, not by the image size; only the blended output is full size.
"""

import math
from typing import Callable, Iterable, Optional

import torch


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of size `tile` covering `[0, length)`, neighbours overlapping by at least `overlap`.

    Offsets are multiples of `align` (the last tile ends exactly at `length`, so `length` must be a multiple of
    `align` too). Tiles are spread evenly rather than leaving a thin last tile.
    """
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise ValueError(f"Need 0 <= overlap < tile, got tile={tile}, overlap={overlap}.")
    if length % align or tile % align:
        raise ValueError(f"length ({length}) and tile ({tile}) must be multiples of {align}.")
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    last = length - tile
    starts = [align * round(i * last / (count - 1) / align) for i in range(count)]
    return sorted(set(starts))


def blend_weights(height: int, width: int, overlap_y: int, overlap_x: int, kind: str = "linear") -> torch.Tensor:
    """Per-pixel weight of one tile: high in the middle, falling towards the edges that other tiles overlap.

    `"linear"` ramps over the overlap and is flat elsewhere (best for the VAE, whose tiles are already good away
    from their borders); `"gaussian"` is the released TinySR/TSD-SR latent-tile weight (variance 0.01 of the tile).
    Weights are strictly positive so that an image border covered by a single tile keeps its values.
    """
    if kind == "gaussian":
        y = _gaussian_1d(height)
        x = _gaussian_1d(width)
    elif kind == "linear":
        y = _ramp_1d(height, overlap_y)
        x = _ramp_1d(width, overlap_x)
    else:
        raise ValueError(f"Unknown blend kind {kind!r}; expected 'linear' or 'gaussian'.")
    return torch.outer(y, x)


def _gaussian_1d(size: int, var: float = 0.01) -> torch.Tensor:
    position = torch.arange(size, dtype=torch.float64)
    midpoint = (size - 1) / 2
    return torch.exp(-((position - midpoint) ** 2) / (size * size) / (2 * var)).float()


def _ramp_1d(size: int, overlap: int) -> torch.Tensor:
    position = torch.arange(size, dtype=torch.float64)
    if overlap <= 0:
        return torch.ones(size)
    ramp = torch.minimum(position + 1, size - position) / (overlap + 1)
    return ramp.clamp(max=1.0).float()


def tiled_map(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile_size: int,
    overlap: int,
    scale: float = 1.0,
    align: int = 1,
    tiles_per_batch: int = 1,
    blend: str = "linear",
    progress: Optional[Callable[[Iterable], Iterable]] = None,
) -> torch.Tensor:
    """Apply `fn` to overlapping `tile_size` tiles of `x` (B, C, H, W) and blend the results.

    `fn` maps (N, C, t, t) to (N, C', t * scale, t * scale); `tiles_per_batch` tiles are concatenated along the batch
    dimension for one call. `progress` wraps the iterable of tile batches (e.g. a pipeline's `progress_bar`).
    Inputs no larger than one tile are passed to `fn` whole.
    """
    height, width = x.shape[-2:]
    if height <= tile_size and width <= tile_size:
        return fn(x)
    tile_h, tile_w = min(tile_size, height), min(tile_size, width)
    starts = [
        (top, left)
        for top in tile_starts(height, tile_h, min(overlap, tile_h - 1), align)
        for left in tile_starts(width, tile_w, min(overlap, tile_w - 1), align)
    ]
    out_tile_h, out_tile_w = _scaled(tile_h, scale), _scaled(tile_w, scale)
    weight = blend_weights(
        out_tile_h, out_tile_w, _scaled(overlap, scale), _scaled(overlap, scale), blend
    ).to(x.device)
    output = None
    total_weight = torch.zeros(_scaled(height, scale), _scaled(width, scale), device=x.device)

    batches = [starts[i : i + tiles_per_batch] for i in range(0, len(starts), tiles_per_batch)]
    for batch in progress(batches) if progress is not None else batches:
        tiles = torch.cat([x[..., top : top + tile_h, left : left + tile_w] for top, left in batch])
        results = fn(tiles).split(x.shape[0])
        for (top, left), result in zip(batch, results):
            if output is None:
                output = torch.zeros(
                    *result.shape[:-2], total_weight.shape[0], total_weight.shape[1], device=x.device, dtype=torch.float32
                )
            out_top, out_left = _scaled(top, scale), _scaled(left, scale)
            region = (..., slice(out_top, out_top + out_tile_h), slice(out_left, out_left + out_tile_w))
            output[region] += result.float() * weight
            total_weight[region[1:]] += weight
    return (output / total_weight).to(x.dtype)


def _scaled(value: int, scale: float) -> int:
    scaled = value * scale
    if abs(scaled - round(scaled)) > 1e-6:
        raise ValueError(f"Tile geometry {value} does not scale to whole pixels by {scale}.")
    return int(round(scaled))
