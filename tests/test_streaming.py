"""The streamed recipe: tile by tile from the low-resolution input to the output, no full-resolution float tensor,
equal to the same recipe on the whole decoded image within 1/255 on real photos (tiny random models, CPU)."""

import numpy as np
import PIL.Image
import pytest
import torch

from tests.tiny_pipelines import photo, tiny_autoencoder_kl, tiny_autoencoder_tiny, tiny_student, tiny_tinysr_vae
from tinysr_diffusers.color_fix import ChannelStatistics, _mean_std
from tinysr_diffusers.image_processing import UpscaledPixels, bicubic_upscale, reflect_pad_to_multiple
from tinysr_diffusers.tiling import tiled_map, tiled_rows


TILES = {"tile_size": 16, "tile_overlap": 4}  # 128-px latent tiles: the photos below take 2x3 to 3x3 of them


def _tiled_reference(pipe, image, **kwargs):
    """The same call with the decoded image joined into one band (`tiled_map`'s blend of the same tiles): the colour
    fix of the whole image and float outputs, as the tiled pipeline before streaming computed them."""
    decode_bands = pipe.decode_bands

    def one_band(*args, **options):
        yield 0, torch.cat([rows for _, rows in decode_bands(*args, **options)], dim=-2)

    pipe.decode_bands = one_band
    try:
        return pipe(image, **kwargs).images
    finally:
        del pipe.decode_bands


@pytest.fixture(scope="module", params=["tinysr", "autoencoder_tiny"])
def pipe(request):
    return tiny_student(vae={"tinysr": tiny_tinysr_vae, "autoencoder_tiny": tiny_autoencoder_tiny}[request.param]())


# ------------------------------------------------------------------------------------------------------- pieces
def test_bands_of_tiled_rows_are_tiled_map_exactly():
    x = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))

    def fn(tiles: torch.Tensor) -> torch.Tensor:
        return torch.cat([tiles, tiles.flip(-1)], 1).repeat_interleave(2, -1).repeat_interleave(2, -2)

    whole = tiled_map(fn, x, 16, 5, scale=2, align=2, tiles_per_batch=3)
    bands = list(tiled_rows(fn, x, 16, 5, scale=2, align=2, tiles_per_batch=3))
    tops = [top for top, _ in bands]
    assert len(bands) == 4 and tops == sorted(tops)
    assert all(top + rows.shape[-2] == next_top for (top, rows), next_top in zip(bands, tops[1:]))
    assert torch.equal(torch.cat([rows for _, rows in bands], dim=-2), whole)


@pytest.mark.parametrize("size", [(27, 18), (5, 3), (1, 2), (40, 33)])
def test_upscaled_pixels_are_the_padded_bicubic_upscale_crop_by_crop(size):
    low_res = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    full = reflect_pad_to_multiple(bicubic_upscale(low_res, 4), 16) * 2 - 1
    lazy = UpscaledPixels(low_res, 4, 16, torch.float32)
    height, width = full.shape[-2:]
    assert lazy.shape == full.shape
    for top, bottom, left, right in [(0, height, 0, width), (3, 11, 5, 13), (height - 16, height, width - 16, width)]:
        assert torch.equal(lazy[..., top:bottom, left:right], full[..., top:bottom, left:right])


def test_channel_statistics_in_pieces_equal_the_whole():
    image = torch.rand(2, 3, 50, 30, generator=torch.Generator().manual_seed(2))
    statistics = ChannelStatistics()
    for piece in image.split(7, dim=-2):
        statistics.update(piece)
    for streamed, whole in zip(statistics.mean_std(), _mean_std(image)):
        torch.testing.assert_close(streamed, whole)


# ------------------------------------------------------------------------------------------------ the pipeline
@pytest.mark.parametrize("color_fix", ["adain", "wavelet", None])
def test_streamed_equals_the_tiled_pipeline_on_a_multi_tile_photo(pipe, color_fix):
    image = photo("astronaut", (72, 56))  # 288x224 out: 36x28 latents, 3x2 tiles
    kwargs = {"output_type": "np", "color_fix": color_fix, **TILES}
    streamed = pipe(image, **kwargs).images
    expected = _tiled_reference(pipe, image, **kwargs)
    assert streamed.shape == expected.shape == (1, 224, 288, 3)
    assert np.abs(streamed - expected).max() <= 1 / 255
    pil = pipe(image, color_fix=color_fix, **TILES).images[0]
    difference = np.abs(np.asarray(pil, dtype=np.int16) - np.round(expected[0] * 255).astype(np.int16))
    assert difference.max() <= 1


