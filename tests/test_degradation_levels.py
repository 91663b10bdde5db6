"""The three degradation levels (clean, mild, Real-ESRGAN) and the peer recipe's target shards built from them."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.tiny_pipelines import photo
from tinysr_diffusers.training_utils.degradation_levels import (
    LEVELS,
    MILD_BENCHMARK,
    MildConfig,
    bicubic_downscale,
    degrade,
    gaussian_kernel,
)


def _hr(size=(64, 48)) -> torch.Tensor:
    return torch.from_numpy(np.asarray(photo("astronaut", size), dtype=np.float32) / 255).permute(2, 0, 1)[None]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / F.mse_loss(a, b)))


def test_clean_is_the_8_bit_bicubic_downscale():
    hr = _hr()
    lr = degrade(hr, "clean", torch.Generator().manual_seed(0))
    assert lr.shape == (1, 3, 12, 16)
    torch.testing.assert_close(lr, (bicubic_downscale(hr) * 255).round() / 255)


def test_every_level_is_seeded_8_bit_and_ordered_by_damage():
    hr = _hr((128, 96))
    clean = bicubic_downscale(hr)
    scores = {}
    for level in LEVELS:
        first = degrade(hr, level, torch.Generator().manual_seed(3))
        again = degrade(hr, level, torch.Generator().manual_seed(3))
        torch.testing.assert_close(first, again, rtol=0, atol=0)
        assert first.shape == (1, 3, 24, 32)
        torch.testing.assert_close(first * 255, (first * 255).round(), rtol=0, atol=1e-4)
        scores[level] = _psnr(first, clean)
    assert scores["clean"] > 45 > scores["mild"] > scores["realesrgan"]


def test_mild_draws_within_its_ranges():
    kernel = gaussian_kernel(1.2)
    assert kernel.shape == (9, 9) and abs(float(kernel.sum()) - 1) < 1e-6
    hr = _hr((128, 96))
    fixed = MildConfig(blur_sigma=(0.5, 0.5), noise_sigma=(0.0, 0.0), jpeg_quality=(95, 95))
    light = degrade(hr, "mild", torch.Generator().manual_seed(0), mild=fixed)
    heavy = degrade(hr, "mild", torch.Generator().manual_seed(0), mild=MildConfig(blur_sigma=(2, 2),
                                                                                   noise_sigma=(8, 8),
                                                                                   jpeg_quality=(60, 60)))
    clean = bicubic_downscale(hr)
    assert _psnr(light, clean) > _psnr(heavy, clean) + 3
    assert MILD_BENCHMARK == MildConfig(blur_sigma=(1.2, 1.2), noise_sigma=(4.0, 4.0), jpeg_quality=(75, 75))
    with pytest.raises(ValueError, match="Unknown degradation level 'heavy'"):
        degrade(hr, "heavy", torch.Generator())


def test_a_target_shard_keeps_the_centre_of_a_crop_seen_with_context():
    """`make_shard` with a stand-in upscaler (nearest 4x): the target is the upscale of the LR's own pixels, cut
    from a larger upscale, and the HR is the crop the LR was degraded from."""
    from training.recipes.peer import make_shard

    photos = [np.asarray(photo("astronaut", (200, 160))), np.asarray(photo("coffee", (180, 150)))]
    settings = {"shard_size": 6, "hr_size": 32, "context": 2, "scale_range": [1.0, 1.0], "batch_size": 4,
                "level_probs": {"clean": 0.5, "mild": 0.25, "realesrgan": 0.25}, "realesrgan": {}}

    class Nearest(torch.nn.Module):
        def forward(self, x):
            return F.interpolate(x, scale_factor=4, mode="nearest")

    shard = make_shard(photos, settings, Nearest(), seed=5)
    assert shard["lr"].shape == (6, 8, 8, 3) and shard["target"].shape == shard["hr"].shape == (6, 32, 32, 3)
    nearest = shard["lr"].repeat(4, axis=1).repeat(4, axis=2)
    np.testing.assert_array_equal(shard["target"], nearest)
    clean = shard["level"] == 0
    assert clean.any()
    hr = torch.from_numpy(shard["hr"][clean]).permute(0, 3, 1, 2).float() / 255
    lr = torch.from_numpy(shard["lr"][clean]).permute(0, 3, 1, 2).float() / 255
    assert _psnr(bicubic_downscale(hr)[..., 1:-1, 1:-1], lr[..., 1:-1, 1:-1]) > 30  # same place, same content
    again = make_shard(photos, settings, Nearest(), seed=5)
    assert all(np.array_equal(shard[key], again[key]) for key in shard)
