"""What the TinySR student and the TSD-SR teacher pipelines share: the one-step 4x SR recipe and the folder layout.

The recipe (docs/method.md, "One-step super-resolution"): LR image in [0, 1] -> bicubic x4 in torch -> reflect-pad
to what the VAE and the patch size need -> [-1, 1] -> `z_L = encode(x) * scaling_factor` -> `z_H = z_L - sigma * v`
with sigma(t=1000) = 1 -> `decode(z_H / scaling_factor)` -> crop back to exactly 4x -> clamp -> colour fix against
the LR image. Subclasses only
say how the velocity `v` is predicted. The steps are public (`encode_latents`, `predict_velocity`, `step_latents`,
`decode_latents`) so that training and pruning run exactly the inference path. Tiled calls with a tiny VAE run the
same recipe streamed, tile by tile (`_upscale_streamed`), so that no full-resolution float tensor is made.
"""

import functools
import os
import tempfile
import warnings
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from huggingface_hub import create_repo

from diffusers import AutoencoderKL, AutoencoderTiny
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput

from ..color_fix import (
    WAVELET_HALO,
    ChannelStatistics,
    adain_color_fix,
    apply_color_fix,
    check_color_fix,
    wavelet_color_fix,
)
from ..hub.pipeline_folders import MODEL_INDEX, fetch_code_files, looks_like_a_path, verify_shims, write_shims
from ..image_processing import (
    OUTPUT_TYPES,
    PipelineImageInput,
    UpscaledPixels,
    bicubic_crop,
    bicubic_upscale,
    check_outscale,
    lanczos_resize,
    merge_channels,
    outscale_size,
    postprocess,
    reflect_pad_to_multiple,
    split_alpha,
    to_tensors,
    to_uint16,
)
from ..hub.model_cards import pipeline_card
from ..models import TinySRAutoencoder
from ..tiling import tiled_map, tiled_rows

SUPPORTED_VAES = (TinySRAutoencoder, AutoencoderTiny, AutoencoderKL)
STREAMED_VAES = (TinySRAutoencoder, AutoencoderTiny)  # VAEs tiled by `tiled_map`, whose tiles can be streamed
DEFAULT_TILE_SIZE = 64  # latent pixels (512 output pixels), as the releases
MIN_TILE_SIZE = 16  # the out-of-memory fallback halves tiles down to this many latent pixels (128 output pixels)
STREAM_BAND_ROWS = 64  # output rows read back at a time in the streaming pipeline's AdaIN pass


def step_latents(latents: torch.Tensor, velocity: torch.Tensor, sigma: float) -> torch.Tensor:
    """The one step of the recipe: the clean latents `z_H = z_L - sigma * v` (flow matching, sigma = t / 1000)."""
    return latents - sigma * velocity