def test_streamed_batches_greyscale_rgba_and_outscale(pipe):
    rgb = np.asarray(photo("coffee", (60, 44)))
    grey = np.asarray(photo("camera", (60, 44)).convert("L"))
    rgba = np.dstack([np.asarray(photo("chelsea", (60, 44))), np.asarray(photo("camera", (60, 44)).convert("L"))])
    images = [rgb, grey, rgba]
    for kwargs in ({"output_type": "pt", "color_fix": "wavelet"}, {"output_type": "np", "outscale": 2.5}):
        streamed = pipe(images, **TILES, **kwargs).images
        expected = _tiled_reference(pipe, images, **TILES, **kwargs)
        for a, b in zip(streamed, expected):
            assert a.shape == b.shape
            assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1 / 255
    assert [image.shape for image in streamed] == [(110, 150, 3), (110, 150, 1), (110, 150, 4)]


def _bands_per_call(pipe) -> list[int]:
    """How many bands each call's decoding gives (one: the whole image at once)."""
    counts, decode_bands = [], pipe.decode_bands

    def counted(*args, **options):
        counts.append(0)
        for band in decode_bands(*args, **options):
            counts[-1] += 1
            yield band

    pipe.decode_bands = counted
    return counts


def test_only_multi_tile_images_with_a_tiny_vae_are_streamed():
    pipe = tiny_student()
    counts = _bands_per_call(pipe)
    pipe(photo("astronaut", (16, 16)), **TILES)  # 8x8 latents: one tile
    pipe(photo("astronaut", (48, 40)), tile_size=None)
    assert counts == [1, 1]
    pipe(photo("astronaut", (48, 40)), **TILES)  # 160 rows: 2x2 tiles of 128 px, in 3 bands
    assert counts[-1] == 3
    pipe.vae.enable_tiling(4096, 64)  # the user's own VAE tiling is kept: not streamed
    pipe(photo("astronaut", (48, 40)), **TILES)
    assert counts[-1] == 1 and pipe.vae.tile_sample_size == 4096
    teacher = tiny_student(vae=tiny_autoencoder_kl())  # diffusers tiles AutoencoderKL its own way
    counts = _bands_per_call(teacher)
    teacher(photo("astronaut", (48, 40)), **TILES)
    assert counts == [1] and not teacher.vae.use_tiling


def test_tile_progress_bar_respects_set_progress_bar_config(capsys):
    pipe = tiny_student()
    image = photo("astronaut", (48, 40))
    pipe.set_progress_bar_config(disable=True)
    pipe(image, **TILES)
    assert capsys.readouterr().err == ""
    pipe.set_progress_bar_config(desc="Tiles")
    pipe(image, **TILES)
    assert "Tiles: 100%" in capsys.readouterr().err


def test_streamed_pil_output_is_8_bit_and_exact_size():
    output = tiny_student()(PIL.Image.new("RGB", (45, 37), (120, 60, 30)), **TILES).images[0]
    assert output.mode == "RGB" and output.size == (180, 148)


def test_streamed_in_bfloat16_and_with_model_cpu_offload():
    image = photo("astronaut", (48, 40))
    kwargs = {"output_type": "np", **TILES}
    half = tiny_student()
    half.transformer.to(torch.bfloat16), half.vae.to(torch.bfloat16)
    assert np.abs(half(image, **kwargs).images - _tiled_reference(half, image, **kwargs)).max() <= 1 / 255
    pipe = tiny_student()
    reference = pipe(image, **kwargs).images
    pipe.enable_model_cpu_offload(device="cpu")  # the hooks run as on an accelerator (no GPU here)
    np.testing.assert_array_equal(pipe(image, **kwargs).images, reference)


_PEAK_SCRIPT = """
import json, sys
import numpy as np
from benchmarks.memory import PeakMemory
from tests.tiny_pipelines import tiny_student
pipe = tiny_student()
image = np.random.default_rng(0).integers(0, 256, (int(sys.argv[1]) // 4,) * 2 + (3,), dtype=np.uint8)
pipe(image[:80, :80], tile_size=8, tile_overlap=2)  # warm-up
peak = PeakMemory("cpu")
peak.start()
pipe(image, tile_size=64, tile_overlap=8, color_fix=sys.argv[2])
print(json.dumps(peak.stop()))
"""


@pytest.mark.slow
@pytest.mark.parametrize("color_fix", ["wavelet", "adain"])
def test_streamed_peak_memory_grows_by_a_few_bytes_per_output_pixel(color_fix):
    """A benchmark figure, not a timing: each size in a fresh process, peak RSS above the resident size before the
    call. Measured from 2048 to 4096 px output on an AVX2 AMD EPYC: wavelet (one pass; the uint8 output and its PIL
    copy 7, latents 1) 8.6 to 12.5 B/px over runs; AdaIN, whose global statistics need the decoded image kept as
    uint16 (6 B/px more), 10.8 to 13.3 B/px. The spread is the allocator's retained heap, so the bound (16) guards
    against a full-size float buffer coming back (4 B/px a channel; the pipeline before streaming: 57 B/px)."""
    bound = 16
    import json
    import os
    import subprocess
    import sys

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's resettable peak RSS")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    peaks = {}
    for side in (2048, 4096):
        command = [sys.executable, "-c", _PEAK_SCRIPT, str(side), color_fix]
        peaks[side] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout)
    growth = (peaks[4096] - peaks[2048]) * 2**20 / (4096**2 - 2048**2)
    assert growth <= bound, f"{growth:.1f} bytes per added output pixel (peaks {peaks} MiB)"


