"""TinySR transformer: the image stream of a depth-pruned SD3 transformer, without timestep or text.

TinySR's student runs one step at a fixed timestep with one fixed prompt, so everything that depends on the timestep
and the text (`time_text_embed`, `context_embedder`, every block's adaLN linears, the context stream) collapses to
constants. This model keeps the image-stream modules of the kept SD3 blocks under diffusers' own names and stores
those constants as buffers (`modulation` per block, `norm_out_modulation`); `fold_modulation()` goes one step
further and folds them into the adjacent linear weights.
"""

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from diffusers.utils import logging


logger = logging.get_logger(__name__)

# Order of the cached adaLN chunks, as SD3's AdaLayerNormZero / SD35AdaLayerNormZeroX produce them.
MODULATION_CHUNKS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
DUAL_MODULATION_CHUNKS = MODULATION_CHUNKS + ("shift_msa2", "scale_msa2", "gate_msa2")
SUPPORTED_QK_NORMS = (None, "rms_norm", "layer_norm")


def _identity_modulation(chunks: Sequence[str], dim: int) -> torch.Tensor:
    """Zero shift/scale and unit gate: an unconditioned block is a plain pre-LN transformer block."""
    return torch.stack([torch.ones(dim) if name.startswith("gate") else torch.zeros(dim) for name in chunks])


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


@torch.no_grad()
def _fold_input_modulation(linear: nn.Linear, shift: torch.Tensor, scale: torch.Tensor) -> None:
    """`linear(x * (1 + scale) + shift)` == `linear'(x)` with W' = W diag(1 + scale), b' = b + W shift."""
    weight = linear.weight.double()
    linear.bias.copy_((linear.bias.double() + weight @ shift.double()).to(linear.bias.dtype))
    linear.weight.copy_((weight * (1 + scale.double())[None, :]).to(linear.weight.dtype))


@torch.no_grad()
def _fold_output_gate(linear: nn.Linear, gate: torch.Tensor) -> None:
    """`gate * linear(x)` == `linear'(x)` with W' = diag(gate) W, b' = gate * b."""
    linear.weight.copy_((linear.weight.double() * gate.double()[:, None]).to(linear.weight.dtype))
    linear.bias.copy_((linear.bias.double() * gate.double()).to(linear.bias.dtype))