def _unit_rows(
    bands: Iterable[tuple[int, torch.Tensor]], height: int, width: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Decoded rows (top, (B, 3, n, W) in [-1, 1]) cropped to the image and mapped to [0, 1] float32, in place."""
    for top, rows in bands:
        rows = rows[..., : max(0, height - top), :width].float()
        if rows.shape[-2]:
            yield top, rows.clamp_(-1, 1).add_(1).div_(2)  # in place: each band is a fresh tensor


def colour_fixed_rows(
    rows: Iterable[tuple[int, torch.Tensor]],
    height: int,
    color_fix: Optional[str],
    low_res: torch.Tensor,
    scale: int,
    statistics: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """The colour-fixed image in bands, top to bottom, from the decoded image's rows in [0, 1], top to bottom.

    AdaIN uses the whole image's `statistics`; the wavelet fix sees `WAVELET_HALO` rows on each side of a band (the
    reach of its blurs), so each band equals the same rows of the whole image fixed; no fix clamps. Only a band and
    its halo are held.
    """
    halo = WAVELET_HALO if color_fix == "wavelet" else 0
    width = low_res.shape[-1] * scale
    window, window_top, done = None, 0, 0  # decoded rows from `window_top` on: later bands may still need them
    for top, piece in rows:
        window = piece if window is None else torch.cat([window, piece], dim=-2)
        end = top + piece.shape[-2]
        ready = height if end >= height else end - halo  # rows above `ready` have all their context
        if ready <= done:
            continue
        first, last = max(0, done - halo), min(height, ready + halo)
        context = window[..., first - window_top : last - window_top, :]
        if color_fix == "adain":
            fixed = adain_color_fix(context, low_res, statistics)
        elif color_fix == "wavelet":
            fixed = wavelet_color_fix(context, bicubic_crop(low_res, scale, first, last, 0, width))
        else:
            fixed = context.clamp(0, 1)
        yield done, fixed[..., done - first : ready - first, :]
        done, keep = ready, max(0, ready - halo)
        window, window_top = window[..., keep - window_top :, :], keep


class PassesProgress:
    """One progress bar over several tiled passes of an image: each pass adds its tile batches to the bar's total
    when it starts (a `progress` wrapper for `tiled_map` / `tiled_rows`), so users see one bar per image, not three.
    `make_bar(total)` makes the bar (e.g. a pipeline's `progress_bar`) at the first pass."""

    def __init__(self, make_bar: Callable[..., "tqdm"]):  # noqa: F821
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


class OneStepSRPipeline(DiffusionPipeline):
    r"""
    Base class of the one-step 4x super-resolution pipelines ([`TinySRPipeline`], [`TSDSRPipeline`]).

    It runs the shared recipe in `__call__` (any image size, batches, latent tiling with Gaussian blending plus VAE
    tiling, colour fix) and saves folders that `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`,
    this class's own `from_pretrained` (no flag needed) and `AutoModel` load with the installed classes. Subclasses
    implement `predict_velocity`.
    """

    upscale_factor = 4
    timestep = 1000.0  # the one timestep of the one-step model
    sigma = 1.0  # flow-matching sigma at t = 1000: z_H = z_L - sigma * v

    # --------------------------------------------------------------------------------------------------- components
    def _check_vae(self, vae) -> None:
        if not isinstance(vae, SUPPORTED_VAES):
            names = ", ".join(cls.__name__ for cls in SUPPORTED_VAES)
            raise TypeError(f"`vae` must be one of {names}, got {type(vae).__name__}.")

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel of the VAE (8 for all supported VAEs with their default configs)."""
        if isinstance(self.vae, AutoencoderKL):
            return 2 ** (len(self.vae.config.block_out_channels) - 1)
        return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    def _latent_shift(self) -> float:
        # The TSD-SR/TinySR releases use no shift factor even with SD3's VAE (whose config has 0.0609).
        return (self.vae.config.shift_factor or 0.0) if self.config.use_shift_factor else 0.0

    def _default_color_fix(self) -> Optional[str]:
        """The colour fix of a call's `color_fix="default"`: the pipeline's own (saved with it), else AdaIN."""
        return self.config.get("color_fix", "adain")

    def predict_velocity(self, latents: torch.Tensor, transformer: Optional[torch.nn.Module] = None) -> torch.Tensor:
        """The velocity `v` for scaled latents `z_L` (a batch of images or of latent tiles), by `transformer`
        (default: the pipeline's; training passes its wrapped, e.g. DDP, copy)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------------- VAE calls
    def encode_latents(
        self,
        pixels: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        vae_tile: Optional[tuple[int, int]] = None,
        sample_posterior: bool = True,
    ) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents z_L.

        An `AutoencoderKL`'s posterior is sampled with `generator` (inference, as the releases do) or, with
        `sample_posterior=False`, its mode is taken (training: the latents the student's tiny encoder learns, see
        `training/latents.py`); the tiny VAEs are deterministic. `vae_tile` = (tile, overlap) image pixels tiles an
        `AutoencoderTiny` here (the other VAEs tile themselves, see `_vae_tiling`).
        """
        vae = self.vae
        if isinstance(vae, AutoencoderKL):
            posterior = vae.encode(pixels).latent_dist
            latents = posterior.sample(generator) if sample_posterior else posterior.mode()
        elif self._tiles_tiny_vae(vae_tile):
            # AutoencoderTiny's own tiled encoder hard-codes 4 latent channels (SD3 has 16): tile its encode here.
            tile, overlap = vae_tile
            factor = self.vae_scale_factor
            latents = tiled_map(lambda x: vae.encode(x).latents, pixels, tile, overlap, scale=1 / factor, align=factor)
        else:
            latents = vae.encode(pixels).latents
        return (latents - self._latent_shift()) * vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor, vae_tile: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Scaled latents z_H -> images in [-1, 1] (not clamped)."""
        vae = self.vae
        latents = latents / vae.config.scaling_factor + self._latent_shift()
        if self._tiles_tiny_vae(vae_tile):
            tile, overlap = vae_tile
            factor = self.vae_scale_factor
            return tiled_map(lambda z: vae.decode(z).sample, latents, tile // factor, overlap // factor, scale=factor)
        return vae.decode(latents).sample

    def _tiles_tiny_vae(self, vae_tile: Optional[tuple[int, int]]) -> bool:
        return isinstance(self.vae, AutoencoderTiny) and vae_tile is not None and not self.vae.use_tiling

    @contextmanager
    def _vae_tiling(self, vae_tile: Optional[tuple[int, int]]) -> Iterator[None]:
        """Tile the VAE with `vae_tile` = (tile, overlap) image pixels for one call, then restore its settings.

        `TinySRAutoencoder` and `AutoencoderKL` use their own tiling; `AutoencoderTiny` is tiled in `encode_latents`
        and `decode_latents`. A VAE on which the user already enabled tiling keeps the user's settings.
        """
        vae = self.vae
        if vae_tile is None or vae.use_tiling or isinstance(vae, AutoencoderTiny):
            yield
            return
        tile, overlap = vae_tile
        if isinstance(vae, TinySRAutoencoder):
            saved = {"tile_sample_size": vae.tile_sample_size, "tile_sample_overlap": vae.tile_sample_overlap}
            vae.enable_tiling(tile, overlap)
        else:  # AutoencoderKL
            saved = {
                name: getattr(vae, name)
                for name in ("tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")
            }
            vae.tile_sample_min_size = tile
            vae.tile_latent_min_size = tile // self.vae_scale_factor
            vae.tile_overlap_factor = overlap / tile
            vae.enable_tiling()
        try:
            yield
        finally:
            vae.disable_tiling()
            for name, value in saved.items():
                setattr(vae, name, value)

    # ------------------------------------------------------------------------------------------------------- __call__
    def _check_call_arguments(
        self,
        output_type: str,
        color_fix: Optional[str],
        tile_size: Union[int, str, None],
        tile_overlap: int,
        tile_batch_size: int,
        outscale: Optional[float] = None,
    ) -> None:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        check_color_fix(color_fix)
        check_outscale(outscale)
        if output_type == "latent" and outscale not in (None, self.upscale_factor):
            raise ValueError("`outscale` resamples images, so it cannot be used with `output_type='latent'`.")
        if tile_size is not None:
            if tile_size != "auto" and (
                not isinstance(tile_size, int) or tile_size <= 0 or tile_size % self.patch_size
            ):
                raise ValueError(
                    f"`tile_size` (latent pixels) must be a positive multiple of the patch size {self.patch_size}, "
                    f"'auto' or None to disable tiling; got {tile_size!r}."
                )
            largest = MIN_TILE_SIZE if tile_size == "auto" else tile_size
            if not isinstance(tile_overlap, int) or not 0 <= tile_overlap < largest:
                raise ValueError(f"`tile_overlap` must be an integer in [0, tile_size), got {tile_overlap!r}.")
        if not isinstance(tile_batch_size, int) or tile_batch_size < 1:
            raise ValueError(f"`tile_batch_size` must be a positive integer, got {tile_batch_size!r}.")

    def _upscale(
        self,
        low_res: torch.Tensor,
        output_type: str,
        color_fix: Optional[str],
        tile_size: Optional[int],
        tile_overlap: int,
        tile_batch_size: int,
        generator: Optional[torch.Generator],
    ) -> torch.Tensor:
        """(B, 3, h, w) RGB in [0, 1], all one size -> (B, 3, 4h, 4w) in [0, 1], or the latents z_H."""
        upscaled = bicubic_upscale(low_res, self.upscale_factor)
        height, width = upscaled.shape[-2:]
        pixels = reflect_pad_to_multiple(upscaled, self.vae_scale_factor * self.patch_size) * 2 - 1
        vae_tile = None
        if tile_size is not None:
            vae_tile = (tile_size * self.vae_scale_factor, tile_overlap * self.vae_scale_factor)

        with self._vae_tiling(vae_tile):
            latents = self.encode_latents(pixels.to(self.vae.dtype), generator, vae_tile)
            latents = latents.to(self.transformer.dtype)
            velocity = self._velocity(latents, tile_size, tile_overlap, tile_batch_size)
            latents = step_latents(latents, velocity, self.sigma)
            if output_type == "latent":
                return latents
            decoded = self.decode_latents(latents.to(self.vae.dtype), vae_tile)

        image = (decoded[..., :height, :width].float().clamp(-1, 1) + 1) / 2
        return apply_color_fix(image, low_res, upscaled, color_fix)

    def _velocity(
        self,
        latents: torch.Tensor,
        tile_size: Optional[int],
        tile_overlap: int,
        tile_batch_size: int,
        progress: Optional[Callable[[Iterable], Iterable]] = None,
    ) -> torch.Tensor:
        """The transformer's velocity for `latents`: whole, or in latent tiles blended with Gaussian weights (the
        tiled and the streamed paths share it, so both blend alike). `progress` wraps the tile batches (default:
        a progress bar of their own)."""
        if tile_size is None:
            return self.predict_velocity(latents)
        return tiled_map(
            self.predict_velocity,
            latents,
            tile_size,
            tile_overlap,
            align=self.patch_size,
            tiles_per_batch=tile_batch_size,
            blend="gaussian",
            progress=progress or self.progress_bar,
        )

    def _streams(self, low_res_size: tuple[int, int], output_type: str, tile_size: Optional[int]) -> bool:
        """Whether a group is upscaled tile by tile (`_upscale_streamed`): tiled, a tiny VAE that the user has not
        tiled with settings of their own, and more than one latent tile (an image of one tile runs as before)."""
        if tile_size is None or output_type == "latent" or not isinstance(self.vae, STREAMED_VAES):
            return False
        return not self.vae.use_tiling and self._latent_side(low_res_size) > tile_size

    def _upscale_streamed(
        self,
        low_res: torch.Tensor,
        alphas: list[Optional[torch.Tensor]],
        channels: list[int],
        output_type: str,
        color_fix: Optional[str],
        tile_size: int,
        tile_overlap: int,
        tile_batch_size: int,
    ) -> list[Union[PIL.Image.Image, np.ndarray, torch.Tensor]]:
        """`_upscale` plus `merge_channels` without a full-resolution float tensor: the same tiles, blended the same.

        The VAE encodes tiles made on demand from the LR image (`UpscaledPixels`); latents (1 byte per output pixel
        in float32) are tiled as before; decoded tiles are blended in bands of rows (`tiled_rows`) and each finished
        band is colour-fixed (`colour_fixed_rows`) into the output. AdaIN needs the whole image's statistics first,
        so for it the bands are kept in a uint16 buffer while the statistics are summed, then fixed in a second pass.
        Outputs are uint8 for PIL images, uint16 for "uint16", float32 for numpy and torch. Returns one image per
        input: PIL, uint16 (H, W, C) numpy, or (C, H, W) float32.
        """
        factor = self.vae_scale_factor
        vae, scale = self.vae, self.upscale_factor
        batch, height, width = low_res.shape[0], low_res.shape[-2] * scale, low_res.shape[-1] * scale
        pixels = UpscaledPixels(low_res, scale, factor * self.patch_size, vae.dtype)
        tile, overlap = tile_size * factor, tile_overlap * factor

        def encode(tiles: torch.Tensor) -> torch.Tensor:
            return vae.encode(tiles).latents

        def decode(tiles: torch.Tensor) -> torch.Tensor:
            return vae.decode(tiles).sample

        # One progress bar over the three tiled passes (encode, transformer, decode).
        with PassesProgress(self.progress_bar) as progress:
            # Latent-sized tensors (1 byte per output pixel each, in float32) are updated in place where the recipe
            # allows: every extra one stays resident in the allocator's heap at the sizes where it keeps them (below
            # 32 MiB).
            latents = tiled_map(encode, pixels, tile, overlap, scale=1 / factor, align=factor, progress=progress)
            latents = latents.sub_(self._latent_shift()).mul_(vae.config.scaling_factor).to(self.transformer.dtype)
            velocity = self._velocity(latents, tile_size, tile_overlap, tile_batch_size, progress)
            latents = step_latents(latents, velocity, self.sigma)
            del velocity
            latents = latents.div_(vae.config.scaling_factor).add_(self._latent_shift()).to(vae.dtype)

            bands = tiled_rows(decode, latents, tile_size, tile_overlap, scale=factor, progress=progress)
            rows = _unit_rows(bands, height, width)
            statistics = None
            if color_fix == "adain":
                # AdaIN needs the whole output's statistics before any band is fixed: pass 1 keeps the decoded image
                # as uint16 on the CPU (a 16-bit output loses nothing; the sums see the floats), pass 2 reads it back
                # in bands. One allocation, committed as it is written and handed back whole.
                decoded = torch.empty(batch, 3, height, width, dtype=torch.uint16)
                sums = ChannelStatistics()
                for top, piece in rows:
                    sums.update(piece)
                    decoded[..., top : top + piece.shape[-2], :] = piece.mul_(65535).round_().to(torch.uint16).cpu()
                del latents, bands
                statistics = sums.mean_std()
                rows = (
                    (top, decoded[..., top : top + STREAM_BAND_ROWS, :].to(low_res.device).float() / 65535)
                    for top in range(0, height, STREAM_BAND_ROWS)
                )
            # The wavelet fix and no fix are local: decoded bands go straight to the output (one pass, no buffer).
            # Integer outputs hold round(x * levels): uint8 for PIL images, uint16 for 16-bit files; else the floats.
            dtype, levels = {"pil": (np.uint8, 255), "uint16": (np.uint16, 65535)}.get(output_type, (np.float32, None))
            outputs = [np.empty((height, width, count), dtype=dtype) for count in channels]
            for top, rgb in colour_fixed_rows(rows, height, color_fix, low_res, scale, statistics):
                bottom = top + rgb.shape[-2]
                for index, output in enumerate(outputs):
                    alpha = alphas[index]
                    if alpha is not None:
                        alpha = bicubic_crop(alpha[None].to(rgb.device), scale, top, bottom, 0, width)[0]
                    band = merge_channels(rgb[index], alpha, channels[index]).permute(1, 2, 0)
                    output[top:bottom] = (band.mul(levels).round_() if levels else band).cpu().numpy()
            rows = bands = latents = decoded = None  # freed before the PIL images are made
        if output_type == "pil":
            images = []
            while outputs:  # each array is freed once PIL has copied it
                array = outputs.pop(0)
                images.append(PIL.Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array))
                del array
            return images
        if output_type == "uint16":
            return outputs
        return [torch.from_numpy(output).permute(2, 0, 1).to(low_res.device) for output in outputs]

    @torch.no_grad()
    def __call__(
        self,
        image: PipelineImageInput,
        *,
        output_type: str = "pil",
        color_fix: Optional[str] = "default",
        tile_size: Union[int, str, None] = DEFAULT_TILE_SIZE,
        tile_overlap: int = 8,
        tile_batch_size: int = 4,
        outscale: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ) -> Union[ImagePipelineOutput, tuple]:
        r"""
        Super-resolve `image` 4x in one step.

        Args:
            image: A PIL image, numpy array (uint8, uint16 or float in [0, 1]; HW, HWC or BHWC), torch tensor (uint8
                or float in [0, 1]; CHW or BCHW), or a list of them. Greyscale, RGB or RGBA; any size. Images of
                different sizes in one list are processed in same-size groups.
            output_type: `"pil"`, `"np"` (float32 BHWC in [0, 1]), `"uint16"` (uint16 BHWC, `round(65535 * x)`
                of the float output: 16-bit files without a full-size float image when streamed), `"pt"` (float32
                BCHW in [0, 1]) or `"latent"` (z_H of the padded image). Outputs keep the input's channels: greyscale
                stays greyscale, RGBA keeps a bicubically upscaled alpha. numpy/torch outputs of different shapes
                come back as a list.
            color_fix: `"adain"` (match the LR image's channel statistics), `"wavelet"` (take the low frequencies of
                the bicubic upscale), `None`, or `"default"`: the pipeline's own (`pipe.config.color_fix`, saved with
                it; `"adain"`, the releases' recipe, for folders saved without one).
            tile_size: Latent tile side in latent pixels (64 = 512 output pixels, as the releases); larger latents are
                processed in overlapping tiles blended with Gaussian weights, and the VAE is tiled with the same
                geometry, so peak memory depends on the tile size, not the image size. With a tiny VAE the whole
                call is streamed tile by tile (no full-resolution float tensor for PIL and uint16 outputs). `None`
                disables tiling; `"auto"` takes the largest tile that fits on CUDA (the whole image, halved while it
                runs out of memory), else 64. On a CUDA out-of-memory error the tile batch, then the tile, is halved
                and the group retried, with a warning.
            tile_overlap: Minimum overlap of neighbouring latent tiles, in latent pixels.
            tile_batch_size: Latent tiles run through the transformer together.
            outscale: Output size as a multiple of the input size (any number > 0, e.g. 2 or 3.5): the image is
                super-resolved 4x, then resampled with Lanczos to `round(outscale * side)` pixels per side, as
                Real-ESRGAN's `--outscale`. `None` (or 4) keeps the model's 4x.
            generator: Random generator for the posterior sample of an `AutoencoderKL` (unused by the tiny VAEs).
            return_dict: Return an [`~pipelines.ImagePipelineOutput`] rather than a tuple.

        Returns:
            [`~pipelines.ImagePipelineOutput`] with the images, exactly 4x (or `outscale` times) the input size (or
            a tuple).
        """
        if color_fix == "default":
            color_fix = self._default_color_fix()
        self._check_call_arguments(output_type, color_fix, tile_size, tile_overlap, tile_batch_size, outscale)
        images = to_tensors(image)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, tensor in enumerate(images):
            groups.setdefault(tuple(tensor.shape[-2:]), []).append(index)

        device = self._execution_device
        outputs: list[Union[PIL.Image.Image, np.ndarray, torch.Tensor, None]] = [None] * len(images)
        for size, indices in groups.items():
            rgb, alpha = zip(*(split_alpha(images[index]) for index in indices))
            channels = [images[index].shape[0] for index in indices]
            group = (torch.stack(rgb).to(device), list(alpha), channels, size, output_type, color_fix, generator)
            run = functools.partial(self._upscale_group, *group)
            tiles = self._auto_tile_size(size) if tile_size == "auto" else tile_size
            results = self._with_oom_fallback(run, size, tiles, tile_overlap, tile_batch_size)
            for index, result in zip(indices, results):
                outputs[index] = result if output_type == "latent" else self._resample(result, size, outscale)

        self.maybe_free_model_hooks()
        output = postprocess(outputs, output_type)
        if not return_dict:
            return (output,)
        return ImagePipelineOutput(images=output)

    def _upscale_group(
        self,
        low_res: torch.Tensor,
        alphas: list[Optional[torch.Tensor]],
        channels: list[int],
        size: tuple[int, int],
        output_type: str,
        color_fix: Optional[str],
        generator: Optional[torch.Generator],
        tile_size: Optional[int],
        tile_overlap: int,
        tile_batch_size: int,
    ) -> list[Union[PIL.Image.Image, np.ndarray, torch.Tensor]]:
        """One same-size group at 4x, in the input's channel layout: streamed where `_streams` says so."""
        if self._streams(size, output_type, tile_size):
            streamed = (output_type, color_fix, tile_size, tile_overlap, tile_batch_size)
            return self._upscale_streamed(low_res, alphas, channels, *streamed)
        result = self._upscale(low_res, output_type, color_fix, tile_size, tile_overlap, tile_batch_size, generator)
        if output_type == "latent":
            return list(result)
        merged = []
        for image, alpha, count in zip(result, alphas, channels):
            if alpha is not None:
                alpha = bicubic_upscale(alpha[None].to(image.device), self.upscale_factor)[0]
            merged.append(merge_channels(image, alpha, count))
        return merged

    def _auto_tile_size(self, size: tuple[int, int]) -> int:
        """`tile_size="auto"`: on CUDA the whole latent image as one tile, which `_with_oom_fallback` halves until it
        fits the free memory (the largest tile that fits, found by the allocator rather than by an estimate); elsewhere
        the releases' 64, as no out-of-memory error comes before the system starts swapping."""
        return self._latent_side(size) if self._execution_device.type == "cuda" else DEFAULT_TILE_SIZE

    def _latent_side(self, size: tuple[int, int]) -> int:
        """The longer side of the (padded) latents of an input of `size` (height, width)."""
        multiple = self.vae_scale_factor * self.patch_size
        return max(-(-side * self.upscale_factor // multiple) * multiple for side in size) // self.vae_scale_factor

    def _with_oom_fallback(
        self,
        run: Callable[[Optional[int], int, int], list],
        size: tuple[int, int],
        tile_size: Optional[int],
        tile_overlap: int,
        tile_batch_size: int,
    ) -> list:
        """`run(tile_size, tile_overlap, tile_batch_size)`, retried after a CUDA out-of-memory error with half the tile
        batch, then half the tile (no smaller than `MIN_TILE_SIZE`), with a warning, as ComfyUI's tiled upscaler."""
        while True:
            try:
                return run(tile_size, tile_overlap, tile_batch_size)
            except torch.cuda.OutOfMemoryError:
                if tile_size is not None and tile_batch_size > 1:
                    smaller = (tile_size, tile_overlap, tile_batch_size // 2)
                else:
                    whole = tile_size is None or tile_size >= self._latent_side(size)  # untiled: halve the image
                    half = (self._latent_side(size) if whole else tile_size) // 2 // self.patch_size * self.patch_size
                    if half < MIN_TILE_SIZE:
                        raise
                    smaller = (half, min(tile_overlap, half // 4), 1)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                warnings.warn(
                    f"Out of memory with tile_size={tile_size}, tile_batch_size={tile_batch_size}: retrying with "
                    f"tile_size={smaller[0]}, tile_overlap={smaller[1]}, tile_batch_size={smaller[2]}.",
                    RuntimeWarning,
                    stacklevel=4,  # the caller of __call__ (through torch.no_grad's wrapper)
                )
                tile_size, tile_overlap, tile_batch_size = smaller

    @staticmethod
    def _resample(
        image: Union[PIL.Image.Image, np.ndarray, torch.Tensor], size: tuple[int, int], outscale: Optional[float]
    ) -> Union[PIL.Image.Image, np.ndarray, torch.Tensor]:
        """The 4x output of an input of `size` (height, width) resampled to `outscale` with Lanczos."""
        if outscale is None:
            return image
        height, width = outscale_size(*size, outscale)
        if isinstance(image, PIL.Image.Image):  # a streamed 8-bit output: PIL's own Lanczos
            same = image.size == (width, height)
            return image if same else image.resize((width, height), PIL.Image.Resampling.LANCZOS)
        if isinstance(image, np.ndarray):  # a streamed uint16 (H, W, C) output: resampled in float32, as the others
            if image.shape[:2] == (height, width):
                return image
            floats = torch.from_numpy(image.astype(np.float32) / 65535).permute(2, 0, 1)
            return to_uint16(lanczos_resize(floats, height, width))
        return lanczos_resize(image, height, width)

    # ---------------------------------------------------------------------------------------------- saving, loading
    def save_pretrained(
        self,
        save_directory: str,
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        max_shard_size: Optional[Union[int, str]] = None,
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """Save like diffusers, plus the shims that let `DiffusionPipeline.from_pretrained` load the installed classes.

        With `push_to_hub=True` the folder (shims and model card included) is uploaded afterwards; `repo_id`,
        `token`, `private`, `commit_message` and `create_pr` are taken from `kwargs` as in diffusers.
        """
        hub_kwargs = {name: kwargs.pop(name, None) for name in ("repo_id", "token", "private", "commit_message")}
        create_pr = kwargs.pop("create_pr", False)
        super().save_pretrained(
            save_directory,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            push_to_hub=False,
            **kwargs,
        )
        write_shims(save_directory, type(self).__name__)
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id") or os.path.basename(os.path.normpath(save_directory))
            self._push_folder(save_directory, repo_id, create_pr=create_pr, **hub_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: Optional[str] = None,
    ):
        """Upload the pipeline in the layout `save_pretrained` writes (shims and model card included)."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            return self._push_folder(
                folder, repo_id, token=token, private=private, commit_message=commit_message, create_pr=create_pr
            )

    def _push_folder(
        self,
        folder: str,
        repo_id: str,
        token: Optional[str] = None,
        private: Optional[bool] = None,
        commit_message: Optional[str] = None,
        create_pr: bool = False,
    ):
        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        self.write_model_card(folder, repo_id, token=token)
        return self._upload_folder(folder, repo_id, token=token, commit_message=commit_message, create_pr=create_pr)

    def write_model_card(self, folder: str, repo_id: str, token: Optional[str] = None) -> None:
        """Write `README.md` into `folder` before it is pushed to `repo_id`: the one place where cards are made.

        The card comes from the templates in `model_cards/` ([`~model_cards.pipeline_card`]): configuration, kept
        layers and parameter counts from this pipeline, the SD3 licence notice and the Hub metadata. An existing card
        of the repo is kept, as in diffusers.
        """
        pipeline_card(self, repo_id, token=token).save(os.path.join(folder, "README.md"))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs):
        r"""
        Load a pipeline folder or Hub repo saved by `save_pretrained`, with the installed classes.

        Without `trust_remote_code`, the folder is trusted only if every `.py` file in it is one of the shims that
        `save_pretrained` writes, byte for byte (they only import the installed `tinysr_diffusers`); anything else
        raises [`~hub.pipeline_folders.UntrustedFolderError`]. For a Hub repo only its code files are fetched first, checked,
        and the load is pinned to that commit. Other arguments are those of `DiffusionPipeline.from_pretrained`
        (`torch_dtype`, `revision`, `variant`, ...).
        """
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path) and looks_like_a_path(path):  # not a Hub failure: say which folder is missing
            raise FileNotFoundError(f"No such folder: {path} (it reads as a local path, not a Hub repo id org/name).")
        if kwargs.get("trust_remote_code") or kwargs.get("custom_pipeline") is not None:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if os.path.isdir(path):
            folder = path
        else:
            hub_kwargs = {
                name: kwargs[name]
                for name in ("cache_dir", "token", "local_files_only", "force_download", "proxies")
                if name in kwargs
            }
            folder, kwargs["revision"] = fetch_code_files(path, revision=kwargs.get("revision"), **hub_kwargs)
        index = verify_shims(folder)
        cls._check_pipeline_class(index, folder)
        kwargs["trust_remote_code"] = True  # the only code in the folder imports the installed package
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _check_pipeline_class(cls, index: dict, folder: str) -> None:
        class_name = index.get("_class_name")
        class_name = class_name[1] if isinstance(class_name, list) else class_name
        pipelines = {sub.__name__ for sub in _subclasses(OneStepSRPipeline)}
        if cls is OneStepSRPipeline:
            if class_name not in pipelines:
                raise ValueError(f"{folder}/{MODEL_INDEX} names {class_name!r}, not one of {sorted(pipelines)}.")
        elif class_name != cls.__name__:
            raise ValueError(
                f"{folder} holds a {class_name}, not a {cls.__name__}: load it with {class_name}.from_pretrained "
                "or DiffusionPipeline.from_pretrained(..., trust_remote_code=True)."
            )


def _subclasses(cls: type) -> set[type]:
    direct = set(cls.__subclasses__())
    return direct.union(*(_subclasses(sub) for sub in direct))
