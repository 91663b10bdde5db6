"""TinySR autoencoder: TAESD topology with a choice of standard or depthwise-separable convolutions per side.

The paper makes the encoder depthwise-separable (its input is a 4x bicubic upscale, so the encoder runs at output
resolution and dominates the tiny VAE's cost) and keeps a standard decoder; the public release uses separable
convolutions on both sides. Module names follow diffusers' `AutoencoderTiny` (`encoder.layers.*`,
`decoder.layers.*`) and the release's separable layers (`depthwise`, `pointwise`), so both kinds of weights load 1:1.
"""

from typing import Optional, Sequence, Union

import torch
from torch import nn

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.activations import get_activation
from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput
from diffusers.models.autoencoders.vae import AutoencoderMixin, DecoderOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook

from ..tiling import tiled_map


CONV_TYPES = ("standard", "separable")


class SeparableConv2d(nn.Module):
    """Depthwise kxk convolution without bias followed by a pointwise 1x1 convolution (with `bias`)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = True
    ):
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, kernel_size, stride=stride, padding=padding, groups=in_channels, bias=False
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))

    @classmethod
    @torch.no_grad()
    def from_conv(cls, conv: nn.Conv2d) -> "SeparableConv2d":
        """The separable convolution closest to a standard one: for every input channel i the (out, k*k) slice
        `W[:, i]` is replaced by its best rank-1 approximation (SVD), `pointwise[:, i] * depthwise[i]`. Exact when
        each such slice has rank 1; otherwise only a starting point for distillation (on TAEF2's encoder the
        errors compound: the latents are far off until the separable encoder is trained)."""
        out_channels, in_channels, kernel, _ = conv.weight.shape
        separable = cls(in_channels, out_channels, kernel, conv.stride[0], conv.padding[0], bias=conv.bias is not None)
        slices = conv.weight.float().permute(1, 0, 2, 3).reshape(in_channels, out_channels, kernel * kernel)
        u, singular, v = torch.linalg.svd(slices, full_matrices=False)
        separable.depthwise.weight.copy_(v[:, 0].reshape(in_channels, 1, kernel, kernel))
        separable.pointwise.weight.copy_((u[:, :, 0] * singular[:, :1]).T.reshape(out_channels, in_channels, 1, 1))
        if conv.bias is not None:
            separable.pointwise.bias.copy_(conv.bias)
        return separable.to(conv.weight.dtype)


def make_conv(
    conv_type: str, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, bias: bool = True
) -> nn.Module:
    """A 'same'-padded convolution of the given type."""
    padding = kernel_size // 2
    if conv_type == "separable":
        return SeparableConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)


# Adapted from diffusers.models.unets.unet_2d_blocks.AutoencoderTinyBlock with nn.Conv2d->make_conv(conv_type, ...), plus TAEF2's pool branch
class TinySRAutoencoderBlock(nn.Module):
    """TAESD residual block: three 3x3 convolutions with activations, a skip, and a ReLU fuse.

    With `pool_channels` > 0 the block also carries TAEF2's `pool` branch (1x1 conv up to `pool_channels`,
    GroupNorm, ReLU, 1x1 conv back), added to the block input before the convolutions: a cheap per-pixel channel
    mixer that TAEF2 puts on its three lowest-resolution blocks.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        act_fn: str,
        conv_type: str,
        pool_channels: int = 0,
        pool_norm_groups: int = 4,
    ):
        super().__init__()
        self.pool = (
            nn.Sequential(
                nn.Conv2d(in_channels, pool_channels, 1, bias=False),
                nn.GroupNorm(pool_norm_groups, pool_channels),
                nn.ReLU(),
                nn.Conv2d(pool_channels, in_channels, 1, bias=False),
            )
            if pool_channels
            else None
        )
        self.conv = nn.Sequential(
            make_conv(conv_type, in_channels, out_channels),
            get_activation(act_fn),
            make_conv(conv_type, out_channels, out_channels),
            get_activation(act_fn),
            make_conv(conv_type, out_channels, out_channels),
        )
        self.skip = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
            if in_channels != out_channels
            else nn.Identity()
        )
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


