"""Per-layer masks over the blocks of any SD3 transformer or TinySR student, through diffusers' own hooks.

For layer l with mask m_l (a number, or one per sample): `h_{l+1} = m_l * block_l(h_l) + (1 - m_l) * h_l`, applied to
the image stream and, for SD3's `JointTransformerBlock`, to the text stream too (the last, `context_pre_only`, block
returns no text stream: nothing reads it after that block). A layer whose mask is 0 for the whole batch is not
computed. Everything else is the model's own forward (`SD3Transformer2DModel` or `TinySRTransformer2DModel`): the
mask is applied by a diffusers `ModelHook` that wraps each block's forward, so LoRA adapters, gradient checkpointing
and state-dict names are untouched.
"""

import inspect
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Union

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from diffusers.utils import logging
from torch import nn

from tinysr_diffusers.models.transformer_tinysr import TinySRTransformer2DModel, TinySRTransformerBlock
from tinysr_diffusers.pipelines.pipeline_one_step_sr import step_latents


logger = logging.get_logger(__name__)

_HOOK_NAME = "tinysr_layer_mask"
MaskableTransformer = Union[SD3Transformer2DModel, TinySRTransformer2DModel]
MASKABLE_TYPES = (SD3Transformer2DModel, TinySRTransformer2DModel)
# observer(layer index, image-stream input, image-stream output of the block) for the similarity-based scores.
BlockObserver = Callable[[int, torch.Tensor, torch.Tensor], None]


class _MaskState:
    """What the hooks of one masked transformer share: the current mask and an optional observer."""

    def __init__(self):
        self.mask: Optional[torch.Tensor] = None  # (num_layers,) or (batch, num_layers)
        self.computed: Optional[list[bool]] = None
        self.observer: Optional[BlockObserver] = None


class LayerMaskHook(ModelHook):
    """Wraps one block: skips it, or mixes its output with its input by the layer's mask."""

    def __init__(self, state: _MaskState, index: int):
        super().__init__()
        self.state = state
        self.index = index

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self._signature = inspect.signature(type(module).forward)
        self._joint = isinstance(module, JointTransformerBlock)
        return module

    def new_forward(self, module: nn.Module, *args, **kwargs):
        arguments = self._signature.bind(module, *args, **kwargs).arguments
        hidden_states = arguments["hidden_states"]
        encoder_hidden_states = arguments.get("encoder_hidden_states")
        state = self.state
        if state.computed is not None and not state.computed[self.index]:
            return (encoder_hidden_states, hidden_states) if self._joint else hidden_states

        output = self.fn_ref.original_forward(*args, **kwargs)
        new_encoder_hidden_states, new_hidden_states = output if self._joint else (None, output)
        if state.observer is not None:
            state.observer(self.index, hidden_states, new_hidden_states)
        if state.mask is None:
            return output
        mask = state.mask[..., self.index].to(new_hidden_states.dtype).reshape(-1, 1, 1)
        new_hidden_states = mask * new_hidden_states + (1 - mask) * hidden_states
        if not self._joint:
            return new_hidden_states
        if new_encoder_hidden_states is not None:  # None after the last (`context_pre_only`) block
            new_encoder_hidden_states = mask * new_encoder_hidden_states + (1 - mask) * encoder_hidden_states
        return new_encoder_hidden_states, new_hidden_states


