"""16 bits in, 16 bits out: `tinysr upscale` reads 16-bit PNG and TIFF files at full precision (PIL alone truncates
16-bit colour to 8 bits) and writes 16-bit PNG or TIFF; 8-bit inputs stay 8-bit (tiny random model, real photos)."""

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from tests.tiny_pipelines import photo, tiny_student
from tinysr_diffusers.cli import main
from tinysr_diffusers.devices import optimize_for_cpu
from tinysr_diffusers.image_io import read_image


cv2 = pytest.importorskip("cv2", reason="16-bit PNGs need opencv-python-headless")
tifffile = pytest.importorskip("tifffile", reason="16-bit TIFFs need tifffile")


@pytest.fixture(scope="module")
def pipe():
    return tiny_student()


@pytest.fixture(scope="module")
def model(tmp_path_factory, pipe) -> Path:
    folder = tmp_path_factory.mktemp("model")
    pipe.save_pretrained(folder)
    return folder


def _photo_16_bit(size=(20, 14)) -> np.ndarray:
    """A real photo at 16 bits whose low byte carries detail that an 8-bit reader loses."""
    rgb = np.asarray(photo("coffee", size), dtype=np.uint16)
    return rgb * 257 + np.random.default_rng(0).integers(0, 200, rgb.shape, dtype=np.uint16)


def _write_png(path: Path, array: np.ndarray) -> None:
    assert cv2.imwrite(str(path), array[..., [2, 1, 0, 3][: array.shape[-1]]] if array.ndim == 3 else array)


def _read(path: Path) -> np.ndarray:
    """uint16 RGB(A) or greyscale, whatever wrote it."""
    if path.suffix == ".tiff":
        return tifffile.imread(path)
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return array[..., [2, 1, 0, 3][: array.shape[-1]]] if array.ndim == 3 else array


def _expected(pipe, array: np.ndarray, **kwargs) -> np.ndarray:
    """What `tinysr upscale --dtype float32` computes: the pipeline with the CLI's CPU layout (channels_last VAE)."""
    generator = torch.Generator().manual_seed(0)
    output = optimize_for_cpu(pipe)(array, output_type="np", generator=generator, **kwargs).images[0]
    output = (output * 65535).round().astype(np.uint16)
    return output[..., 0] if output.shape[-1] == 1 else output


def _upscale(model: Path, source: Path, out: Path, capsys, *options: str) -> list[str]:
    # float32, as `_expected` computes (`--dtype auto` is bfloat16 on CPUs with native bf16 units)
    assert main(["upscale", str(source), "--model", str(model), "-o", str(out), "--dtype", "float32", *options]) == 0
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error: ", "warning: "))]


@pytest.mark.parametrize("file_format", ["png", "tiff"])
def test_16_bit_rgb_round_trip_keeps_the_precision(pipe, model, tmp_path, capsys, file_format):
    array = _photo_16_bit()
    source = tmp_path / f"photo.{'png' if file_format == 'png' else 'tif'}"
    if file_format == "png":
        _write_png(source, array)
    else:
        tifffile.imwrite(source, array, photometric="rgb")
    read, notes = read_image(source, deep=True)
    assert notes == [] and read.dtype == np.uint16 and np.array_equal(read, array)  # not truncated to 8 bits

    assert _upscale(model, source, tmp_path / "out", capsys, "--format", file_format) == []
    output = _read(tmp_path / "out" / f"photo.{file_format}")
    assert output.dtype == np.uint16 and output.shape == (56, 80, 3)
    assert np.array_equal(output, _expected(pipe, array))
    assert np.any(output % 257)  # not an 8-bit image widened


def test_16_bit_greyscale_alpha_and_outscale(pipe, model, tmp_path, capsys):
    grey = _photo_16_bit()[..., 1]
    rgba = np.dstack([_photo_16_bit((12, 10)), np.full((10, 12), 40000, dtype=np.uint16)])
    _write_png(tmp_path / "grey.png", grey)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    out = tmp_path / "out"
    assert _upscale(model, tmp_path / "grey.png", out, capsys, "--outscale", "2") == []
    assert _upscale(model, tmp_path / "rgba.tif", out, capsys, "--format", "tiff") == []
    assert np.array_equal(_read(out / "grey.png"), _expected(pipe, grey, outscale=2))
    output = _read(out / "rgba.tiff")
    assert output.shape == (40, 48, 4) and np.array_equal(output, _expected(pipe, rgba))
    with PIL.Image.open(out / "rgba.tiff") as image:  # an ordinary TIFF that PIL opens as RGBA
        assert image.mode == "RGBA" and image.size == (48, 40)


