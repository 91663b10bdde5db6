"""Real-ESRGAN second-order degradation: kernels, noise, JPEG, the full model, its config."""

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from tinysr_diffusers.training_utils.degradations import (
    DegradationConfig,
    RealESRGANDegradation,
    filter2d,
    gaussian_noise,
    generalized_gaussian_kernel,
    jpeg_compress,
    limit_support,
    plateau_kernel,
    poisson_noise,
    sinc_kernel,
    usm_sharpen,
)


def photos(size: int = 96) -> torch.Tensor:
    """Two real photos, (2, 3, size, size) in [0, 1]."""
    images = [data.astronaut()[100 : 100 + size, 150 : 150 + size], data.coffee()[50 : 50 + size, 200 : 200 + size]]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1 / F.mse_loss(a, b).item())


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_output_shape_range_and_quantisation():
    hr = photos(96)
    lr = RealESRGANDegradation()(hr, generator=seeded(0))
    assert lr.shape == (2, 3, 24, 24) and lr.dtype == hr.dtype
    assert lr.min() >= 0 and lr.max() <= 1
    assert torch.equal(lr * 255, (lr * 255).round())  # 8-bit like a saved image


def test_same_seed_same_output_and_seeds_differ():
    hr = photos(64)
    degrade = RealESRGANDegradation()
    first = degrade(hr, generator=seeded(7))
    assert torch.equal(first, degrade(hr, generator=seeded(7)))
    outputs = [degrade(hr, generator=seeded(seed)) for seed in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(outputs[i], outputs[j])


def test_degradation_is_strong_but_keeps_the_content():
    hr = photos(96)
    lr = RealESRGANDegradation()(hr, generator=seeded(1))
    clean = F.interpolate(hr, scale_factor=0.25, mode="area")
    # The same picture, but visibly damaged (noise, blur, JPEG).
    assert 12 < psnr(lr, clean) < 40
    assert psnr(lr[0:1], clean[0:1]) > psnr(lr[0:1], clean[1:2])


def test_mild_config_reduces_to_area_downsampling():
    """With blur, noise, resizing and sharpening switched off and JPEG at 100, only 4x area resizing remains."""
    config = DegradationConfig(
        usm_sharpen=False, kernel_list=("iso",), kernel_prob=(1.0,), kernel_list2=("iso",), kernel_prob2=(1.0,),
        sinc_prob=0.0, blur_sigma=(1e-3, 1e-3), second_blur_prob=0.0, final_sinc_prob=0.0,
        resize_prob=(0, 0, 1), resize_prob2=(0, 0, 1), resize_modes=("area",),
        noise_range=(0, 0), noise_range2=(0, 0), poisson_scale_range=(0, 0), poisson_scale_range2=(0, 0),
        jpeg_range=(100, 100), jpeg_range2=(100, 100),
    )  # fmt: skip
    hr = photos(96)
    lr = RealESRGANDegradation(config)(hr, generator=seeded(0))
    assert psnr(lr, F.interpolate(hr, scale_factor=0.25, mode="area")) > 35  # only JPEG-100 chroma/rounding loss


def test_kernels_are_normalised_and_identity_when_switched_off():
    degrade = RealESRGANDegradation()
    kernel1, kernel2, final = degrade.sample_kernels(64, generator=seeded(0))
    for kernels in (kernel1, kernel2, final):
        assert kernels.shape == (64, 21, 21)
        torch.testing.assert_close(kernels.sum(dim=(1, 2)), torch.ones(64), atol=1e-5, rtol=0)
    identity = torch.zeros(21, 21)
    identity[10, 10] = 1
    off = RealESRGANDegradation(second_blur_prob=0.0, final_sinc_prob=0.0)
    _, kernel2, final = off.sample_kernels(4, generator=seeded(0))
    assert all(torch.equal(k, identity) for k in (*kernel2, *final))
    # The default mixture holds both some identity second-blur kernels (p = 0.2) and some sinc ones (negative lobes).
    assert any(torch.equal(k, identity) for k in kernel2)
    assert (kernel1.amin(dim=(1, 2)) < 0).any()


def test_kernel_shapes():
    one = lambda value: torch.tensor([value], dtype=torch.float64)  # noqa: E731
    iso = generalized_gaussian_kernel(21, one(2.0), one(2.0), one(0.0), one(1.0))[0]
    torch.testing.assert_close(iso, iso.T)
    torch.testing.assert_close(iso, iso.flip(0))
    # An anisotropic kernel rotated by 90 degrees swaps its axes.
    wide = generalized_gaussian_kernel(21, one(3.0), one(1.0), one(0.0), one(1.0))[0]
    tall = generalized_gaussian_kernel(21, one(3.0), one(1.0), one(math.pi / 2), one(1.0))[0]
    torch.testing.assert_close(wide, tall.T)
    assert wide[10, 15] > wide[15, 10]
    # Plateau kernels have a flatter top and heavier tails than the Gaussian of the same sigma.
    plateau = plateau_kernel(21, one(2.0), one(2.0), one(0.0), one(2.0))[0]
    assert plateau[10, 20] / plateau[10, 10] > iso[10, 20] / iso[10, 10]
    # A 2-D sinc at the Nyquist cutoff is nearly an impulse; lower cutoffs spread and ring (negative lobes).
    sharp, soft = sinc_kernel(21, one(math.pi))[0], sinc_kernel(21, one(math.pi / 4))[0]
    assert sharp.argmax() == soft.argmax() == 10 * 21 + 10
    assert sharp[10, 10] > 0.75 > 0.1 > soft[10, 10]
    assert soft.min() < 0
    # Limiting the support equals computing the small kernel and zero-padding it.
    small = generalized_gaussian_kernel(7, one(3.0), one(1.5), one(0.4), one(1.0))[0]
    large = generalized_gaussian_kernel(21, one(3.0), one(1.5), one(0.4), one(1.0))
    limited = limit_support(large, torch.tensor([7]))[0]
    torch.testing.assert_close(limited, F.pad(small, (7, 7, 7, 7)))


def test_kernels_and_filters_match_basicsr():
    """Independent check against basicsr's kernels, filter2D and USMSharp (optional: basicsr-fixed)."""
    degradations = pytest.importorskip("basicsr.data.degradations")
    from basicsr.utils.img_process_util import USMSharp, filter2D

    one = lambda value: torch.tensor([value], dtype=torch.float64)  # noqa: E731
    for sx, sy, theta, beta in [(1.0, 2.5, 0.7, 1.0), (2.0, 0.5, -2.0, 0.6), (0.4, 0.4, 0.0, 3.0)]:
        for size in (7, 21):
            ours = generalized_gaussian_kernel(size, one(sx), one(sy), one(theta), one(beta))[0].numpy()
            theirs = degradations.bivariate_generalized_Gaussian(size, sx, sy, theta, beta, isotropic=False)
            np.testing.assert_allclose(ours, theirs, atol=1e-12)
            ours = plateau_kernel(size, one(sx), one(sy), one(theta), one(beta))[0].numpy()
            theirs = degradations.bivariate_plateau(size, sx, sy, theta, beta, isotropic=False)
            np.testing.assert_allclose(ours, theirs, atol=1e-12)
    for cutoff in (0.7, 2.0, math.pi):
        for size in (7, 13, 21):
            ours = sinc_kernel(size, one(cutoff))[0].numpy()
            np.testing.assert_allclose(ours, degradations.circular_lowpass_kernel(cutoff, size), atol=1e-6)
    img = photos(64).contiguous()  # basicsr uses .view
    kernels = RealESRGANDegradation().sample_kernels(2, generator=seeded(0))[0]
    torch.testing.assert_close(filter2d(img, kernels), filter2D(img, kernels), atol=1e-6, rtol=1e-5)
    # Float rounding of the separable blur flips a few pixels of the thresholded mask, which the soft mask spreads.
    ours, theirs = usm_sharpen(img), USMSharp()(img)
    assert (ours - theirs).abs().max() < 1e-3 and (ours - theirs).abs().mean() < 1e-5


def test_filter2d_uses_each_images_kernel():
    img = photos(32)
    identity = torch.zeros(2, 5, 5)
    identity[:, 2, 2] = 1
    box = torch.full((5, 5), 1 / 25.0)
    kernels = torch.stack([identity[0], box])
    out = filter2d(img, kernels)
    torch.testing.assert_close(out[0], img[0])
    expected = F.conv2d(F.pad(img[1:], (2, 2, 2, 2), mode="reflect"), box.expand(3, 1, 5, 5), groups=3)
    torch.testing.assert_close(out[1:], expected)
    with pytest.raises(ValueError, match="odd-sized"):
        filter2d(img, torch.ones(2, 4, 4))


def test_usm_sharpen_increases_local_contrast_only_where_edges_are():
    img = photos(64)
    sharp = usm_sharpen(img)
    assert sharp.min() >= 0 and sharp.max() <= 1
    high_pass = lambda x: x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)  # noqa: E731
    assert high_pass(sharp).abs().mean() > high_pass(img).abs().mean()
    flat = torch.full((1, 3, 64, 64), 0.5)
    torch.testing.assert_close(usm_sharpen(flat), flat)