class MaskedTransformer(nn.Module):
    r"""
    A `latents -> velocity` view of an SD3 transformer or a TinySR student with per-layer masks.

    Installs a diffusers hook on every block of `transformer` (undo with [`~MaskedTransformer.remove`], or use it as
    a context manager). For an `SD3Transformer2DModel` the fixed conditioning of the one-step SR recipe is stored here
    and broadcast to the batch: text embeddings (default: a zero-length context, as the TinySR student runs), pooled
    embedding (default: zeros) and timestep (default 1000).

    Parameters:
        transformer (`SD3Transformer2DModel` or `TinySRTransformer2DModel`): The model; its weights are shared.
        encoder_hidden_states (`torch.Tensor`, *optional*): Prompt embeddings `(1 or T, ..., joint_attention_dim)`.
        pooled_projections (`torch.Tensor`, *optional*): Pooled prompt embedding with `pooled_projection_dim` values.
        timestep (`float`, defaults to `1000.0`): The timestep; the clean latents are `z - timestep / 1000 * v`.
        skip_masked_layers (`bool`, defaults to `True`): Do not compute a layer whose mask is 0 for the whole batch
            (the paper). With `False` every layer runs, so the straight-through gradient of a mask also reaches the
            gates through the layers it prunes (slower, but the gates then see what re-adding a layer would bring).
    """

    def __init__(
        self,
        transformer: MaskableTransformer,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        pooled_projections: Optional[torch.Tensor] = None,
        timestep: float = 1000.0,
        skip_masked_layers: bool = True,
    ):
        super().__init__()
        if not isinstance(transformer, MASKABLE_TYPES):
            raise TypeError(
                f"Expected an SD3Transformer2DModel or a TinySRTransformer2DModel, got {type(transformer).__name__}."
            )
        self.transformer = transformer
        self.is_sd3 = isinstance(transformer, SD3Transformer2DModel)
        self.timestep = float(timestep)
        self.skip_masked_layers = skip_masked_layers
        if self.is_sd3:
            config = transformer.config
            if encoder_hidden_states is None:
                encoder_hidden_states = torch.zeros(1, 0, config.joint_attention_dim)
            if encoder_hidden_states.ndim == 2:
                encoder_hidden_states = encoder_hidden_states[None]
            if encoder_hidden_states.shape[0] != 1 or encoder_hidden_states.shape[-1] != config.joint_attention_dim:
                raise ValueError(
                    f"`encoder_hidden_states` must have shape (1, tokens, {config.joint_attention_dim}), got "
                    f"{tuple(encoder_hidden_states.shape)}."
                )
            if pooled_projections is None:
                logger.warning("No `pooled_projections` given: conditioning the SD3 transformer on zeros.")
                pooled_projections = torch.zeros(config.pooled_projection_dim)
            if pooled_projections.numel() != config.pooled_projection_dim:
                raise ValueError(
                    f"`pooled_projections` must hold {config.pooled_projection_dim} values, got shape "
                    f"{tuple(pooled_projections.shape)}."
                )
            device, dtype = transformer.device, transformer.dtype
            self.register_buffer("encoder_hidden_states", encoder_hidden_states.to(device, dtype), persistent=False)
            self.register_buffer(
                "pooled_projections", pooled_projections.reshape(1, -1).to(device, dtype), persistent=False
            )
        elif encoder_hidden_states is not None or pooled_projections is not None:
            raise ValueError("A TinySRTransformer2DModel takes no text conditioning (it is cached in the model).")
        elif timestep != 1000.0:
            raise ValueError("A TinySRTransformer2DModel runs at the timestep it was built for; leave `timestep`.")

        self._state = _MaskState()
        for index, block in enumerate(self.blocks):
            if not isinstance(block, (JointTransformerBlock, TinySRTransformerBlock)):
                raise TypeError(f"Block {index} is a {type(block).__name__}, which layer masks do not support.")
        self._install()

    def _install(self) -> None:
        for index, block in enumerate(self.blocks):
            registry = HookRegistry.check_if_exists_or_initialize(block)
            registry.register_hook(LayerMaskHook(self._state, index), _HOOK_NAME)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.transformer_blocks

    @property
    def conditioning(self) -> dict:
        """The keyword arguments that rebuild this view's conditioning (empty for a TinySR student)."""
        if not self.is_sd3:
            return {}
        return dict(
            encoder_hidden_states=self.encoder_hidden_states,
            pooled_projections=self.pooled_projections,
            timestep=self.timestep,
        )

    @property
    def num_layers(self) -> int:
        return len(self.transformer.transformer_blocks)

    def remove(self) -> MaskableTransformer:
        """Remove the hooks and return the plain transformer."""
        for block in self.blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(_HOOK_NAME, recurse=False)
        return self.transformer

    @contextmanager
    def unmasked(self) -> Iterator[MaskableTransformer]:
        """The plain transformer, hooks removed for the duration (e.g. to copy it), then masked again."""
        self.remove()
        try:
            yield self.transformer
        finally:
            self._install()

    def __enter__(self) -> "MaskedTransformer":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def check_mask(self, layer_mask: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
        """Validate a mask of shape (num_layers,) or (batch, num_layers); returns it as a tensor."""
        layer_mask = torch.as_tensor(layer_mask)
        if layer_mask.ndim not in (1, 2) or layer_mask.shape[-1] != self.num_layers:
            raise ValueError(
                f"The layer mask has shape {tuple(layer_mask.shape)} but the transformer has {self.num_layers} "
                f"layers: give {self.num_layers} values, or (batch, {self.num_layers})."
            )
        if layer_mask.ndim == 2 and batch_size is not None and layer_mask.shape[0] != batch_size:
            raise ValueError(f"The layer mask has {layer_mask.shape[0]} rows for a batch of {batch_size}.")
        return layer_mask

    def forward(self, latents: torch.Tensor, layer_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            latents: `(batch, channels, height, width)` noisy (for TinySR: low-resolution) latents.
            layer_mask: `(num_layers,)` or `(batch, num_layers)` values in [0, 1]; `None` runs every layer unmasked.

        Returns:
            The predicted velocity, shaped like `latents`.
        """
        latents = latents.to(self.transformer.dtype)  # e.g. float32 cached latents into a bfloat16 model
        state = self._state
        if layer_mask is None:
            state.mask, state.computed = None, None
        else:
            layer_mask = self.check_mask(layer_mask, latents.shape[0]).to(latents.device)
            state.mask = layer_mask
            computed = (layer_mask != 0).reshape(-1, self.num_layers).any(dim=0)
            state.computed = computed.tolist() if self.skip_masked_layers else None
        if not self.is_sd3:
            return self.transformer(latents, return_dict=False)[0]
        batch = latents.shape[0]
        return self.transformer(
            latents,
            encoder_hidden_states=self.encoder_hidden_states.expand(batch, -1, -1),
            pooled_projections=self.pooled_projections.expand(batch, -1),
            timestep=torch.full((batch,), self.timestep, device=latents.device),
            return_dict=False,
        )[0]

    def predict_clean(self, latents: torch.Tensor, layer_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The one-step estimate of the clean latents (the pipelines' step), sigma = timestep / 1000 (TinySR: 1)."""
        return step_latents(latents, self(latents, layer_mask), self.timestep / 1000.0)

    @contextmanager
    def observe(self, observer: BlockObserver) -> Iterator[None]:
        """Call `observer(layer, h_in, h_out)` with the image stream around every computed block while active."""
        self._state.observer = observer
        try:
            yield
        finally:
            self._state.observer = None