@pytest.mark.parametrize("file_format", ["png", "tiff"])
def test_streamed_16_bit_output_keeps_the_precision(pipe, model, tmp_path, capsys, file_format):
    """A multi-tile image: the pipeline streams it straight into uint16 (no full-size float image)."""
    array = _photo_16_bit((60, 44))  # 240x176 out: 30x22 latents, 2x2 tiles of 16
    source = tmp_path / "photo.png"
    _write_png(source, array)
    tiles = ("--tile-size", "16", "--tile-overlap", "4")
    assert _upscale(model, source, tmp_path / "out", capsys, "--format", file_format, *tiles) == []
    output = _read(tmp_path / "out" / f"photo.{file_format}")
    assert output.dtype == np.uint16 and output.shape == (176, 240, 3)
    expected = _expected(pipe, array, tile_size=16, tile_overlap=4)  # the float output, rounded to 16 bits
    assert np.abs(output.astype(np.int32) - expected).max() <= 1
    assert np.any(output % 257)


def test_8_bit_input_in_a_16_bit_batch_stays_8_bit(pipe, model, tmp_path, capsys):
    photo("rocket", (20, 14)).save(tmp_path / "a_eight.png")
    _write_png(tmp_path / "b_deep.png", _photo_16_bit())
    out = tmp_path / "out"
    assert _upscale(model, tmp_path, out, capsys, "--batch-size", "2") == []  # one call, output_type="uint16"
    with PIL.Image.open(out / "a_eight.png") as image:
        assert image.mode == "RGB" and image.size == (80, 56)
        expected = np.round(_expected(pipe, np.asarray(photo("rocket", (20, 14)))) / 257)
        assert np.abs(np.asarray(image, dtype=np.int32) - expected).max() <= 1
    assert _read(out / "b_deep.png").dtype == np.uint16


def test_exif_orientation_is_applied_to_16_bit_tiffs(tmp_path):
    array = _photo_16_bit()
    plain, oriented = tmp_path / "plain.tif", tmp_path / "oriented.tif"
    tifffile.imwrite(plain, array, photometric="rgb")
    tifffile.imwrite(oriented, array, photometric="rgb", extratags=[(274, "H", 1, 6, True)])  # rotate 90 cw
    read, _ = read_image(oriented, deep=True)
    assert np.array_equal(read, np.rot90(array, -1))
    eight_bit, _ = read_image(oriented)  # PIL's own orientation of the same file agrees
    assert eight_bit.size == (read.shape[1], read.shape[0])


def test_8_bit_stays_8_bit_and_jpeg_output_of_16_bit_warns(model, tmp_path, capsys):
    photo("rocket", (16, 12)).save(tmp_path / "eight.png")
    tifffile.imwrite(tmp_path / "eight.tif", np.asarray(photo("rocket", (16, 12))), photometric="rgb")
    _write_png(tmp_path / "deep.png", _photo_16_bit((16, 12)))
    out = tmp_path / "out"
    assert _upscale(model, tmp_path / "eight.png", out, capsys) == []
    assert _upscale(model, tmp_path / "eight.tif", out, capsys, "--format", "tiff") == []
    for name in ("eight.png", "eight.tiff"):
        with PIL.Image.open(out / name) as image:
            assert image.mode == "RGB" and image.size == (64, 48)
    source = tmp_path / "deep.png"
    assert _upscale(model, source, out, capsys, "--format", "webp") == [
        f"warning: {source}: 16-bit input: the output is 8-bit"
    ]


def test_verbose_lists_bit_depth_and_time_and_the_summary_has_per_file_times(model, tmp_path, capsys):
    photo("rocket", (16, 12)).save(tmp_path / "eight.png")
    _write_png(tmp_path / "deep.png", _photo_16_bit((16, 12)))
    code = main(["upscale", str(tmp_path / "eight.png"), str(tmp_path / "deep.png"), "--model", str(model)]
                + ["-o", str(tmp_path / "out"), "--verbose"])
    captured = capsys.readouterr()
    assert code == 0
    assert f"{tmp_path / 'eight.png'} -> {tmp_path / 'out' / 'eight.png'} (8-bit, " in captured.out + captured.err
    assert f"{tmp_path / 'deep.png'} -> {tmp_path / 'out' / 'deep.png'} (16-bit, " in captured.out + captured.err
    assert "Time per image: mean " in captured.out and ", slowest " in captured.out