class TinySRTransformerBlock(nn.Module):
    r"""
    Image stream of an SD3 `JointTransformerBlock` (self-attention over image tokens only) with cached modulation.

    Parameters:
        dim (`int`): Number of channels.
        num_attention_heads (`int`): Number of attention heads.
        attention_head_dim (`int`): Channels per head.
        qk_norm (`str`, *optional*): Query/key normalisation of SD3.5 (`"rms_norm"`), or `None`.
        use_dual_attention (`bool`): SD3.5's second self-attention (`attn2`) fed from the same pre-attention norm.
        modulation_folded (`bool`): Whether the modulation was folded into the linear weights (no buffer then).
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        qk_norm: Optional[str] = None,
        use_dual_attention: bool = False,
        modulation_folded: bool = False,
    ):
        super().__init__()
        self.use_dual_attention = use_dual_attention
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = self._self_attention(dim, num_attention_heads, attention_head_dim, qk_norm)
        self.attn2 = (
            self._self_attention(dim, num_attention_heads, attention_head_dim, qk_norm) if use_dual_attention else None
        )
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")
        chunks = DUAL_MODULATION_CHUNKS if use_dual_attention else MODULATION_CHUNKS
        if modulation_folded:
            self.modulation = None
        else:
            self.register_buffer("modulation", _identity_modulation(chunks, dim))

    @staticmethod
    def _self_attention(dim: int, heads: int, head_dim: int, qk_norm: Optional[str]) -> Attention:
        return Attention(
            query_dim=dim,
            dim_head=head_dim,
            heads=heads,
            out_dim=dim,
            bias=True,
            qk_norm=qk_norm,
            eps=1e-6,
            processor=AttnProcessor2_0(),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        norm_hidden_states = self.norm1(hidden_states)
        if self.modulation is None:  # folded into the linears
            attn_output = self.attn(norm_hidden_states)
            hidden_states = hidden_states + attn_output
            if self.attn2 is not None:
                hidden_states = hidden_states + self.attn2(norm_hidden_states)
            return hidden_states + self.ff(self.norm2(hidden_states))

        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, *dual = self.modulation.to(hidden_states.dtype)
        attn_output = self.attn(_modulate(norm_hidden_states, shift_msa, scale_msa))
        hidden_states = hidden_states + gate_msa * attn_output
        if self.attn2 is not None:
            shift_msa2, scale_msa2, gate_msa2 = dual
            attn_output2 = self.attn2(_modulate(norm_hidden_states, shift_msa2, scale_msa2))
            hidden_states = hidden_states + gate_msa2 * attn_output2
        ff_output = self.ff(_modulate(self.norm2(hidden_states), shift_mlp, scale_mlp))
        return hidden_states + gate_mlp * ff_output

    def fold_modulation(self) -> None:
        """Fold the cached modulation into `attn`, `attn2` and `ff` weights and drop the buffer."""
        if self.modulation is None:
            return
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, *dual = self.modulation
        attentions = [(self.attn, shift_msa, scale_msa, gate_msa)]
        if self.attn2 is not None:
            attentions.append((self.attn2, *dual))
        for attn, shift, scale, gate in attentions:
            for projection in (attn.to_q, attn.to_k, attn.to_v):
                _fold_input_modulation(projection, shift, scale)
            _fold_output_gate(attn.to_out[0], gate)
        _fold_input_modulation(self.ff.net[0].proj, shift_mlp, scale_mlp)
        _fold_output_gate(self.ff.net[2], gate_mlp)
        del self.modulation
        self.modulation = None


class TinySRTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    The TinySR student transformer: `latents -> velocity` in one call, no timestep, no text.

    Built from an SD3 transformer with [`~TinySRTransformer2DModel.from_sd3`]; its output equals the SD3 model's at
    the cached timestep and pooled embedding, with a zero-length text context and the pruned layers skipped.

    Parameters:
        sample_size (`int`, defaults to `128`): Latent size the position embedding was trained at.
        patch_size (`int`, defaults to `2`): Patch size of the patch embedding.
        in_channels (`int`, defaults to `16`): Latent channels in.
        out_channels (`int`, *optional*): Latent channels out (defaults to `in_channels`).
        num_layers (`int`, defaults to `12`): Number of kept transformer blocks.
        attention_head_dim (`int`, defaults to `64`): Channels per head.
        num_attention_heads (`int`, defaults to `24`): Heads per block.
        pos_embed_max_size (`int`, defaults to `192`): Side, in patches, of the stored position-embedding grid; any
            latent up to `pos_embed_max_size * patch_size` per side is accepted (centre crop, as in SD3).
        qk_norm (`str`, *optional*): `None` (SD3) or `"rms_norm"` (SD3.5).
        dual_attention_layers (`tuple[int]`): Indices (in this model) of blocks with SD3.5's second attention.
        source_layers (`tuple[int]`, *optional*): Index of each kept block in the source SD3 model (provenance).
        modulation_folded (`bool`, defaults to `False`): Whether the modulation is folded into the weights.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["TinySRTransformerBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        *,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        out_channels: Optional[int] = None,
        num_layers: int = 12,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        pos_embed_max_size: int = 192,
        qk_norm: Optional[str] = None,
        dual_attention_layers: Sequence[int] = (),
        source_layers: Optional[Sequence[int]] = None,
        modulation_folded: bool = False,
    ):
        super().__init__()
        self._check_config()
        self.out_channels = out_channels if out_channels is not None else in_channels
        self.inner_dim = num_attention_heads * attention_head_dim
        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=self.inner_dim,
            pos_embed_max_size=pos_embed_max_size,
        )
        self.transformer_blocks = nn.ModuleList(
            [
                TinySRTransformerBlock(
                    dim=self.inner_dim,
                    num_attention_heads=num_attention_heads,
                    attention_head_dim=attention_head_dim,
                    qk_norm=qk_norm,
                    use_dual_attention=i in dual_attention_layers,
                    modulation_folded=modulation_folded,
                )
                for i in range(num_layers)
            ]
        )
        self.norm_out = nn.LayerNorm(self.inner_dim, elementwise_affine=False, eps=1e-6)
        if modulation_folded:
            self.norm_out_modulation = None
        else:  # (scale, shift), the order of SD3's AdaLayerNormContinuous
            self.register_buffer("norm_out_modulation", torch.zeros(2, self.inner_dim))
        self.proj_out = nn.Linear(self.inner_dim, patch_size * patch_size * self.out_channels, bias=True)
        self.gradient_checkpointing = False

    def _check_config(self) -> None:
        config = self.config
        positive = (
            "sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
            "pos_embed_max_size",
        )
        for name in positive:
            if not isinstance(config[name], int) or config[name] < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {config[name]!r}.")
        if config.out_channels is not None and (not isinstance(config.out_channels, int) or config.out_channels < 1):
            raise ValueError(f"`out_channels` must be a positive integer or None, got {config.out_channels!r}.")
        if config.qk_norm not in SUPPORTED_QK_NORMS:
            raise ValueError(f"`qk_norm` must be one of {SUPPORTED_QK_NORMS}, got {config.qk_norm!r}.")
        bad = [i for i in config.dual_attention_layers if not 0 <= i < config.num_layers]
        if bad:
            raise ValueError(f"`dual_attention_layers` {bad} out of range for num_layers={config.num_layers}.")
        if config.source_layers is not None and len(config.source_layers) != config.num_layers:
            raise ValueError(
                f"`source_layers` has {len(config.source_layers)} entries but num_layers={config.num_layers}."
            )

    @classmethod
    @torch.no_grad()
    def from_sd3(
        cls,
        transformer: SD3Transformer2DModel,
        keep_layers: Optional[Sequence[int]] = None,
        timestep: float = 1000.0,
        pooled_projections: Optional[torch.Tensor] = None,
    ) -> "TinySRTransformer2DModel":
        r"""
        Build a student from any `SD3Transformer2DModel` (SD3, SD3.5, fine-tunes), keeping `keep_layers`.

        The modulation of every kept block and of `norm_out` is computed from
        `transformer.time_text_embed(timestep, pooled_projections)` and cached. LoRA adapters on the source must be
        merged first: the adaLN and time-embedding linears they may touch are evaluated here, once.

        Args:
            transformer: The source model, on any device (the `meta` device too, for counting).
            keep_layers: Indices of the blocks to keep (default: all).
            timestep: The one timestep the student runs at (TinySR: 1000).
            pooled_projections: Pooled text embedding (`pooled_projection_dim`,) or (1, dim) of the fixed prompt;
                zeros if not given.
        """
        if not isinstance(transformer, SD3Transformer2DModel):
            raise TypeError(f"`transformer` must be an SD3Transformer2DModel, got {type(transformer).__name__}.")
        unmerged = [name for name in transformer.state_dict() if "lora_" in name or ".base_layer." in name]
        if unmerged:
            raise ValueError(
                "The source transformer carries unmerged LoRA weights (e.g. "
                f"{unmerged[0]!r}); merge them first (`fuse_lora()` + `unload_lora()`, or peft `merge_and_unload()`) "
                "because the modulation is cached from the merged adaLN and time-embedding weights."
            )
        config = transformer.config
        keep = _check_keep_layers(keep_layers, config.num_layers)
        device, dtype = transformer.device, transformer.dtype

        if pooled_projections is None:
            logger.warning("No `pooled_projections` given: caching the modulation for a zero pooled embedding.")
            pooled_projections = torch.zeros(config.pooled_projection_dim)
        pooled = pooled_projections.reshape(-1)
        if pooled.numel() != config.pooled_projection_dim:
            raise ValueError(
                f"`pooled_projections` must hold {config.pooled_projection_dim} values, got shape "
                f"{tuple(pooled_projections.shape)}."
            )
        pooled = pooled.to(device=device, dtype=dtype)[None]
        temb = transformer.time_text_embed(torch.tensor([timestep], device=device, dtype=dtype), pooled)

        with torch.device("meta"):  # every tensor comes from the source below, in its dtype and device
            student = cls(
                sample_size=config.sample_size,
                patch_size=config.patch_size,
                in_channels=config.in_channels,
                out_channels=config.out_channels,
                num_layers=len(keep),
                attention_head_dim=config.attention_head_dim,
                num_attention_heads=config.num_attention_heads,
                pos_embed_max_size=config.pos_embed_max_size,
                qk_norm=config.qk_norm,
                dual_attention_layers=tuple(i for i, layer in enumerate(keep) if layer in config.dual_attention_layers),
                source_layers=tuple(keep),
            )

        source = transformer.state_dict()
        state_dict = {}
        for name in student.state_dict():
            if name.endswith("modulation"):
                continue
            if name.startswith("transformer_blocks."):
                _, index, rest = name.split(".", 2)
                name_in_source = f"transformer_blocks.{keep[int(index)]}.{rest}"
            else:
                name_in_source = name
            state_dict[name] = source[name_in_source].clone()
        for index, layer in enumerate(keep):
            norm1 = transformer.transformer_blocks[layer].norm1
            state_dict[f"transformer_blocks.{index}.modulation"] = norm1.linear(F.silu(temb)).reshape(-1, student.inner_dim)
        state_dict["norm_out_modulation"] = transformer.norm_out.linear(F.silu(temb)).reshape(2, student.inner_dim)
        student.load_state_dict(state_dict, strict=True, assign=True)
        return student.eval()

    def fold_modulation(self) -> "TinySRTransformer2DModel":
        """Fold every cached (1 + scale), shift and gate into the adjacent linear weights (exact up to rounding).

        Each block becomes a plain pre-LN transformer block. Merge LoRA adapters first.
        """
        if self.config.modulation_folded:
            return self
        if any(".base_layer." in name or "lora_" in name for name in self.state_dict()):
            raise ValueError("Merge or unload LoRA adapters before folding the modulation into the weights.")
        for block in self.transformer_blocks:
            block.fold_modulation()
        scale, shift = self.norm_out_modulation
        _fold_input_modulation(self.proj_out, shift, scale)
        del self.norm_out_modulation
        self.norm_out_modulation = None
        self.register_to_config(modulation_folded=True)
        return self

    def forward(
        self, hidden_states: torch.Tensor, return_dict: bool = True
    ) -> Union[torch.Tensor, Transformer2DModelOutput]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch, in_channels, height, width)`): Scaled latents `z_L`;
                height and width must be multiples of `patch_size` and at most `pos_embed_max_size * patch_size`.
            return_dict (`bool`): Return a `Transformer2DModelOutput` rather than a tuple.

        Returns:
            The predicted velocity `v`, with `z_H = z_L - v` (sigma = 1 at t = 1000).
        """
        if hidden_states.ndim != 4 or hidden_states.shape[1] != self.config.in_channels:
            raise ValueError(
                f"Expected latents of shape (batch, {self.config.in_channels}, height, width), "
                f"got {tuple(hidden_states.shape)}."
            )
        height, width = hidden_states.shape[-2:]
        patch_size = self.config.patch_size
        max_side = self.config.pos_embed_max_size * patch_size
        if height % patch_size or width % patch_size or height > max_side or width > max_side:
            raise ValueError(
                f"Latent size {height}x{width} must be a multiple of patch_size={patch_size} and at most {max_side} "
                "per side (pos_embed_max_size * patch_size); tile larger inputs."
            )
        hidden_states = self.pos_embed(hidden_states)
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, hidden_states)
            else:
                hidden_states = block(hidden_states)

        hidden_states = self.norm_out(hidden_states)
        if self.norm_out_modulation is not None:
            scale, shift = self.norm_out_modulation.to(hidden_states.dtype)
            hidden_states = _modulate(hidden_states, shift, scale)
        hidden_states = self.proj_out(hidden_states)

        height, width = height // patch_size, width // patch_size
        hidden_states = hidden_states.reshape(-1, height, width, patch_size, patch_size, self.out_channels)
        hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
        output = hidden_states.reshape(-1, self.out_channels, height * patch_size, width * patch_size)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)


def _check_keep_layers(keep_layers: Optional[Sequence[int]], num_layers: int) -> list[int]:
    if keep_layers is None:
        return list(range(num_layers))
    if any(isinstance(layer, bool) or int(layer) != layer for layer in keep_layers):
        raise ValueError(f"`keep_layers` must be layer indices (integers), got {list(keep_layers)}.")
    keep = [int(layer) for layer in keep_layers]
    if not keep:
        raise ValueError("`keep_layers` is empty: keep at least one block.")
    if len(set(keep)) != len(keep):
        raise ValueError(f"`keep_layers` has duplicates: {keep}.")
    bad = [layer for layer in keep if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"`keep_layers` {bad} out of range for a transformer with {num_layers} layers.")
    return sorted(keep)
