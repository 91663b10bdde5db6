"""`outscale=` in the pipeline call and `tinysr upscale --outscale`: the 4x output resampled with Lanczos to
round(outscale * size), for every output type and channel layout (tiny random model, real photos, CPU)."""

import math

import numpy as np
import PIL.Image
import pytest
import torch

from tests.tiny_pipelines import photo, tiny_student
from tinysr_diffusers.cli import main


@pytest.fixture(scope="module")
def pipe():
    return tiny_student()


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("outscale, size", [(2, (54, 36)), (3.5, (94, 63)), (1.3, (35, 23)), (0.5, (14, 9))])
def test_output_size_is_round_outscale_times_size_for_every_output_type(pipe, outscale, size):
    image = photo("chelsea", (27, 18))
    pil = pipe(image, outscale=outscale, generator=_seed()).images[0]
    array = pipe(image, outscale=outscale, output_type="np", generator=_seed()).images
    tensor = pipe(image, outscale=outscale, output_type="pt", generator=_seed()).images
    assert pil.size == size and pil.mode == "RGB"
    assert array.shape == (1, size[1], size[0], 3) and array.dtype == np.float32
    assert tensor.shape == (1, 3, size[1], size[0]) and 0 <= tensor.min() and tensor.max() <= 1
    assert np.array_equal(array[0], tensor[0].permute(1, 2, 0).numpy())
    assert np.abs(np.asarray(pil, dtype=np.float32) - array[0] * 255).max() <= 0.5 + 1e-3  # pil is np, quantised


def test_outscale_is_the_4x_output_resampled_with_lanczos(pipe):
    image = photo("astronaut", (30, 20))
    full = pipe(image, generator=_seed()).images[0]
    assert pipe(image, outscale=4, generator=_seed()).images[0].tobytes() == full.tobytes()
    resized = pipe(image, outscale=2.5, generator=_seed()).images[0]
    expected = full.resize((75, 50), PIL.Image.Resampling.LANCZOS)  # what Real-ESRGAN-style tools do to the 4x
    difference = np.abs(np.asarray(resized, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert difference.max() <= 1


def test_greyscale_rgba_and_mixed_sizes_keep_channels_at_outscale(pipe):
    grey = np.asarray(photo("camera", (20, 16)).convert("L"))
    rgba = np.dstack([np.asarray(photo("astronaut", (12, 10))), np.full((10, 12), 200, dtype=np.uint8)])
    outputs = pipe([grey, rgba], outscale=1.5, output_type="np", generator=_seed()).images
    assert [output.shape for output in outputs] == [(24, 30, 1), (15, 18, 4)]
    assert outputs[1][..., 3] == pytest.approx(200 / 255, abs=1e-3)  # alpha resampled too, still flat


def test_one_pixel_is_the_smallest_output(pipe):
    assert pipe(photo("chelsea", (3, 2)), outscale=0.1, generator=_seed()).images[0].size == (1, 1)


@pytest.mark.parametrize("outscale", [0, -1.5, math.nan, math.inf, "2", True])
def test_bad_outscale_is_one_clear_error(pipe, outscale):
    with pytest.raises(ValueError, match="`outscale` must be"):
        pipe(photo("chelsea", (8, 8)), outscale=outscale)


def test_outscale_and_latents_do_not_mix(pipe):
    with pytest.raises(ValueError, match="output_type='latent'"):
        pipe(photo("chelsea", (8, 8)), outscale=2, output_type="latent")
    assert pipe(photo("chelsea", (8, 8)), outscale=4, output_type="latent").images.ndim == 4


def test_cli_outscale(tmp_path, capsys):
    model = tmp_path / "model"
    tiny_student().save_pretrained(model)
    source = tmp_path / "photo.png"
    photo("rocket", (30, 20)).save(source)
    assert main(["upscale", str(source), "--model", str(model), "-o", str(tmp_path / "out"), "--outscale", "2.5"]) == 0
    with PIL.Image.open(tmp_path / "out" / "photo.png") as output:
        assert output.size == (75, 50)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["upscale", str(source), "--model", str(model), "-o", str(tmp_path / "out"), "--outscale", "0"])
    assert "--outscale must be a number > 0" in capsys.readouterr().err
