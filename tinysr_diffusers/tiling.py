"""Overlapping-tile processing with blended seams, and the settings of a call's tiles.

One mechanism serves every tiled path of the toolkit: the tiny VAE's tiled encode (pixels -> latents, scale 1/8) and
decode (latents -> pixels, scale 8), and the pipelines' latent tiles (scale 1). Peak memory is bounded by the tile
size and the number of tiles run together, not by the image size; only the blended output is full size, and
`tiled_rows` hands even that out in finished bands of rows (the pipelines stream their output band by band).

torch is imported when tiles are made, not with this module: the command line reads `TileSettings` at start-up.
"""

import dataclasses
import itertools
import math
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Sequence


if TYPE_CHECKING:
    import torch
    from tqdm.auto import tqdm


BAND_ROWS = 64  # output rows per band that `tiled_rows` yields (and the pipelines' passes over the output read)
MIN_TILE_SIZE = 16  # latent pixels (128 output pixels): the out-of-memory fallback halves tiles down to this


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileSettings:
    """The latent tiles of a pipeline call: `size` latent pixels a side (None: the whole image, untiled), neighbours
    overlapping by at least `overlap`, `batch` tiles through the transformer at once. The VAE is tiled with the same
    geometry in image pixels. The defaults are the releases' (64 latent pixels = 512 output pixels)."""

    size: Optional[int] = 64
    overlap: int = 8
    batch: int = 4

    def __post_init__(self):
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1):
            raise ValueError(f"`tile_size` must be a positive integer or None, got {self.size!r}.")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) or not 0 <= self.overlap < self.largest:
            raise ValueError(f"`tile_overlap` must be an integer in [0, tile_size), got {self.overlap!r}.")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"`tile_batch_size` must be a positive integer, got {self.batch!r}.")

    @property
    def largest(self) -> float:
        """The tile side (infinite when untiled)."""
        return math.inf if self.size is None else self.size

    def halved(self, latent_side: int, multiple: int = 1) -> Optional["TileSettings"]:
        """The settings to retry with after running out of memory: half the tile batch, else half the tile (of the
        whole `latent_side` when untiled or one tile), a multiple of `multiple`, its overlap at most a quarter of it
        and one tile at a time; None once the tile would be smaller than `MIN_TILE_SIZE`."""
        if self.size is not None and self.batch > 1:
            return dataclasses.replace(self, batch=self.batch // 2)
        half = min(self.largest, latent_side) // 2 // multiple * multiple
        if half < MIN_TILE_SIZE:
            return None
        return TileSettings(size=int(half), overlap=min(self.overlap, int(half) // 4), batch=1)


class PassesProgress:
    """One progress bar over several tiled passes of an image: each pass adds its tile batches to the bar's total
    when it starts (a `progress` wrapper for `tiled_map` / `tiled_rows`), so users see one bar per image, not three.
    `make_bar(total)` makes the bar (e.g. a pipeline's `progress_bar`) at the first pass."""

    def __init__(self, make_bar: Callable[..., "tqdm"]):
        self.make_bar = make_bar
        self.bar = None

    def __call__(self, batches: Sequence) -> Iterator:
        if self.bar is None:
            self.bar = self.make_bar(total=len(batches))
        else:
            self.bar.total += len(batches)
            self.bar.refresh()
        for batch in batches:
            yield batch
            self.bar.update()

    def __enter__(self) -> "PassesProgress":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.close()


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


def blend_weights(height: int, width: int, overlap_y: int, overlap_x: int, kind: str = "linear") -> "torch.Tensor":
    """Per-pixel weight of one tile: high in the middle, falling towards the edges that other tiles overlap.

    `"linear"` ramps over the overlap and is flat elsewhere (best for the VAE, whose tiles are already good away
    from their borders); `"gaussian"` is the released TinySR/TSD-SR latent-tile weight (variance 0.01 of the tile).
    Weights are strictly positive so that an image border covered by a single tile keeps its values.
    """
    import torch

    if kind == "gaussian":
        y = _gaussian_1d(height)
        x = _gaussian_1d(width)
    elif kind == "linear":
        y = _ramp_1d(height, overlap_y)
        x = _ramp_1d(width, overlap_x)
    else:
        raise ValueError(f"Unknown blend kind {kind!r}; expected 'linear' or 'gaussian'.")
    return torch.outer(y, x)


def _gaussian_1d(size: int, var: float = 0.01) -> "torch.Tensor":
    import torch

    position = torch.arange(size, dtype=torch.float64)
    midpoint = (size - 1) / 2
    return torch.exp(-((position - midpoint) ** 2) / (size * size) / (2 * var)).float()


def _ramp_1d(size: int, overlap: int) -> "torch.Tensor":
    import torch

    position = torch.arange(size, dtype=torch.float64)
    if overlap <= 0:
        return torch.ones(size)
    ramp = torch.minimum(position + 1, size - position) / (overlap + 1)
    return ramp.clamp(max=1.0).float()


def tiled_map(
    fn: Callable[["torch.Tensor"], "torch.Tensor"], x: "torch.Tensor", tile_size: int, overlap: int, **options
) -> "torch.Tensor":
    """Apply `fn` to overlapping `tile_size` tiles of `x` (B, C, H, W) and blend the results: the bands of
    `tiled_rows`, whose keyword `options` it takes (`scale`, `align`, `tiles_per_batch`, `blend`, `progress`), in one
    tensor. An input of one tile is passed to `fn` whole.
    """
    import torch

    bands = tiled_rows(fn, x, tile_size, overlap, **options)
    first, second = next(bands), next(bands, None)
    if second is None:  # one band: the whole output
        return first[1]
    scale = options.get("scale", 1.0)
    size = (_scaled(x.shape[-2], scale), _scaled(x.shape[-1], scale))
    output = torch.empty(*first[1].shape[:-2], *size, device=first[1].device, dtype=first[1].dtype)
    for top, rows in itertools.chain([first, second], bands):
        output[..., top : top + rows.shape[-2], :] = rows
    return output


def tiled_rows(
    fn: Callable[["torch.Tensor"], "torch.Tensor"],
    x: "torch.Tensor",
    tile_size: int,
    overlap: int,
    *,
    scale: float = 1.0,
    align: int = 1,
    tiles_per_batch: int = 1,
    blend: str = "linear",
    progress: Optional[Callable[[Iterable], Iterable]] = None,
) -> Iterator[tuple[int, "torch.Tensor"]]:
    """Apply `fn` to overlapping `tile_size` tiles of `x` (B, C, H, W) and blend the results, in bands: yield (first
    output row, blended rows (B, C', n, W * scale)) top to bottom, as soon as no later tile reaches them, in bands of
    at most `BAND_ROWS` rows; an input of one tile is one band, `fn` of it.

    `fn` maps (N, C, t, t) to (N, C', t * scale, t * scale); tile offsets are multiples of `align`; `tiles_per_batch`
    tiles are concatenated along the batch dimension for one call; `blend` names the weights (`blend_weights`);
    `progress` wraps the iterable of tile batches (e.g. a pipeline's `progress_bar`). `x` may be any object with
    `shape`, `device`, `dtype` and `x[..., rows, cols]` crops (e.g. `image_processing.UpscaledPixels`).

    Only one band of tiles (plus the overlap with the next) is held, so a consumer that writes the rows away (the
    pipelines' output) never holds the full-size float output; `tiled_map` joins the bands.
    """
    import torch

    height, width = x.shape[-2:]
    if height <= tile_size and width <= tile_size:
        yield 0, fn(x[..., :height, :width])  # a crop makes a tensor of an image computed on demand
        return
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
    out_width = _scaled(width, scale)
    band = band_weight = None
    band_top = 0  # output row of the band's first row

    batches = [starts[i : i + tiles_per_batch] for i in range(0, len(starts), tiles_per_batch)]
    for batch in progress(batches) if progress is not None else batches:
        tiles = torch.cat([x[..., top : top + tile_h, left : left + tile_w] for top, left in batch])
        results = fn(tiles).split(x.shape[0])
        for (top, left), result in zip(batch, results):
            out_top, out_left = _scaled(top, scale), _scaled(left, scale)
            if band is None:
                band = torch.zeros(*result.shape[:-2], out_tile_h, out_width, device=x.device, dtype=torch.float32)
                band_weight = torch.zeros(out_tile_h, out_width, device=x.device, dtype=torch.float32)
            elif out_top > band_top:  # a new row of tiles: the rows above it are final
                done = out_top - band_top
                yield from _normalised_rows(band[..., :done, :], band_weight[:done], band_top, x.dtype)
                for buffer in (band, band_weight):  # shift the overlap up in place: one band is ever allocated
                    buffer[..., : out_tile_h - done, :] = buffer[..., done:, :].clone()
                    buffer[..., out_tile_h - done :, :] = 0
                band_top = out_top
            rows = slice(out_top - band_top, out_top - band_top + out_tile_h)
            region = (..., rows, slice(out_left, out_left + out_tile_w))
            band[region] += result.float() * weight
            band_weight[region[1:]] += weight
    yield from _normalised_rows(band, band_weight, band_top, x.dtype)


def _normalised_rows(
    band: "torch.Tensor", weight: "torch.Tensor", top: int, dtype: "torch.dtype"
) -> Iterator[tuple[int, "torch.Tensor"]]:
    """Blended rows in bands of `BAND_ROWS`, so that neither this nor the consumer makes a tile-row-sized temporary."""
    for start in range(0, band.shape[-2], BAND_ROWS):
        rows = slice(start, start + BAND_ROWS)
        yield top + start, (band[..., rows, :] / weight[rows]).to(dtype)


def _scaled(value: int, scale: float) -> int:
    scaled = value * scale
    if abs(scaled - round(scaled)) > 1e-6:
        raise ValueError(f"Tile geometry {value} does not scale to whole pixels by {scale}.")
    return int(round(scaled))
