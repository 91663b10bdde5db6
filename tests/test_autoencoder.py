"""TinySRAutoencoder: layouts, equivalence with diffusers' AutoencoderTiny, tiling on a real photo."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from skimage import data

from tinysr_diffusers import TinySRAutoencoder

from .tiny_models import tiny_vae


def photo(size: int = 256) -> torch.Tensor:
    """A real photo (scikit-image astronaut) in [-1, 1], (1, 3, size, size)."""
    image = torch.from_numpy(np.ascontiguousarray(data.astronaut())).permute(2, 0, 1)[None].float() / 127.5 - 1
    return torch.nn.functional.interpolate(image, size=(size, size), mode="area")


@pytest.mark.parametrize("encoder_conv", ["standard", "separable"])
@pytest.mark.parametrize("decoder_conv", ["standard", "separable"])
@torch.no_grad()
def test_shapes_for_every_conv_type(encoder_conv, decoder_conv):
    vae = tiny_vae(encoder_conv=encoder_conv, decoder_conv=decoder_conv)
    x = torch.rand(2, 3, 40, 24) * 2 - 1
    latents = vae.encode(x).latents
    assert latents.shape == (2, 4, 5, 3)
    assert vae.decode(latents).sample.shape == (2, 3, 40, 24)
    assert vae(x).sample.shape == (2, 3, 40, 24)


def test_default_config_is_the_papers():
    config = TinySRAutoencoder().config
    assert (config.encoder_conv, config.decoder_conv) == ("separable", "standard")
    assert config.latent_channels == 16 and config.scaling_factor == 1.5305 and config.shift_factor == 0.0
    assert tuple(config.num_encoder_blocks) == (1, 3, 3, 3) and tuple(config.num_decoder_blocks) == (3, 3, 3, 1)


@torch.no_grad()
def test_standard_convs_equal_diffusers_autoencoder_tiny():
    """With standard convs both sides the state dict is AutoencoderTiny's, key for key, and so are the outputs."""
    reference = AutoencoderTiny(latent_channels=4, encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4)
    ours = tiny_vae(encoder_conv="standard", decoder_conv="standard")
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    latents = reference.encode(x).latents
    torch.testing.assert_close(ours.encode(x).latents, latents)
    torch.testing.assert_close(ours.decode(latents).sample, reference.decode(latents).sample)


def test_separable_layout_matches_the_release_key_names():
    keys = set(tiny_vae(encoder_conv="separable", decoder_conv="separable").state_dict())
    for key in (
        "encoder.layers.0.depthwise.weight",
        "encoder.layers.0.pointwise.bias",
        "encoder.layers.2.depthwise.weight",  # stride-2 conv: no bias anywhere
        "encoder.layers.1.conv.0.pointwise.weight",
        "decoder.layers.0.depthwise.weight",
        "decoder.layers.2.conv.4.pointwise.bias",
    ):
        assert key in keys, key
    assert "encoder.layers.2.pointwise.bias" not in keys
    depthwise = tiny_vae(encoder_conv="separable").encoder.layers[1].conv[0].depthwise
    assert depthwise.groups == depthwise.in_channels and depthwise.bias is None


@torch.no_grad()
def test_tiled_matches_untiled_on_a_real_photo():
    vae = tiny_vae()
    x = photo(256)
    latents = vae.encode(x).latents
    decoded = vae.decode(latents).sample
    vae.enable_tiling(tile_sample_size=128, tile_sample_overlap=64)
    tiled_latents = vae.encode(x).latents
    tiled_decoded = vae.decode(latents).sample
    # TAESD's receptive field exceeds the overlap, so tiles differ slightly from the whole. Measured here: 0.8% of
    # the latent magnitude and 0.02% of the decoded one; without overlap 3.5% and 0.16%, which these bounds reject.
    assert (tiled_latents - latents).abs().mean() < 0.02 * latents.abs().mean()
    assert (tiled_decoded - decoded).abs().mean() < 0.001 * decoded.abs().mean()
    # No visible seam: the error at tile borders is not larger than elsewhere.
    error = (tiled_decoded - decoded).abs().mean(dim=(0, 1))
    border_columns = error[:, 60:70].mean()
    assert border_columns < 3 * error.mean()


@torch.no_grad()
def test_tiling_leaves_small_images_untouched():
    vae = tiny_vae()
    x = photo(64)
    expected = vae(x).sample
    vae.enable_tiling(tile_sample_size=64, tile_sample_overlap=16)
    assert torch.equal(vae(x).sample, expected)


@torch.no_grad()
def test_slicing_matches_batched():
    vae = tiny_vae()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    expected = vae(x).sample
    vae.enable_slicing()
    torch.testing.assert_close(vae(x).sample, expected)


@torch.no_grad()
def test_save_and_load_round_trip(tmp_path):
    vae = tiny_vae(decoder_conv="separable")
    vae.save_pretrained(tmp_path)
    loaded = TinySRAutoencoder.from_pretrained(tmp_path)
    assert loaded.config.decoder_conv == "separable"
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded(x).sample, vae(x).sample)


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(encoder_conv="dilated"), "encoder_conv"),
        (dict(decoder_conv="Standard"), "decoder_conv"),
        (dict(num_encoder_blocks=(1, 3)), "num_encoder_blocks"),
        (dict(latent_channels=0), "latent_channels"),
    ],
)
def test_bad_config_values_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        TinySRAutoencoder(**config)


def test_bad_tiling_values_are_named():
    vae = tiny_vae()
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.enable_tiling(tile_sample_size=100)
    with pytest.raises(ValueError, match="overlap"):
        vae.enable_tiling(tile_sample_size=64, tile_sample_overlap=64)
    vae.enable_tiling(tile_sample_size=64, tile_sample_overlap=16)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 100, 100))
