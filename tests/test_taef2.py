"""TAEF2 (the real pretrained tiny autoencoder the mini recipe works in) as a TinySRAutoencoder: its released weights
load exactly (reconstruction PSNR of real photos as published) and convert to the student's separable encoder."""

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch

from tinysr_diffusers import TinySRAutoencoder
from tinysr_diffusers.hub.conversion import ConversionError, convert_taef2
from tinysr_diffusers.models.autoencoder_tinysr import SeparableConv2d


TAEF2 = Path(__file__).resolve().parents[1] / "assets" / "taef2"
PUBLISHED_PSNR = {"astronaut": 31.19, "coffee": 29.62, "chelsea": 32.79}  # assets/taef2/README.md


@pytest.fixture(scope="module")
def taef2():
    return convert_taef2(TAEF2 / "taef2_encoder.pth", TAEF2 / "taef2_decoder.pth")


@pytest.mark.parametrize("name", sorted(PUBLISHED_PSNR))
def test_reconstruction_psnr_matches_the_published_figures(taef2, name):
    image = getattr(skimage.data, name)()[..., :3]
    image = image[: image.shape[0] // 8 * 8, : image.shape[1] // 8 * 8]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        latents = taef2.encode(x * 2 - 1).latents
        y = (taef2.decode(latents).sample.clamp(-1, 1) + 1) / 2
    assert latents.shape[1] == 32
    psnr = 10 * np.log10(1 / ((y - x) ** 2).mean().item())
    assert psnr == pytest.approx(PUBLISHED_PSNR[name], abs=0.05)


def test_config_round_trip_and_bad_files(taef2, tmp_path):
    taef2.save_pretrained(tmp_path / "vae")
    again = TinySRAutoencoder.from_pretrained(tmp_path / "vae")
    assert again.config.encoder_pool_channels == [0, 0, 0, 256]
    for name, tensor in taef2.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="junk.pth"):
        convert_taef2(tmp_path / "junk.pth", TAEF2 / "taef2_decoder.pth")
    with pytest.raises(ConversionError, match="not found"):
        convert_taef2(tmp_path / "missing.pth", TAEF2 / "taef2_decoder.pth")
    with pytest.raises(ConversionError, match="do not fit"):  # encoder weights given as the decoder
        convert_taef2(TAEF2 / "taef2_encoder.pth", TAEF2 / "taef2_encoder.pth")


def test_separable_split_is_exact_for_rank_one_kernels_and_keeps_the_rest(taef2):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1, stride=2)
    with torch.no_grad():  # W[o, i] = a[o, i] * k[i]: every input channel's slice has rank 1
        conv.weight.copy_(torch.randn(16, 8, 1, 1) * torch.randn(1, 8, 3, 3))
    x = torch.randn(2, 8, 12, 12)
    assert torch.allclose(SeparableConv2d.from_conv(conv)(x), conv(x), atol=1e-5)
    separable = TinySRAutoencoder.from_autoencoder(taef2, encoder_conv="separable")
    assert separable.config.encoder_conv == "separable" and separable.config.decoder_conv == "standard"
    for name, tensor in taef2.decoder.state_dict().items():
        assert torch.equal(tensor, separable.decoder.state_dict()[name]), name
    pool = "layers.11.pool.0.weight"
    assert torch.equal(taef2.encoder.state_dict()[pool], separable.encoder.state_dict()[pool])
    assert sum(p.numel() for p in separable.encoder.parameters()) < 0.25 * sum(
        p.numel() for p in taef2.encoder.parameters())


def test_narrowed_copy_keeps_leading_channels_and_the_unchanged_stages(taef2):
    narrow = TinySRAutoencoder.from_autoencoder(taef2, encoder_conv="separable",
                                                decoder_block_out_channels=[64, 64, 32, 32])
    assert list(narrow.config.decoder_block_out_channels) == [64, 64, 32, 32]
    assert narrow.config.encoder_conv == "separable"
    source = taef2.decoder.state_dict()
    for name, tensor in narrow.decoder.state_dict().items():
        assert torch.equal(tensor, source[name][tuple(slice(0, size) for size in tensor.shape)]), name
    # The first two stages are TAEF2's own: their output at 16x the latent resolution is unchanged, computed by
    # running TAEF2's layers up to the first narrowed convolution.
    latents = torch.randn(1, 32, 4, 4)
    first_narrowed = next(i for i, layer in enumerate(narrow.decoder.layers)
                          if isinstance(layer, torch.nn.Conv2d) and layer.out_channels == 32)
    with torch.no_grad():
        x = torch.tanh(latents / 3) * 3
        ours, theirs = x, x
        for layer in narrow.decoder.layers[:first_narrowed]:
            ours = layer(ours)
        for layer in taef2.decoder.layers[:first_narrowed]:
            theirs = layer(theirs)
        assert torch.equal(ours, theirs)
        assert narrow.decode(latents).sample.shape == taef2.decode(latents).sample.shape
    with pytest.raises(ValueError, match="must narrow"):
        TinySRAutoencoder.from_autoencoder(taef2, decoder_block_out_channels=[64, 64, 128, 32])
    with pytest.raises(ValueError, match="must narrow"):
        TinySRAutoencoder.from_autoencoder(taef2, encoder_block_out_channels=[32, 32])