def test_a_streamed_image_shows_one_tile_bar_over_its_three_passes(capsys):
    pipe = tiny_student()
    pipe.set_progress_bar_config(desc="Tiles")
    pipe(photo("astronaut", (48, 40)), **TILES)  # 2x2 latent tiles: 4 to encode, 1 batch of 4, 4 to decode
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and " 9/9 [" in err.rsplit("\r", 1)[-1]  # one bar, closed once, all 9 batches


# ------------------------------------------------------------------------------------------ uint16 outputs
def _as_uint16(floats) -> np.ndarray:
    """What `output_type="uint16"` promises: round(65535 * x) of the float output."""
    return (np.clip(np.asarray(floats, dtype=np.float32), 0, 1) * 65535).round().astype(np.uint16)


@pytest.mark.parametrize("color_fix", ["adain", "wavelet", None])
def test_streamed_uint16_is_the_float_output_at_16_bits(pipe, color_fix):
    rgb = np.asarray(photo("coffee", (60, 44)))  # 240x176 out: 30x22 latents, 2x2 tiles of 16
    grey = np.asarray(photo("camera", (60, 44)).convert("L"))
    rgba = np.dstack([np.asarray(photo("chelsea", (60, 44))), grey])
    for image, channels in ((rgb, 3), (grey, 1), (rgba, 4)):
        kwargs = {"color_fix": color_fix, **TILES}
        deep = pipe(image, output_type="uint16", **kwargs).images
        floats = pipe(image, output_type="np", **kwargs).images
        assert isinstance(deep, np.ndarray) and deep.dtype == np.uint16 and deep.shape == (1, 176, 240, channels)
        difference = np.abs(deep.astype(np.int32) - _as_uint16(floats))
        assert difference.max() <= 1, (channels, difference.max())


def test_streamed_uint16_batches_mixed_layouts_and_outscale(pipe):
    rgb = np.asarray(photo("coffee", (60, 44)))
    grey = np.asarray(photo("camera", (60, 44)).convert("L"))
    rgba = np.dstack([np.asarray(photo("chelsea", (60, 44))), grey])
    images = [rgb, grey, rgba]
    deep = pipe(images, output_type="uint16", outscale=2.5, **TILES).images
    floats = pipe(images, output_type="np", outscale=2.5, **TILES).images
    assert isinstance(deep, list)  # shapes differ in channels: a list, as for "np"
    assert [image.shape for image in deep] == [(110, 150, 3), (110, 150, 1), (110, 150, 4)]
    for a, b in zip(deep, floats):
        assert a.dtype == np.uint16
        # the streamed uint16 is resampled from 16 bits, the float one from floats: one more rounding
        assert np.abs(a.astype(np.int32) - _as_uint16(b)).max() <= 1
    same_size = pipe([rgb, rgb[::-1].copy()], output_type="uint16", **TILES).images
    assert isinstance(same_size, np.ndarray) and same_size.shape == (2, 176, 240, 3)


@pytest.mark.parametrize("outscale", [None, 3])
def test_untiled_uint16_is_the_pt_output_converted(pipe, outscale):
    rgb = np.asarray(photo("coffee", (20, 14)))
    rgba = np.dstack([rgb, np.asarray(photo("camera", (20, 14)).convert("L"))])
    grey = rgb[..., 1].copy()
    images = [rgb, grey, rgba]
    deep = pipe(images, output_type="uint16", tile_size=None, outscale=outscale).images
    floats = pipe(images, output_type="pt", tile_size=None, outscale=outscale).images
    for a, b in zip(deep, floats):
        assert a.dtype == np.uint16 and a.shape == tuple(b.permute(1, 2, 0).shape)
        np.testing.assert_array_equal(a, _as_uint16(b.permute(1, 2, 0)))


def test_unknown_output_types_are_refused_and_a_one_tile_uint16_output_is_16_bit():
    pipe = tiny_student()
    with pytest.raises(ValueError, match="output_type"):
        pipe(photo("astronaut", (16, 16)), output_type="uint8")
    single = pipe(photo("astronaut", (16, 16)), output_type="uint16", **TILES).images  # one tile: not streamed
    assert single.dtype == np.uint16 and single.shape == (1, 64, 64, 3)