def test_gaussian_noise_statistics_and_grey_noise():
    img = torch.full((2, 3, 128, 128), 0.5)
    noise = gaussian_noise(img, torch.tensor([10.0, 25.0]), torch.tensor([False, True]), generator=seeded(0))
    assert abs(noise[0].std().item() * 255 - 10) < 0.5 and abs(noise[1].std().item() * 255 - 25) < 1.0
    assert not torch.equal(noise[0, 0], noise[0, 1])  # colour noise: channels differ
    assert torch.equal(noise[1, 0], noise[1, 1]) and torch.equal(noise[1, 1], noise[1, 2])  # grey noise


def test_poisson_noise_statistics():
    # 256 distinct levels -> 256 photons per unit intensity: variance = intensity / 256, times scale^2.
    ramp = torch.arange(256.0).repeat(64, 1) / 255
    img = torch.stack([ramp, ramp.flip(1), ramp]).unsqueeze(0).repeat(2, 1, 1, 1)
    noise = poisson_noise(img, torch.tensor([1.0, 2.0]), torch.tensor([False, True]), generator=seeded(0))
    bright = img[0, 0, :, 192:]  # intensities 0.75-1
    expected_std = (bright.mean() / 256).sqrt().item()
    assert abs(noise[0, 0, :, 192:].std().item() / expected_std - 1) < 0.1
    assert abs(noise[0].mean().item()) < 2e-3
    assert torch.equal(noise[1, 0], noise[1, 1])
    assert (noise[1] != 0).float().mean() > 0.5


