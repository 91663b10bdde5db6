"""TinySR on onnxruntime: the folder `tinysr export onnx` writes, run through the torch pipeline's own recipe.

Only the three model calls differ from [`TinySRPipeline`]: `encode_latents`, `predict_velocity` and `decode_latents`
run ONNX sessions, so pre-processing, latent and VAE tiling (same geometry, same Gaussian blending), the step and the
colour fix are the base class's code. onnxruntime is imported when a folder is loaded, not with the package.
"""

import json
import os
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch

from ..onnx_export import CONFIG_NAME, MODEL_FILE
from ..tiling import tiled_map
from .pipeline_one_step_sr import OneStepSRPipeline


# The settings of `onnx_pipeline.json` that the pipeline's config takes (see `onnx_export.export_onnx`).
CONFIG_KEYS = ("scaling_factor", "latent_shift", "vae_scale_factor", "patch_size", "max_latent_size")

class OnnxModel:
    """An onnxruntime session called like the module it was exported from: one float32 tensor in, one out."""

    dtype = torch.float32  # what the base pipeline casts inputs to

    def __init__(self, path: str, providers: Optional[Sequence[str]] = None, session_options=None):
        import onnxruntime

        self.path = path
        self.session = onnxruntime.InferenceSession(
            path, sess_options=session_options, providers=list(providers or ["CPUExecutionProvider"])
        )
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, sample: torch.Tensor) -> torch.Tensor:
        inputs = {self.input_name: sample.detach().to("cpu", torch.float32).contiguous().numpy()}
        return torch.from_numpy(self.session.run(None, inputs)[0]).to(sample.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, providers={self.session.get_providers()})"


class OnnxAutoencoder:
    """The tiny VAE's exported encoder and decoder (raw: images in [-1, 1] <-> unscaled latents)."""

    dtype = torch.float32

    def __init__(self, encoder: OnnxModel, decoder: OnnxModel):
        self.encoder = encoder
        self.decoder = decoder

    def __repr__(self) -> str:
        return f"{type(self).__name__}(encoder={self.encoder!r}, decoder={self.decoder!r})"


class OnnxTinySRPipeline(OneStepSRPipeline):
    r"""
    TinySR exported to ONNX (`tinysr export onnx`), run with onnxruntime: the same `__call__` as [`TinySRPipeline`]
    (tiling included) and the same outputs up to float rounding, without PyTorch models.

    Parameters:
        transformer ([`OnnxModel`]): The exported transformer (scaled latents -> velocity).
        vae ([`OnnxAutoencoder`]): The exported tiny VAE encoder and decoder.
        scaling_factor (`float`): Latent scale of the VAE.
        latent_shift (`float`): Latent shift the source pipeline applied (0 for the releases).
        vae_scale_factor (`int`): Pixels per latent pixel (8).
        patch_size (`int`): Patch size of the transformer.
        max_latent_size (`int`): Largest latent side the transformer accepts (its position-embedding grid).

    Example:
        ```py
        >>> from tinysr_diffusers.pipelines.pipeline_onnx_tinysr import OnnxTinySRPipeline
        >>> pipe = OnnxTinySRPipeline.from_pretrained("tinysr-onnx")  # written by `tinysr export onnx`
        >>> image = pipe(low_res_image).images[0]
        ```
    """

    def __init__(
        self,
        transformer: OnnxModel,
        vae: OnnxAutoencoder,
        scaling_factor: float = 1.5305,
        latent_shift: float = 0.0,
        vae_scale_factor: int = 8,
        patch_size: int = 2,
        max_latent_size: int = 384,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae)
        self.register_to_config(
            scaling_factor=scaling_factor,
            latent_shift=latent_shift,
            vae_scale_factor=vae_scale_factor,
            patch_size=patch_size,
            max_latent_size=max_latent_size,
        )

    @property
    def vae_scale_factor(self) -> int:
        return self.config.vae_scale_factor

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @contextmanager
    def _vae_tiling(self, vae_tile: Optional[tuple[int, int]]) -> Iterator[None]:
        yield  # the sessions have no tiling state: `encode_latents` and `decode_latents` tile with `vae_tile`

    def encode_latents(
        self,
        pixels: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        vae_tile: Optional[tuple[int, int]] = None,
        sample_posterior: bool = True,
    ) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents z_L, tiled as `TinySRAutoencoder` tiles (the tiny VAE is
        deterministic: `generator` and `sample_posterior` are accepted for the base class's signature)."""
        encoder = self.vae.encoder
        if vae_tile is None:
            latents = encoder(pixels)
        else:
            factor = self.vae_scale_factor
            latents = tiled_map(encoder, pixels, vae_tile[0], vae_tile[1], scale=1 / factor, align=factor)
        return (latents - self.config.latent_shift) * self.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor, vae_tile: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Scaled latents z_H -> images in [-1, 1] (not clamped)."""
        latents = latents / self.config.scaling_factor + self.config.latent_shift
        if vae_tile is None:
            return self.vae.decoder(latents)
        factor = self.vae_scale_factor
        return tiled_map(self.vae.decoder, latents, vae_tile[0] // factor, vae_tile[1] // factor, scale=factor)

    def predict_velocity(self, latents: torch.Tensor, transformer: Optional[OnnxModel] = None) -> torch.Tensor:
        """The exported transformer on `z_L`; latents larger than its position-embedding grid need tiling."""
        limit = self.config.max_latent_size
        if max(latents.shape[-2:]) > limit:
            raise ValueError(
                f"Latent size {tuple(latents.shape[-2:])} exceeds the transformer's {limit} per side: pass a "
                "`tile_size` (the default 64 tiles any image)."
            )
        return (transformer if transformer is not None else self.transformer)(latents)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        providers: Optional[Sequence[str]] = None,
        session_options=None,
    ) -> "OnnxTinySRPipeline":
        """Load a folder written by `tinysr export onnx` (`export_onnx`), with onnxruntime `providers` (default: CPU)
        and `session_options` (an `onnxruntime.SessionOptions`, e.g. its `intra_op_num_threads`)."""
        folder = os.fspath(pretrained_model_name_or_path)
        config_path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}: write it with `tinysr export onnx`.")
        with open(config_path) as file:
            config = json.load(file)

        def session(name: str) -> OnnxModel:
            return OnnxModel(os.path.join(folder, name, MODEL_FILE), providers, session_options)

        return cls(
            transformer=session("transformer"),
            vae=OnnxAutoencoder(session("vae_encoder"), session("vae_decoder")),
            **{name: config[name] for name in CONFIG_KEYS},
        )

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Not supported: the folder is the export itself (`tinysr export onnx` writes it from a torch pipeline)."""
        raise NotImplementedError("Copy the exported folder, or export the torch pipeline again.")
