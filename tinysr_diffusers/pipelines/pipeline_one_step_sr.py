"""What the TinySR student and the TSD-SR teacher pipelines share: the one-step 4x SR recipe, run in one way.

The recipe (docs/method.md, "One-step super-resolution"): LR image in [0, 1] -> bicubic x4 in torch -> reflect-pad
to what the VAE and the patch size need -> [-1, 1] -> `z_L = (encode(x) - shift) * scaling_factor` ->
`z_H = z_L - sigma * v` with sigma(t=1000) = 1 -> `decode(z_H / scaling_factor + shift)` -> crop back to exactly 4x
-> clamp -> colour fix against the LR image. `__call__` runs it as numbered steps, each a public method (or function)
that training, pruning and subclasses reuse; subclasses only say how the velocity `v` is predicted.

The recipe is streamed: a tiny VAE encodes tiles made on demand from the LR image, decodes tile by tile into bands
of rows, and each band is colour-fixed and written into the output as it is finished, so that no full-resolution
float image is made. An image of one tile (or an untiled call, or a VAE that tiles itself) is the one-band case.
"""

import copy
import functools
import math
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import numpy as np
import PIL.Image
import torch

from diffusers import AutoencoderKL, AutoencoderTiny
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput

from ..color_fix import check_color_fix, color_fixed_bands
from ..hub.pipeline_hub import PipelineHubMixin
from ..image_processing import (
    OUTPUT_TYPES,
    PipelineImageInput,
    UpscaledPixels,
    check_outscale,
    group_by_size,
    images_from_bands,
    postprocess,
    resample,
    to_tensors,
)
from ..models import TinySRAutoencoder
from ..tiling import MIN_TILE_SIZE, PassesProgress, TileSettings, tiled_map, tiled_rows


SUPPORTED_VAES = (TinySRAutoencoder, AutoencoderTiny, AutoencoderKL)
DEFAULT_TILES = TileSettings()

Output = Union[PIL.Image.Image, np.ndarray, torch.Tensor]


def step_latents(latents: torch.Tensor, velocity: torch.Tensor, sigma: float) -> torch.Tensor:
    """The one step of the recipe: the clean latents `z_H = z_L - sigma * v` (flow matching, sigma = t / 1000)."""
    return latents - sigma * velocity