# Adapted from diffusers.models.autoencoders.vae.EncoderTiny with nn.Conv2d->make_conv(conv_type, ...), per-block pool channels; no gradient checkpointing
class TinySREncoder(nn.Module):
    """Images in [-1, 1] -> latents at 1/2^(len(num_blocks)-1) resolution."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_blocks: Sequence[int],
        block_out_channels: Sequence[int],
        act_fn: str,
        conv_type: str,
        block_pool_channels: Sequence[int],
        pool_norm_groups: int,
    ):
        super().__init__()
        layers = []
        for i, num_block in enumerate(num_blocks):
            channels = block_out_channels[i]
            if i == 0:
                layers.append(make_conv(conv_type, in_channels, channels))
            else:
                layers.append(make_conv(conv_type, block_out_channels[i - 1], channels, stride=2, bias=False))
            layers.extend(
                TinySRAutoencoderBlock(channels, channels, act_fn, conv_type, block_pool_channels[i], pool_norm_groups)
                for _ in range(num_block)
            )
        layers.append(make_conv(conv_type, block_out_channels[-1], out_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.add(1).div(2))  # TAESD works on [0, 1]


# Adapted from diffusers.models.autoencoders.vae.DecoderTiny with nn.Conv2d->make_conv(conv_type, ...), per-block pool channels; no gradient checkpointing
class TinySRDecoder(nn.Module):
    """Latents -> images in [-1, 1], with TAESD's soft clamp of the input latents."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_blocks: Sequence[int],
        block_out_channels: Sequence[int],
        upsampling_scaling_factor: int,
        act_fn: str,
        upsample_fn: str,
        conv_type: str,
        block_pool_channels: Sequence[int],
        pool_norm_groups: int,
    ):
        super().__init__()
        layers = [make_conv(conv_type, in_channels, block_out_channels[0]), get_activation(act_fn)]
        for i, num_block in enumerate(num_blocks):
            is_final_block = i == len(num_blocks) - 1
            channels = block_out_channels[i]
            layers.extend(
                TinySRAutoencoderBlock(channels, channels, act_fn, conv_type, block_pool_channels[i], pool_norm_groups)
                for _ in range(num_block)
            )
            if not is_final_block:
                layers.append(nn.Upsample(scale_factor=upsampling_scaling_factor, mode=upsample_fn))
                conv_out = block_out_channels[i + 1]
            else:
                conv_out = out_channels
            layers.append(make_conv(conv_type, channels, conv_out, bias=is_final_block))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(x / 3) * 3
        return self.layers(x).mul(2).sub(1)


