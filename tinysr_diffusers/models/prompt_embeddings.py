"""The fixed text conditioning of a one-step SR transformer, stored as a pipeline component.

TSD-SR runs SD3 with the embeddings of one default prompt at every call. Keeping them as a small `ModelMixin`
component means they are saved, loaded, cast and moved with the pipeline like any model (`prompt_embeddings/` holds a
safetensors file and a config), and no text encoder is needed at inference.
"""

from typing import Optional

import torch

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


# The default prompt of the TSD-SR and TinySR releases.
DEFAULT_SR_PROMPT = (
    "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera, hyper detailed photo - realistic "
    "maximum detail, 32k, Color Grading, ultra HD, extrememeticulous detailing, skin pore detailing, hyper sharpness, "
    "perfect without deformations."
)


class PromptEmbeddings(ModelMixin, ConfigMixin):
    r"""
    One prompt's SD3 embeddings: `prompt_embeds` (num_tokens, joint_attention_dim) and `pooled_prompt_embeds`
    (pooled_projection_dim,). `forward(batch_size)` returns them expanded to a batch.

    Parameters:
        num_tokens (`int`, defaults to `333`): Text tokens (SD3: 77 CLIP + 256 T5).
        joint_attention_dim (`int`, defaults to `4096`): Width of `prompt_embeds` (SD3's `joint_attention_dim`).
        pooled_projection_dim (`int`, defaults to `2048`): Width of `pooled_prompt_embeds`.
        prompt (`str`, *optional*): The prompt the embeddings were computed from (provenance only).
    """

    @register_to_config
    def __init__(
        self,
        num_tokens: int = 333,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 2048,
        prompt: Optional[str] = None,
    ):
        super().__init__()
        for name, value in (
            ("num_tokens", num_tokens),
            ("joint_attention_dim", joint_attention_dim),
            ("pooled_projection_dim", pooled_projection_dim),
        ):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
        self.register_buffer("prompt_embeds", torch.zeros(num_tokens, joint_attention_dim))
        self.register_buffer("pooled_prompt_embeds", torch.zeros(pooled_projection_dim))

    @classmethod
    def from_tensors(
        cls, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor, prompt: Optional[str] = None
    ) -> "PromptEmbeddings":
        """Wrap embeddings of shape (num_tokens, dim) or (1, num_tokens, dim) and (dim,) or (1, dim)."""
        if prompt_embeds.ndim == 3 and prompt_embeds.shape[0] == 1:
            prompt_embeds = prompt_embeds[0]
        if pooled_prompt_embeds.ndim == 2 and pooled_prompt_embeds.shape[0] == 1:
            pooled_prompt_embeds = pooled_prompt_embeds[0]
        if prompt_embeds.ndim != 2 or pooled_prompt_embeds.ndim != 1:
            raise ValueError(
                "Expected prompt_embeds of shape (num_tokens, dim) and pooled_prompt_embeds of shape (dim,) for one "
                f"prompt, got {tuple(prompt_embeds.shape)} and {tuple(pooled_prompt_embeds.shape)}."
            )
        embeddings = cls(
            num_tokens=prompt_embeds.shape[0],
            joint_attention_dim=prompt_embeds.shape[1],
            pooled_projection_dim=pooled_prompt_embeds.shape[0],
            prompt=prompt,
        )
        embeddings.prompt_embeds = prompt_embeds.detach().clone()
        embeddings.pooled_prompt_embeds = pooled_prompt_embeds.detach().clone()
        return embeddings.eval()

    def forward(self, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds (batch, tokens, dim), pooled_prompt_embeds (batch, dim))."""
        return (
            self.prompt_embeds.expand(batch_size, -1, -1),
            self.pooled_prompt_embeds.expand(batch_size, -1),
        )
