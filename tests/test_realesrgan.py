"""Real-ESRGAN x4plus, the peer upscaler: the torch port against a committed output of the released ncnn files run by
ncnn, and the shared pre/post-processing and weight reader on their own (without the files)."""

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from tinysr_diffusers.evaluation import realesrgan
from tinysr_diffusers.evaluation.realesrgan import PAD, RRDBNet, postprocess, preprocess, read_ncnn_convolutions


DATA = Path(__file__).with_name("data")


def _array(name: str) -> np.ndarray:
    with PIL.Image.open(DATA / name) as image:
        return np.asarray(image.convert("RGB"))


# ------------------------------------------------------------------------------------------- without the files
def test_preprocess_reflects_and_scales():
    image = np.arange(12 * 16 * 3, dtype=np.uint8).reshape(12, 16, 3)
    padded = preprocess(image)
    assert padded.shape == (3, 12 + 2 * PAD, 16 + 2 * PAD) and padded.dtype == np.float32
    np.testing.assert_array_equal(padded[:, PAD:-PAD, PAD:-PAD], image.transpose(2, 0, 1) / np.float32(255))
    np.testing.assert_array_equal(padded[:, PAD - 1, PAD:-PAD], padded[:, PAD + 1, PAD:-PAD])  # reflect, not edge
    for bad in (image.astype(np.float32), image[..., :2], np.zeros((10, 40, 3), np.uint8)):
        with pytest.raises(ValueError, match="Real-ESRGAN"):
            preprocess(bad)


def test_postprocess_crops_the_padding_and_rounds_like_realesrgan_ncnn_vulkan():
    output = np.full((3, 4 * (2 + 2 * PAD), 4 * (3 + 2 * PAD)), 0.5, np.float32)
    output[0, 4 * PAD, 4 * PAD] = 1.7  # clamped
    output[1, 4 * PAD, 4 * PAD] = -0.2
    output[2, 4 * PAD, 4 * PAD] = 100.4999 / 255  # floor(255 v + 0.5) = 100
    result = postprocess(output)
    assert result.shape == (8, 12, 3) and result.dtype == np.uint8
    assert result[0, 0].tolist() == [255, 0, 100] and (result[1:] == 128).all()  # floor(127.5 + 0.5)


def test_the_ncnn_reader_reads_fp16_and_float32_weights(tmp_path):
    """A two-layer ncnn model written here: fp16-tagged and raw float32 weights, biases as float32."""
    first, second = np.random.default_rng(0).normal(size=(2, 3 * 3 * 3 * 2)).astype(np.float32)
    param = tmp_path / "m.param"
    param.write_text("7767517\n3 3\nInput in 0 1 data\nConvolution c0 1 1 data a 0=2 1=3 4=1 5=1 6=54\n"
                     "Convolution c1 1 1 a out 0=2 1=3 4=1 5=0 6=54 9=2 -23310=1,2.0e-01\n")
    blob = np.uint32(0x01306B47).tobytes() + first.astype("<f2").tobytes() + np.float32([1, 2]).tobytes()
    blob += np.uint32(0).tobytes() + second.tobytes()
    (tmp_path / "m.bin").write_bytes(blob)
    (w0, b0), (w1, b1) = read_ncnn_convolutions(param, tmp_path / "m.bin")
    np.testing.assert_array_equal(w0, first.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(b0, [1, 2])
    np.testing.assert_array_equal(w1, second)
    assert not b1.any()
    (tmp_path / "m.bin").write_bytes(blob + b"\0\0\0\0")
    with pytest.raises(ValueError, match="4 bytes left"):
        read_ncnn_convolutions(param, tmp_path / "m.bin")


def test_missing_files_say_how_to_fetch_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m tinysr_diffusers.evaluation.realesrgan fetch"):
        realesrgan.model_files(tmp_path)


# ------------------------------------------------------------------------------------------------ with the files
def test_the_torch_port_matches_the_released_model_run_by_ncnn():
    """`tests/data/realesrgan_ncnn_x4.png` was written by `NcnnRealESRGAN` (ncnn 1.0.20261020, float32 activations)
    from `realesrgan_lr.png`, a 16x12 crop of scikit-image's chelsea; the files are fetched by scripts/install.sh."""
    lr, reference = _array("realesrgan_lr.png"), _array("realesrgan_ncnn_x4.png")
    model = RRDBNet.from_ncnn()
    assert sum(p.numel() for p in model.parameters()) == 16_697_987  # RRDBNet x4plus
    output = model.upscale(lr)
    assert output.shape == reference.shape == (48, 64, 3)
    difference = np.abs(output.astype(int) - reference.astype(int))
    assert difference.max() <= 1 and difference.mean() < 0.01  # float rounding only
    batched = model(torch.from_numpy(np.stack([preprocess(lr)] * 2)))
    np.testing.assert_array_equal(postprocess(batched[1].numpy()), output)


def test_the_ncnn_runner_reproduces_the_reference():
    pytest.importorskip("ncnn")
    lr, reference = _array("realesrgan_lr.png"), _array("realesrgan_ncnn_x4.png")
    np.testing.assert_array_equal(realesrgan.NcnnRealESRGAN(num_threads=1).upscale(lr), reference)
