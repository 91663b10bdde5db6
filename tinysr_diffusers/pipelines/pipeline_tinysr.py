"""TinySR: one-step 4x super-resolution with a depth-pruned, timestep- and text-free SD3 transformer."""

import os
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from diffusers import AutoencoderKL, AutoencoderTiny

from ..models import TinySRAutoencoder, TinySRTransformer2DModel
from .pipeline_one_step_sr import OneStepSRPipeline


if TYPE_CHECKING:
    from .pipeline_tsdsr import TSDSRPipeline


class TinySRPipeline(OneStepSRPipeline):
    r"""
    The TinySR student: `z_H = z_L - transformer(z_L)`, no timestep, no text.

    Parameters:
        transformer ([`TinySRTransformer2DModel`]): The pruned student transformer.
        vae ([`TinySRAutoencoder`], [`~diffusers.AutoencoderTiny`] or [`~diffusers.AutoencoderKL`]): The autoencoder
            of the SD3 latent space (the paper's tiny VAE, TAESD3, or SD3's own VAE).
        use_shift_factor (`bool`, defaults to `False`): Subtract the VAE's `shift_factor` from latents; the TinySR and
            TSD-SR releases do not.
        color_fix (`str`, *optional*, defaults to `"adain"`): The colour fix a call uses unless it names one (saved
            with the pipeline: a model ships with the fix it was measured with).

    Example:
        ```py
        >>> from tinysr_diffusers import TinySRPipeline
        >>> pipe = TinySRPipeline.from_pretrained()  # the default model shipped in the package
        >>> image = pipe(low_res_image).images[0]  # 4x the input size
        >>> from diffusers import DiffusionPipeline
        >>> pipe = DiffusionPipeline.from_pretrained("path/or/repo", trust_remote_code=True)
        ```
    """

    model_cpu_offload_seq = "transformer->vae"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Optional[Union[str, os.PathLike]] = None, **kwargs):
        """Like [`OneStepSRPipeline.from_pretrained`]; without a path, the default model shipped in the package
        (`tinysr_diffusers.DEFAULT_MODEL`), in float32 unless `dtype` (or its deprecated name `torch_dtype`) says
        otherwise (its transformer is stored in float16)."""
        if pretrained_model_name_or_path is None:
            from .. import DEFAULT_MODEL

            if not os.path.isfile(os.path.join(DEFAULT_MODEL, "model_index.json")):
                raise FileNotFoundError(
                    f"The default model is missing from this installation ({DEFAULT_MODEL}); reinstall "
                    "tinysr-diffusers, or pass a pipeline folder or Hub repo id."
                )
            pretrained_model_name_or_path = DEFAULT_MODEL
            if "torch_dtype" not in kwargs and "dtype" not in kwargs:
                kwargs["dtype"] = torch.float32
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def __init__(
        self,
        transformer: TinySRTransformer2DModel,
        vae: Union[TinySRAutoencoder, AutoencoderTiny, AutoencoderKL],
        use_shift_factor: bool = False,
        color_fix: Optional[str] = "adain",
    ):
        super().__init__()
        self._register(
            TinySRTransformer2DModel, transformer=transformer, vae=vae, use_shift_factor=use_shift_factor,
            color_fix=color_fix,
        )

    def predict_velocity(self, latents: torch.Tensor, transformer: Optional[torch.nn.Module] = None) -> torch.Tensor:
        """`transformer` (default: the pipeline's) on `z_L` alone: no timestep, no text."""
        return (transformer if transformer is not None else self.transformer)(latents).sample

    @classmethod
    def from_teacher(
        cls,
        teacher: "TSDSRPipeline",
        keep_layers: Optional[Sequence[int]],
        vae: Optional[Union[TinySRAutoencoder, AutoencoderTiny, AutoencoderKL]] = None,
    ) -> "TinySRPipeline":
        """A student from a teacher pipeline: its transformer pruned to `keep_layers`, text and timestep cached.

        The modulation is cached at t=1000 with the teacher's stored pooled prompt embedding
        ([`TinySRTransformer2DModel.from_sd3`]); `vae` defaults to the teacher's (shared, not copied).
        """
        transformer = TinySRTransformer2DModel.from_sd3(
            teacher.transformer,
            keep_layers,
            timestep=teacher.timestep,
            pooled_projections=teacher.prompt_embeddings.pooled_prompt_embeds,
        )
        return cls(
            transformer=transformer,
            vae=vae if vae is not None else teacher.vae,
            use_shift_factor=teacher.config.use_shift_factor,
        )
