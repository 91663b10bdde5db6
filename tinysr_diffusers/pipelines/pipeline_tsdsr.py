"""TSD-SR, the teacher: SD3 (with its LoRA merged) run once at t=1000 on fixed prompt embeddings."""

from typing import Optional, Union

import torch
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from diffusers import AutoencoderKL, AutoencoderTiny, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

from ..models import TinySRAutoencoder
from ..models.prompt_embeddings import DEFAULT_SR_PROMPT, PromptEmbeddings
from .pipeline_one_step_sr import OneStepSRPipeline


TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")


class TSDSRPipeline(OneStepSRPipeline):
    r"""
    The TSD-SR teacher: `z_H = z_L - transformer(z_L, t=1000, prompt_embeds, pooled_prompt_embeds)`.

    The prompt embeddings (333 x 4096: 77 CLIP + 256 T5 tokens) and the pooled embedding (2048) of one prompt are a
    component (`prompt_embeddings/`), so inference needs no text encoder. Given SD3's text encoders and tokenizers,
    [`~TSDSRPipeline.set_prompt`] recomputes them with diffusers' `StableDiffusion3Pipeline.encode_prompt`.

    Parameters:
        transformer ([`~diffusers.SD3Transformer2DModel`]): SD3 transformer with the TSD-SR LoRA merged.
        vae ([`~diffusers.AutoencoderKL`]): SD3's VAE (the tiny VAEs are accepted too).
        prompt_embeddings ([`PromptEmbeddings`], *optional*): The fixed embeddings; computed from the releases'
            default prompt when omitted and the text encoders are given.
        text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3, tokenizer_3 (*optional*): SD3's CLIP-L,
            CLIP-G and T5 encoders and tokenizers, only needed to (re)compute the embeddings.
        use_shift_factor (`bool`, defaults to `False`): Subtract the VAE's `shift_factor`; the release does not.
        color_fix (`str`, *optional*, defaults to `"adain"`): The colour fix a call uses unless it names one (saved
            with the pipeline: a model ships with the fix it was measured with).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    _optional_components = ["prompt_embeddings", *TEXT_COMPONENTS]
    # A few MB of buffers and no parameters (accelerate's offload hook needs parameters): keep it on the device.
    _exclude_from_cpu_offload = ["prompt_embeddings"]

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        vae: Union[AutoencoderKL, TinySRAutoencoder, AutoencoderTiny],
        prompt_embeddings: Optional[PromptEmbeddings] = None,
        *,
        text_encoder: Optional[CLIPTextModelWithProjection] = None,
        tokenizer: Optional[CLIPTokenizer] = None,
        text_encoder_2: Optional[CLIPTextModelWithProjection] = None,
        tokenizer_2: Optional[CLIPTokenizer] = None,
        text_encoder_3: Optional[T5EncoderModel] = None,
        tokenizer_3: Optional[T5TokenizerFast] = None,
        use_shift_factor: bool = False,
        color_fix: Optional[str] = "adain",
    ):
        super().__init__()
        self._register(
            SD3Transformer2DModel,
            use_shift_factor=use_shift_factor,
            color_fix=color_fix,
            transformer=transformer,
            vae=vae,
            prompt_embeddings=prompt_embeddings,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
        if prompt_embeddings is None:
            if not self._has_text_encoders():
                raise ValueError(
                    "TSDSRPipeline needs `prompt_embeddings`, or SD3's text encoders and tokenizers to compute them."
                )
            prompt_embeddings = self._embed(DEFAULT_SR_PROMPT)
        self._check_prompt_embeddings(prompt_embeddings)
        # register again (not setattr): diffusers keeps a component registered as None at None in the config
        self.register_modules(prompt_embeddings=prompt_embeddings)

    def _check_prompt_embeddings(self, prompt_embeddings: PromptEmbeddings) -> None:
        if not isinstance(prompt_embeddings, PromptEmbeddings):
            raise TypeError(f"`prompt_embeddings` must be PromptEmbeddings, got {type(prompt_embeddings).__name__}.")
        config, expected = prompt_embeddings.config, self.transformer.config
        if (config.joint_attention_dim, config.pooled_projection_dim) != (
            expected.joint_attention_dim,
            expected.pooled_projection_dim,
        ):
            raise ValueError(
                f"Prompt embeddings of width {config.joint_attention_dim} (pooled {config.pooled_projection_dim}) do "
                f"not fit a transformer with joint_attention_dim={expected.joint_attention_dim} and "
                f"pooled_projection_dim={expected.pooled_projection_dim}."
            )

    def _has_text_encoders(self) -> bool:
        # T5 is optional in SD3 (its tokens are then zeros); both CLIP encoders are not.
        return all(getattr(self, name, None) is not None for name in TEXT_COMPONENTS[:4])

    def encode_prompt(self, prompt: str, max_sequence_length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """`prompt` -> (prompt_embeds (77 + max_sequence_length, dim), pooled_prompt_embeds (dim,)), computed by
        diffusers' `StableDiffusion3Pipeline.encode_prompt` with this pipeline's text encoders (no guidance)."""
        if not self._has_text_encoders():
            missing = [name for name in TEXT_COMPONENTS[:4] if getattr(self, name, None) is None]
            raise ValueError(f"Encoding a prompt needs SD3's text encoders and tokenizers; missing: {missing}.")
        sd3 = StableDiffusion3Pipeline(
            transformer=self.transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=None,
            **{name: getattr(self, name, None) for name in TEXT_COMPONENTS},
        )
        prompt_embeds, _, pooled_prompt_embeds, _ = sd3.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            device=self._execution_device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return prompt_embeds[0], pooled_prompt_embeds[0]

    def _embed(self, prompt: str) -> PromptEmbeddings:
        prompt_embeds, pooled_prompt_embeds = self.encode_prompt(prompt)
        return PromptEmbeddings.from_tensors(prompt_embeds, pooled_prompt_embeds, prompt=prompt)

    def set_prompt(self, prompt: str) -> None:
        """Recompute the stored embeddings from `prompt` (needs the text encoders); `save_pretrained` keeps them."""
        embeddings = self._embed(prompt)
        self._check_prompt_embeddings(embeddings)
        self.register_modules(prompt_embeddings=embeddings.to(self.transformer.device))

    def predict_velocity(self, latents: torch.Tensor, transformer: Optional[torch.nn.Module] = None) -> torch.Tensor:
        """`transformer` (default: the pipeline's) at t=1000 on the stored embeddings."""
        prompt_embeds, pooled_prompt_embeds = self.prompt_embeddings(latents.shape[0])
        timestep = torch.full((latents.shape[0],), self.timestep, device=latents.device, dtype=latents.dtype)
        return (transformer if transformer is not None else self.transformer)(
            hidden_states=latents,
            encoder_hidden_states=prompt_embeds.to(latents),
            pooled_projections=pooled_prompt_embeds.to(latents),
            timestep=timestep,
        ).sample