def test_jpeg_matches_pillow():
    """Our JPEG round trip against libjpeg through Pillow (4:2:0, standard tables): far closer than either is to
    the source image, and stronger compression at lower quality."""
    source = data.astronaut()[:200, :232]  # not a multiple of 16: exercises padding
    img = torch.from_numpy(source).permute(2, 0, 1)[None].float() / 255
    errors = []
    for quality in (30, 75):
        buffer = io.BytesIO()
        Image.fromarray(source).save(buffer, format="JPEG", quality=quality, subsampling=2)
        pillow = torch.from_numpy(np.array(Image.open(buffer))).permute(2, 0, 1)[None].float() / 255
        ours = jpeg_compress(img, torch.tensor([float(quality)]))
        assert ours.shape == img.shape
        assert psnr(ours, pillow) > 38
        assert psnr(ours, pillow) > psnr(img, pillow) + 5
        errors.append(psnr(ours, img))
    assert errors[0] < errors[1]


def test_jpeg_is_batched_per_quality_and_passes_gradients():
    img = photos(48).requires_grad_(True)
    out = jpeg_compress(img, torch.tensor([20.0, 95.0]))
    separate = torch.cat([jpeg_compress(img[i : i + 1], torch.tensor([q])) for i, q in enumerate((20.0, 95.0))])
    torch.testing.assert_close(out, separate)
    out.sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


def test_config_validation_and_round_trip():
    config = DegradationConfig()
    assert config.resize_prob == (0.2, 0.7, 0.1) and config.noise_range == (1.0, 30.0)  # Real-ESRGAN x4plus
    assert DegradationConfig.from_dict(config.to_dict()) == config
    assert DegradationConfig.from_dict({"noise_range": [1, 10]}).noise_range == (1, 10)
    with pytest.raises(ValueError, match="Unknown degradation parameters"):
        DegradationConfig.from_dict({"noise_rnage": [1, 10]})
    with pytest.raises(ValueError, match="resize_prob2"):
        DegradationConfig(resize_prob2=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="kernel_list"):
        DegradationConfig(kernel_list=("iso", "box"), kernel_prob=(0.5, 0.5))
    with pytest.raises(ValueError, match="jpeg_range"):
        DegradationConfig(jpeg_range=(0, 95))
    with pytest.raises(ValueError, match="odd"):
        DegradationConfig(kernel_range=(7, 8))


def test_bad_inputs_are_named():
    degrade = RealESRGANDegradation()
    with pytest.raises(ValueError, match="multiple of the scale"):
        degrade(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        degrade(torch.rand(1, 3, 32, 32) * 2)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        degrade(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="either"):
        RealESRGANDegradation(DegradationConfig(), scale=2)