class TinySRAutoencoder(ModelMixin, AutoencoderMixin, ConfigMixin):
    r"""
    The TinySR tiny VAE: TAESD topology for the SD3 latent space, images in [-1, 1].

    `encode(x).latents` gives unscaled latents (multiply by `config.scaling_factor` as for SD3's VAE) and
    `decode(z).sample` takes them back. `enable_tiling()` processes large images in overlapping tiles with
    blended seams; memory is then bounded by the tile size.

    Parameters:
        in_channels / out_channels (`int`, defaults to `3`): Image channels.
        encoder_block_out_channels / decoder_block_out_channels (`tuple[int]`): Channels per resolution.
        act_fn (`str`, defaults to `"relu"`): Activation.
        upsample_fn (`str`, defaults to `"nearest"`): Decoder upsampling mode.
        latent_channels (`int`, defaults to `16`): Latent channels (SD3: 16).
        upsampling_scaling_factor (`int`, defaults to `2`): Decoder upsampling per stage.
        num_encoder_blocks / num_decoder_blocks (`tuple[int]`): Residual blocks per resolution.
        scaling_factor (`float`, defaults to `1.5305`): Latent scale of the SD3 latent space.
        shift_factor (`float`, defaults to `0.0`): Latent shift (the TinySR/TSD-SR release uses none).
        encoder_conv / decoder_conv (`str`): `"standard"` or `"separable"` per side (paper: separable encoder,
            standard decoder; release: separable both).
        encoder_pool_channels / decoder_pool_channels (`tuple[int]`, *optional*): Width of the `pool` branch of
            the blocks at each resolution (0: none). TAEF2 (`TinySRAutoencoder.taef2_config()`) uses 256 on its
            lowest resolution on both sides.
        pool_norm_groups (`int`, defaults to `4`): GroupNorm groups of the pool branches.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int = 3,
        encoder_block_out_channels: Sequence[int] = (64, 64, 64, 64),
        decoder_block_out_channels: Sequence[int] = (64, 64, 64, 64),
        act_fn: str = "relu",
        upsample_fn: str = "nearest",
        latent_channels: int = 16,
        upsampling_scaling_factor: int = 2,
        num_encoder_blocks: Sequence[int] = (1, 3, 3, 3),
        num_decoder_blocks: Sequence[int] = (3, 3, 3, 1),
        scaling_factor: float = 1.5305,
        shift_factor: float = 0.0,
        encoder_conv: str = "separable",
        decoder_conv: str = "standard",
        encoder_pool_channels: Optional[Sequence[int]] = None,
        decoder_pool_channels: Optional[Sequence[int]] = None,
        pool_norm_groups: int = 4,
    ):
        super().__init__()
        encoder_pool_channels = list(encoder_pool_channels or [0] * len(num_encoder_blocks))
        decoder_pool_channels = list(decoder_pool_channels or [0] * len(num_decoder_blocks))
        for name, value in (("encoder_conv", encoder_conv), ("decoder_conv", decoder_conv)):
            if value not in CONV_TYPES:
                raise ValueError(f"`{name}` must be one of {CONV_TYPES}, got {value!r}.")
        for blocks, channels, side in (
            (num_encoder_blocks, encoder_block_out_channels, "encoder"),
            (num_decoder_blocks, decoder_block_out_channels, "decoder"),
        ):
            if len(blocks) != len(channels) or not blocks:
                raise ValueError(
                    f"num_{side}_blocks ({list(blocks)}) and {side}_block_out_channels ({list(channels)}) must be "
                    "non-empty and of the same length."
                )
        for pools, blocks, side in (
            (encoder_pool_channels, num_encoder_blocks, "encoder"),
            (decoder_pool_channels, num_decoder_blocks, "decoder"),
        ):
            if len(pools) != len(blocks) or any(not isinstance(c, int) or c < 0 for c in pools):
                raise ValueError(
                    f"{side}_pool_channels ({pools}) must give a non-negative width per resolution "
                    f"({len(blocks)} resolutions)."
                )
            if any(c % pool_norm_groups for c in pools):
                raise ValueError(
                    f"{side}_pool_channels ({pools}) must be multiples of pool_norm_groups ({pool_norm_groups})."
                )
        if len(num_encoder_blocks) != len(num_decoder_blocks):
            raise ValueError("Encoder and decoder must have the same number of resolutions.")
        channels = {"in_channels": in_channels, "out_channels": out_channels, "latent_channels": latent_channels}
        for name, value in channels.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")

        self.encoder = TinySREncoder(
            in_channels,
            latent_channels,
            num_blocks=num_encoder_blocks,
            block_out_channels=encoder_block_out_channels,
            act_fn=act_fn,
            conv_type=encoder_conv,
            block_pool_channels=encoder_pool_channels,
            pool_norm_groups=pool_norm_groups,
        )
        self.decoder = TinySRDecoder(
            latent_channels,
            out_channels,
            num_blocks=num_decoder_blocks,
            block_out_channels=decoder_block_out_channels,
            upsampling_scaling_factor=upsampling_scaling_factor,
            act_fn=act_fn,
            upsample_fn=upsample_fn,
            conv_type=decoder_conv,
            block_pool_channels=decoder_pool_channels,
            pool_norm_groups=pool_norm_groups,
        )
        self.spatial_scale_factor = upsampling_scaling_factor ** (len(num_encoder_blocks) - 1)
        self.use_tiling = False
        self.use_slicing = False
        self.tile_sample_size = 512
        self.tile_sample_overlap = 64

    @classmethod
    def from_autoencoder(
        cls,
        vae: "TinySRAutoencoder",
        encoder_conv: Optional[str] = None,
        decoder_conv: Optional[str] = None,
        *,
        encoder_block_out_channels: Optional[Sequence[int]] = None,
        decoder_block_out_channels: Optional[Sequence[int]] = None,
    ) -> "TinySRAutoencoder":
        """A copy of `vae` with other convolution types and/or narrower stages, as the start of a distillation.

        Standard convolutions become separable ones through [`SeparableConv2d.from_conv`] (the paper's separable
        encoder, initialised from a standard teacher encoder); sides that keep their type are copied exactly. A
        narrower stage (fewer `*_block_out_channels`, same number of blocks) keeps the leading channels of each of
        its tensors: a crude start, but one that already decodes (random weights do not), so that a short CPU
        distillation of the cheap decoder has somewhere to begin.
        """
        config = {key: value for key, value in vae.config.items() if not key.startswith("_")}  # none "defaulted"
        config.update(
            encoder_conv=encoder_conv or config["encoder_conv"], decoder_conv=decoder_conv or config["decoder_conv"]
        )
        for side in ("encoder", "decoder"):
            if vae.config[f"{side}_conv"] == "separable" and config[f"{side}_conv"] == "standard":
                raise ValueError(f"Cannot turn the separable {side} back into standard convolutions.")
        new = cls.from_config(config)
        for side in ("encoder", "decoder"):
            source, target = getattr(vae, side), getattr(new, side)
            if vae.config[f"{side}_conv"] == config[f"{side}_conv"]:
                target.load_state_dict(source.state_dict())
                continue
            for name, module in source.named_modules():
                if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
                    parent, _, child = name.rpartition(".")
                    target.get_submodule(parent).register_module(child, SeparableConv2d.from_conv(module))
                elif isinstance(module, (nn.Conv2d, nn.GroupNorm)):
                    target.get_submodule(name).load_state_dict(module.state_dict())
        widths = {"encoder_block_out_channels": encoder_block_out_channels,
                  "decoder_block_out_channels": decoder_block_out_channels}
        widths = {key: list(value) for key, value in widths.items() if value is not None}
        if widths:
            new = new._narrowed(widths)
        return new.to(device=vae.device, dtype=vae.dtype) if vae.dtype != new.dtype else new.to(vae.device)

    def _narrowed(self, widths: dict) -> "TinySRAutoencoder":
        """This autoencoder with the `*_block_out_channels` of `widths`, each tensor cut to its leading slice."""
        config = {key: value for key, value in self.config.items() if not key.startswith("_")}
        for key, value in widths.items():
            if len(value) != len(config[key]) or any(new > old for new, old in zip(value, config[key])):
                raise ValueError(f"{key}={value} must narrow {list(config[key])} stage by stage (same length, "
                                 "no stage wider).")
        config.update(widths)
        narrow = type(self).from_config(config)
        source = self.state_dict()
        narrow.load_state_dict({
            name: source[name][tuple(slice(0, size) for size in tensor.shape)]
            for name, tensor in narrow.state_dict().items()
        })
        return narrow

    @staticmethod
    def taef2_config() -> dict:
        """The config that expresses TAEF2 (madebyollin/taesd, MIT) exactly: 32 latent channels, standard convs,
        pool branches on the lowest resolution, and its raw latent space (scale 1, no shift)."""
        return {
            "latent_channels": 32,
            "encoder_conv": "standard",
            "decoder_conv": "standard",
            "encoder_pool_channels": [0, 0, 0, 256],
            "decoder_pool_channels": [256, 0, 0, 0],
            "pool_norm_groups": 4,
            "scaling_factor": 1.0,
            "shift_factor": 0.0,
        }

    def enable_tiling(self, tile_sample_size: Optional[int] = None, tile_sample_overlap: Optional[int] = None) -> None:
        """Encode and decode in overlapping tiles of `tile_sample_size` image pixels blended over `tile_sample_overlap`.

        Both must be multiples of the spatial scale factor (8), the overlap smaller than the tile.
        """
        size = tile_sample_size if tile_sample_size is not None else self.tile_sample_size
        overlap = tile_sample_overlap if tile_sample_overlap is not None else self.tile_sample_overlap
        factor = self.spatial_scale_factor
        if size % factor or overlap % factor or not 0 <= overlap < size:
            raise ValueError(
                f"Tile size ({size}) and overlap ({overlap}) must be multiples of {factor} with 0 <= overlap < size."
            )
        self.tile_sample_size, self.tile_sample_overlap = size, overlap
        super().enable_tiling()

    def _map_batch(self, fn, x: torch.Tensor) -> torch.Tensor:
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([fn(sample) for sample in x.split(1)])
        return fn(x)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_tiling:
            return self.encoder(x)
        factor = self.spatial_scale_factor
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"Tiled encoding needs image sides that are multiples of {factor}, got {tuple(x.shape[-2:])}.")
        return tiled_map(
            self.encoder, x, self.tile_sample_size, self.tile_sample_overlap, scale=1 / factor, align=factor
        )

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if not self.use_tiling:
            return self.decoder(z)
        factor = self.spatial_scale_factor
        return tiled_map(
            self.decoder, z, self.tile_sample_size // factor, self.tile_sample_overlap // factor, scale=factor
        )

    @apply_forward_hook  # model CPU offload moves the VAE on encode/decode, not only on forward
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Union[AutoencoderTinyOutput, tuple[torch.Tensor]]:
        """Images (B, 3, H, W) in [-1, 1] -> unscaled latents (B, latent_channels, H/8, W/8)."""
        latents = self._map_batch(self._encode, x)
        if not return_dict:
            return (latents,)
        return AutoencoderTinyOutput(latents=latents)

    @apply_forward_hook
    def decode(
        self, x: torch.Tensor, generator: Optional[torch.Generator] = None, return_dict: bool = True
    ) -> Union[DecoderOutput, tuple[torch.Tensor]]:
        """Unscaled latents -> images in [-1, 1] (not clamped). `generator` is accepted for diffusers parity."""
        sample = self._map_batch(self._decode, x)
        if not return_dict:
            return (sample,)
        return DecoderOutput(sample=sample)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> Union[DecoderOutput, tuple[torch.Tensor]]:
        """Reconstruct `sample` (encode then decode)."""
        return self.decode(self.encode(sample).latents, return_dict=return_dict)