class OneStepSRPipeline(PipelineHubMixin, DiffusionPipeline):
    r"""
    Base class of the one-step 4x super-resolution pipelines ([`TinySRPipeline`], [`TSDSRPipeline`]).

    It runs the shared recipe in `__call__` (any image size, batches, latent tiling with Gaussian blending plus VAE
    tiling, colour fix) and saves folders that `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`,
    this class's own `from_pretrained` (no flag needed) and `AutoModel` load with the installed classes
    ([`~hub.pipeline_hub.PipelineHubMixin`]). Subclasses implement `predict_velocity`.
    """

    upscale_factor = 4
    timestep = 1000.0  # the one timestep of the one-step model
    sigma = 1.0  # flow-matching sigma at t = 1000: z_H = z_L - sigma * v

    # --------------------------------------------------------------------------------------------------- components
    def register_modules(self, **kwargs) -> None:
        """Register components as diffusers does, refusing a config that holds NaN or an infinity (a NaN
        `scaling_factor` would turn every image black)."""
        for name, module in kwargs.items():
            config = getattr(module, "config", None)
            found = _first_non_finite(config) if isinstance(config, Mapping) else None
            if found:
                folder = config.get("_name_or_path")
                where = f"{folder}/config.json" if folder else f"The {name}'s config"
                raise ValueError(f"{where}: `{found[0]}` is {found[1]}; a model's config must hold finite numbers.")
        super().register_modules(**kwargs)

    def _register(
        self, transformer_class: type, *, use_shift_factor: bool, color_fix: Optional[str], **components
    ) -> None:
        """Check and register the components (a `transformer_class` transformer, a supported VAE, any others) and
        the settings that every torch pipeline saves."""
        check_color_fix(color_fix)
        transformer, vae = components["transformer"], components["vae"]
        if not isinstance(transformer, transformer_class):
            raise TypeError(f"`transformer` must be a {transformer_class.__name__}, got {type(transformer).__name__}.")
        if not isinstance(vae, SUPPORTED_VAES):
            names = ", ".join(cls.__name__ for cls in SUPPORTED_VAES)
            raise TypeError(f"`vae` must be one of {names}, got {type(vae).__name__}.")
        self.register_modules(**components)
        self.register_to_config(use_shift_factor=use_shift_factor, color_fix=color_fix)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel of the VAE (8 for all supported VAEs with their default configs)."""
        if isinstance(self.vae, AutoencoderKL):
            return 2 ** (len(self.vae.config.block_out_channels) - 1)
        return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    @property
    def max_latent_size(self) -> int:
        """The largest latent side the transformer takes in one piece (its position-embedding grid)."""
        return self.transformer.config.pos_embed_max_size * self.patch_size

    @property
    def latent_scale(self) -> float:
        """The VAE's `scaling_factor`: z = (latents - shift) * scale."""
        return self.vae.config.scaling_factor

    @property
    def latent_shift(self) -> float:
        # The TSD-SR/TinySR releases use no shift factor even with SD3's VAE (whose config has 0.0609).
        return (self.vae.config.shift_factor or 0.0) if self.config.use_shift_factor else 0.0

    @property
    def default_color_fix(self) -> Optional[str]:
        """The colour fix of a call's `color_fix="default"`: the pipeline's own (saved with it), else AdaIN."""
        return self.config.get("color_fix", "adain")

    # ------------------------------------------------------------------------------------ how the models run
    def predict_velocity(self, latents: torch.Tensor, transformer: Optional[torch.nn.Module] = None) -> torch.Tensor:
        """The velocity `v` for scaled latents `z_L` (a batch of images or of latent tiles), by `transformer`
        (default: the pipeline's; training passes its wrapped, e.g. DDP, copy)."""
        raise NotImplementedError

    def vae_encode(
        self, pixels: torch.Tensor, *, generator: Optional[torch.Generator] = None, sample_posterior: bool = True,
        tiles: Optional[TileSettings] = None,
    ) -> torch.Tensor:
        """Images in [-1, 1] -> the VAE's unscaled latents; `tiles` reach a VAE that tiles itself (`_vae_for`)."""
        vae = self._vae_for(tiles)
        if isinstance(vae, AutoencoderKL):
            posterior = vae.encode(pixels).latent_dist
            return posterior.sample(generator) if sample_posterior else posterior.mode()
        return vae.encode(pixels).latents

    def vae_decode(self, latents: torch.Tensor, *, tiles: Optional[TileSettings] = None) -> torch.Tensor:
        """The VAE's unscaled latents -> images in [-1, 1] (not clamped); `tiles` as for `vae_encode`."""
        return self._vae_for(tiles).decode(latents).sample

    def _tiles_vae(self, tiles: Optional[TileSettings]) -> bool:
        """Whether the VAE runs in this pipeline's tiles (streamed): tiled calls with a tiny VAE. An AutoencoderKL
        (diffusers tiles it its own way) and a VAE whose tiling the user enabled tile themselves."""
        vae_tiles_itself = isinstance(self.vae, AutoencoderKL) or getattr(self.vae, "use_tiling", False)
        return tiles is not None and tiles.size is not None and not vae_tiles_itself

    def _vae_for(self, tiles: Optional[TileSettings]):
        """The VAE to run with `tiles`: the pipeline's, or for a tiled call with an AutoencoderKL that the user has
        not tiled, a shallow copy (same weights and offload hooks) with diffusers' tiling in that geometry, so that
        the pipeline's VAE keeps the caller's settings, also while another call runs."""
        vae = self.vae
        if tiles is None or tiles.size is None or not isinstance(vae, AutoencoderKL) or vae.use_tiling:
            return vae
        tiled = copy.copy(vae)
        tiled.tile_sample_min_size = tiles.size * self.vae_scale_factor
        tiled.tile_latent_min_size = tiles.size
        tiled.tile_overlap_factor = tiles.overlap / tiles.size
        tiled.use_tiling = True
        return tiled

    # ------------------------------------------------------------------------------------------ steps of the recipe
    def check_inputs(
        self,
        *,
        output_type: str,
        color_fix: Optional[str],
        tile_size: Union[int, str, None],
        tile_overlap: int,
        tile_batch_size: int,
        outscale: Optional[float],
    ) -> None:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        check_color_fix(color_fix)
        check_outscale(outscale)
        if output_type == "latent" and outscale not in (None, self.upscale_factor):
            raise ValueError("`outscale` resamples images, so it cannot be used with `output_type='latent'`.")
        if tile_size not in (None, "auto") and (
            not isinstance(tile_size, int) or tile_size <= 0 or tile_size % self.patch_size
        ):
            raise ValueError(
                f"`tile_size` (latent pixels) must be a positive multiple of the patch size {self.patch_size}, "
                f"'auto' or None to disable tiling; got {tile_size!r}."
            )
        size = MIN_TILE_SIZE if tile_size == "auto" else tile_size  # "auto" tiles are at least the smallest
        TileSettings(size=size, overlap=tile_overlap, batch=tile_batch_size)  # refuses a wrong overlap or batch

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's latents -> the model's `z` (shifted, then scaled)."""
        return latents.sub(self.latent_shift).mul_(self.latent_scale)

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The model's `z` -> the VAE's latents."""
        return latents.div(self.latent_scale).add_(self.latent_shift)

    def encode_latents(
        self,
        pixels: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        sample_posterior: bool = True,
        *,
        tiles: Optional[TileSettings] = None,
        progress: Optional[Callable[[Iterable], Iterable]] = None,
    ) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents z_L.

        `pixels` is a tensor or an image made crop by crop (`UpscaledPixels`, whose tiles are made as they are
        encoded). With `tiles` the VAE is tiled with their geometry (`_tiles_vae`); `progress` wraps the tile batches.
        An `AutoencoderKL`'s posterior is sampled with `generator` (inference, as the releases do) or, with
        `sample_posterior=False`, its mode is taken (training: the latents the student's tiny encoder learns, see
        `training/latents.py`); the tiny VAEs are deterministic.
        """
        if self._tiles_vae(tiles):
            factor = self.vae_scale_factor
            tile, overlap = tiles.size * factor, tiles.overlap * factor
            latents = tiled_map(
                self.vae_encode, pixels, tile, overlap, scale=1 / factor, align=factor, progress=progress
            )
        else:
            height, width = pixels.shape[-2:]
            latents = self.vae_encode(
                pixels[..., :height, :width], generator=generator, sample_posterior=sample_posterior, tiles=tiles
            )
        return self.scale_latents(latents)

    def predict_tiled_velocity(
        self,
        latents: torch.Tensor,
        *,
        tiles: Optional[TileSettings] = None,
        progress: Optional[Callable[[Iterable], Iterable]] = None,
    ) -> torch.Tensor:
        """`predict_velocity` for `latents`: whole, or in latent tiles blended with the releases' Gaussian weights,
        `tiles.batch` at a time. `progress` wraps the tile batches (default: a progress bar of their own)."""
        if tiles is None or tiles.size is None:
            return self.predict_velocity(latents)
        return tiled_map(
            self.predict_velocity,
            latents,
            tiles.size,
            tiles.overlap,
            align=self.patch_size,
            tiles_per_batch=tiles.batch,
            blend="gaussian",
            progress=progress or self.progress_bar,
        )

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents z_H -> images in [-1, 1] (not clamped), whole (training; `decode_bands` for images)."""
        return self.vae_decode(self.unscale_latents(latents))

    def decode_bands(
        self,
        latents: torch.Tensor,
        *,
        size: tuple[int, int],
        tiles: Optional[TileSettings] = None,
        progress: Optional[Callable[[Iterable], Iterable]] = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Scaled latents z_H -> the image in [0, 1], cropped to `size` (height, width), in bands of rows (first row,
        (B, 3, n, W) float32) top to bottom: tile by tile where the VAE runs in this pipeline's tiles (a band as
        soon as no later tile reaches it), else one band. A band holding NaN or an infinity is an error."""
        height, width = size
        latents = self.unscale_latents(latents.to(self.vae.dtype))
        if self._tiles_vae(tiles):
            factor = self.vae_scale_factor
            bands = tiled_rows(self.vae_decode, latents, tiles.size, tiles.overlap, scale=factor, progress=progress)
        else:
            bands = iter([(0, self.vae_decode(latents, tiles=tiles))])
        for top, rows in bands:
            _check_finite(rows, "decoding", getattr(self.vae, "decoder", None), self.vae)
            rows = rows[..., : max(0, height - top), :width].float()
            if rows.shape[-2]:
                yield top, rows.clamp_(-1, 1).add_(1).div_(2)  # in place: each band is a fresh tensor

    @torch.no_grad()
    def upscale(
        self,
        low_res: torch.Tensor,
        *,
        tiles: Optional[TileSettings] = None,
        output_type: str = "pt",
        color_fix: Optional[str] = None,
        generator: Optional[torch.Generator] = None,
        alphas: Optional[list[Optional[torch.Tensor]]] = None,
        channels: Optional[list[int]] = None,
    ) -> list[Output]:
        """Steps 3 to 8 of `__call__` for a batch of same-size RGB images (B, 3, h, w) in [0, 1] on the execution
        device, with checked arguments: one 4x output per image, in the layout `channels` (1 to 4 each, default 3)
        with the (1, h, w) `alphas` upscaled bicubically. Outputs are (C, H, W) float32 tensors, or for several bands
        uint8 PIL images ("pil") and uint16 (H, W, C) arrays ("uint16"); or the latents z_H ("latent")."""
        batch = low_res.shape[0]
        scale = self.upscale_factor
        size = (low_res.shape[-2] * scale, low_res.shape[-1] * scale)
        pixels = UpscaledPixels(low_res, scale, self.vae_scale_factor * self.patch_size, self.vae.dtype)
        with PassesProgress(self.progress_bar) as progress:  # one bar over the tiled passes of the image
            # 3. Encode the bicubic upscale (made tile by tile)
            latents = self.encode_latents(pixels, generator, tiles=tiles, progress=progress)
            _check_finite(latents, "encoding", getattr(self.vae, "encoder", None), self.vae)
            latents = latents.to(self.transformer.dtype)

            # 4. Predict the velocity
            velocity = self.predict_tiled_velocity(latents, tiles=tiles, progress=progress)

            # 5. Step to the clean latents
            latents = step_latents(latents, velocity, self.sigma)
            del velocity
            _check_finite(latents, "predicting the velocity", self.transformer)
            if output_type == "latent":
                return list(latents)

            # 6. Decode, in bands of rows (the latents are freed with the last band)
            bands = self.decode_bands(latents, size=size, tiles=tiles, progress=progress)
            del latents

            # 7. Colour-fix each band against the LR image
            bands = color_fixed_bands(bands, color_fix, low_res, scale)

            # 8. Postprocess: the input's channels, the output type
            return images_from_bands(
                bands,
                height=size[0],
                scale=scale,
                alphas=alphas if alphas is not None else [None] * batch,
                channels=channels if channels is not None else [3] * batch,
                output_type=output_type,
            )

    @torch.no_grad()
    def __call__(
        self,
        image: PipelineImageInput,
        *,
        output_type: str = "pil",
        color_fix: Optional[str] = "default",
        tile_size: Union[int, str, None] = DEFAULT_TILES.size,
        tile_overlap: int = DEFAULT_TILES.overlap,
        tile_batch_size: int = DEFAULT_TILES.batch,
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
        # 1. Check inputs
        color_fix = self.default_color_fix if color_fix == "default" else color_fix
        self.check_inputs(
            output_type=output_type,
            color_fix=color_fix,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            tile_batch_size=tile_batch_size,
            outscale=outscale,
        )

        # 2. Preprocess: RGB in [0, 1], in groups of one size; alpha and channel layout set aside
        images = to_tensors(image)
        outputs: list[Optional[Output]] = [None] * len(images)
        for group in group_by_size(images):
            size = self._auto_tile_size(group.size) if tile_size == "auto" else tile_size
            tiles = TileSettings(size=size, overlap=tile_overlap, batch=tile_batch_size)

            # 3.-8. Encode, predict, step, decode, colour-fix and postprocess (`upscale`); smaller tiles after a
            # CUDA out-of-memory error
            upscale = functools.partial(
                self.upscale,
                group.rgb.to(self._execution_device),
                output_type=output_type,
                color_fix=color_fix,
                generator=generator,
                alphas=group.alphas,
                channels=group.channels,
            )
            results = self._retry_out_of_memory(upscale, tiles, self._latent_side(group.size))

            # 9. Resample to `outscale`
            for index, result in zip(group.indices, results):
                outputs[index] = result if output_type == "latent" else resample(result, group.size, outscale)

        # 10. Offload all models, convert to `output_type`
        self.maybe_free_model_hooks()
        output = postprocess(outputs, output_type)
        if not return_dict:
            return (output,)
        return ImagePipelineOutput(images=output)

    # --------------------------------------------------------------------------------------- tile sizes and memory
    def _auto_tile_size(self, size: tuple[int, int]) -> int:
        """`tile_size="auto"`: on CUDA the whole latent image as one tile (at most the transformer's position grid,
        `max_latent_size`), which `_retry_out_of_memory` halves until it fits the free memory (the largest tile that
        fits, found by the allocator rather than by an estimate); elsewhere the releases' 64, as no out-of-memory error
        comes before the system starts swapping."""
        if self._execution_device.type != "cuda":
            return DEFAULT_TILES.size
        return min(self._latent_side(size), self.max_latent_size)

    def _latent_side(self, size: tuple[int, int]) -> int:
        """The longer side of the (padded) latents of an input of `size` (height, width)."""
        multiple = self.vae_scale_factor * self.patch_size
        return max(-(-side * self.upscale_factor // multiple) * multiple for side in size) // self.vae_scale_factor

    def _retry_out_of_memory(self, run: Callable[..., list], tiles: TileSettings, latent_side: int) -> list:
        """`run(tiles=tiles)`, retried after a CUDA out-of-memory error with half the tile batch, then half the tile
        (`TileSettings.halved`), with a warning, as ComfyUI's tiled upscaler."""
        while True:
            try:
                return run(tiles=tiles)
            except torch.cuda.OutOfMemoryError:
                smaller = tiles.halved(latent_side, self.patch_size)
                if smaller is None:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                warnings.warn(
                    f"Out of memory with tile_size={tiles.size}, tile_batch_size={tiles.batch}: retrying with "
                    f"tile_size={smaller.size}, tile_overlap={smaller.overlap}, tile_batch_size={smaller.batch}.",
                    RuntimeWarning,
                    stacklevel=4,  # the caller of __call__ (through torch.no_grad's wrapper)
                )
                tiles = smaller


def _first_non_finite(value: Any, key: str = "") -> Optional[tuple[str, float]]:
    """The first (key, value) of a config whose value is a float that is not finite, looking into lists and dicts."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (key, value)
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for inner_key, inner in items:
        found = _first_non_finite(inner, f"{key}[{inner_key}]" if key else str(inner_key))
        if found:
            return found
    return None


def _model_source(model: Any) -> Optional[str]:
    """Where a model was loaded from: an exported graph's path, or the folder of a diffusers model."""
    config = getattr(model, "config", None)
    return getattr(model, "path", None) or (config.get("_name_or_path") if isinstance(config, Mapping) else None)


def _check_finite(tensor: torch.Tensor, doing: str, *models: Any) -> None:
    """Raise `FloatingPointError` if a model's output holds NaN or an infinity (which would become black pixels),
    naming the first of `models` whose file or folder is known. A tensor on the meta device (operation counts) has
    no values to check."""
    if not tensor.is_meta and not torch.isfinite(tensor).all():
        source = next(filter(None, map(_model_source, models)), None) or type(models[-1]).__name__
        raise FloatingPointError(
            f"{source} gave NaN or infinite values while {doing}: its weights or config hold non-finite numbers."
        )
