"""Inputs that once came back wrong without an error: NaN and empty images, 32-bit PIL modes, ICC profiles, animated
and 16-bit files; and a folder of generated malformed files, each of which must get one clear line."""

import hashlib
import io
import itertools
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import skimage.color
import torch

from tests.tiny_pipelines import photo, tiny_student
from tinysr_diffusers.cli import main
from tinysr_diffusers.image_processing import to_tensors


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    tiny_student().save_pretrained(folder)
    return folder


def _upscale(model: Path, source: Path, out: Path, capsys) -> tuple[int, list[str]]:
    """Run `tinysr upscale` on one file; returns the exit code and the error and warning lines."""
    code = main(["upscale", str(source), "--model", str(model), "-o", str(out)])
    lines = capsys.readouterr().err.splitlines()
    return code, [line for line in lines if line.startswith(("error: ", "warning: "))]


def _mean_colour(path: Path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        assert "icc_profile" not in image.info  # outputs are sRGB, untagged
        return np.asarray(image.convert("RGB"), dtype=np.float64).mean(axis=(0, 1))


# ----------------------------------------------------------------------------------------- NaN, empty, PIL modes
def test_nan_and_empty_images_are_refused_clearly():
    with pytest.raises(ValueError, match="NaN"):
        to_tensors(np.full((4, 4, 3), np.nan, dtype=np.float32))
    nan_pixel = torch.rand(3, 4, 4)
    nan_pixel[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        to_tensors(nan_pixel)
    for empty in (torch.zeros(0, 3, 8, 8), torch.zeros(3, 0, 4), np.zeros((5, 0, 3), dtype=np.float32)):
        with pytest.raises(ValueError, match="Empty image"):
            to_tensors(empty)
    with pytest.raises(ValueError, match="Empty image"):
        to_tensors(PIL.Image.new("RGB", (0, 4)))


def test_32_bit_pil_modes_are_scaled_or_refused_by_name():
    def value(image: PIL.Image.Image) -> float:
        (tensor,) = to_tensors(image)
        return tensor.mean().item()

    def grey(array, mode: str) -> PIL.Image.Image:
        image = PIL.Image.fromarray(np.asarray(array))
        assert image.mode == mode
        return image

    assert value(grey(np.full((4, 4), 0.5, dtype=np.float32), "F")) == pytest.approx(0.5)  # float in [0, 1]
    assert value(grey(np.full((4, 4), 128.0, dtype=np.float32), "F")) == pytest.approx(128 / 255)  # PIL's 0-255
    assert value(PIL.Image.new("L", (4, 4), 200).convert("I")) == pytest.approx(200 / 255)  # 8-bit values
    assert value(grey(np.full((4, 4), 40000, dtype=np.int32), "I")) == pytest.approx(40000 / 65535)  # 16-bit
    with pytest.raises(ValueError, match="PIL mode F .*NaN"):
        to_tensors(grey(np.full((4, 4), np.nan, dtype=np.float32), "F"))
    with pytest.raises(ValueError, match=r"PIL mode F images must have values in \[0, 255\]"):
        to_tensors(grey(np.full((4, 4), -5.0, dtype=np.float32), "F"))
    with pytest.raises(ValueError, match=r"PIL mode I images must have values in \[0, 65535\]"):
        to_tensors(grey(np.full((4, 4), 70000, dtype=np.int32), "I"))


def test_cli_names_a_float_tiff_with_nan(model, tmp_path, capsys):
    source = tmp_path / "nan.tiff"
    array = np.full((6, 6), 0.5, dtype=np.float32)
    array[2, 3] = np.nan
    PIL.Image.fromarray(array).save(source)
    code, lines = _upscale(model, source, tmp_path / "out", capsys)
    assert code == 1 and lines == [
        f"warning: {source}: 32-bit input: the output is 8-bit",
        f"error: {source}: ValueError: PIL mode F images must not contain NaN.",
    ]
    assert not (tmp_path / "out" / "nan.png").exists()


# ------------------------------------------------------------------------------------------------------ ICC profiles
def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + bytes(4) + _s15(x) + _s15(y) + _s15(z)


def _curve(gamma: float) -> bytes:
    return b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)


def _icc_profile(space: bytes, pcs: bytes, tags: dict[bytes, bytes]) -> bytes:
    """A minimal ICC v2 profile: 128-byte header, tag table, tag data (4-byte aligned)."""
    table, data = b"", b""
    start = 128 + 4 + 12 * len(tags)
    for signature, body in tags.items():
        body += bytes(-len(body) % 4)
        table += signature + struct.pack(">II", start + len(data), len(body))
        data += body
    header = struct.pack(">I", start + len(data)) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntr" + space + pcs
    header += bytes(12) + b"acsp" + bytes(28) + _s15(0.9642) + _s15(1.0) + _s15(0.8249)
    return header + bytes(128 - len(header)) + struct.pack(">I", len(tags)) + table + data


D50 = _xyz(0.9642, 1.0, 0.8249)
GREY_LINEAR = _icc_profile(b"GRAY", b"XYZ ", {b"wtpt": D50, b"kTRC": _curve(1.0)})  # linear light: 128 is sRGB 188
# sRGB's (D50-adapted) primaries with red and green swapped: red in this space is green in sRGB.
_RED, _GREEN, _BLUE = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)
RGB_SWAPPED = _icc_profile(
    b"RGB ",
    b"XYZ ",
    {b"wtpt": D50, b"rXYZ": _xyz(*_GREEN), b"gXYZ": _xyz(*_RED), b"bXYZ": _xyz(*_BLUE)}
    | {signature: _curve(2.2) for signature in (b"rTRC", b"gTRC", b"bTRC")},
)


def _cmyk_swapped() -> bytes:
    """A CMYK profile (lut8, 2-point grid, Lab PCS) whose cyan ink prints magenta and magenta ink cyan."""
    grid = b""
    for c, m, y, k in itertools.product((0.0, 1.0), repeat=4):  # the first channel varies slowest
        rgb = np.array([[[(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)]]])[..., [1, 0, 2]]
        lightness, a, b = skimage.color.rgb2lab(rgb, illuminant="D50")[0, 0]
        grid += bytes([round(lightness * 2.55), round(a + 128), round(b + 128)])
    ramp = bytes(range(256))
    identity = b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    lut = b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + identity + ramp * 4 + grid + ramp * 3
    return _icc_profile(b"CMYK", b"Lab ", {b"wtpt": D50, b"A2B0": lut})


def test_cmyk_jpeg_is_converted_to_srgb_through_its_profile(model, tmp_path, capsys):
    source = tmp_path / "cyan.jpg"
    PIL.Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(source, quality=95, icc_profile=_cmyk_swapped())
    code, lines = _upscale(model, source, tmp_path / "out", capsys)
    assert code == 0 and lines == []
    with PIL.Image.open(tmp_path / "out" / "cyan.png") as image:
        assert image.mode == "RGB"
    red, green, blue = _mean_colour(tmp_path / "out" / "cyan.png")
    assert red > 200 and green < 60 and blue > 200  # magenta, as the profile says (a naive conversion: cyan)


def test_rgb_and_grey_profiles_are_converted_and_not_copied(model, tmp_path, capsys):
    rgb = tmp_path / "swapped.png"
    PIL.Image.new("RGB", (8, 8), (200, 30, 10)).save(rgb, icc_profile=RGB_SWAPPED)
    grey = tmp_path / "grey.png"
    PIL.Image.new("L", (8, 8), 128).save(grey, icc_profile=GREY_LINEAR)
    grey_alpha = tmp_path / "grey_alpha.png"
    PIL.Image.new("LA", (8, 8), (128, 100)).save(grey_alpha, icc_profile=GREY_LINEAR)
    out = tmp_path / "out"
    for source in (rgb, grey, grey_alpha):
        assert _upscale(model, source, out, capsys) == (0, [])

    red, green, _ = _mean_colour(out / "swapped.png")
    assert green > 150 and red < 80  # the profile's red is sRGB's green
    with PIL.Image.open(out / "grey.png") as image:
        assert image.mode == "L" and "icc_profile" not in image.info
        assert np.asarray(image).mean() == pytest.approx(188, abs=3)  # linear 0.5 in sRGB
    with PIL.Image.open(out / "grey_alpha.png") as image:  # greyscale + alpha stays LA, without the grey profile
        assert image.mode == "LA" and "icc_profile" not in image.info
        assert np.asarray(image)[..., 0].mean() == pytest.approx(188, abs=3)


def test_unusable_profile_is_named_and_ignored(model, tmp_path, capsys):
    source = tmp_path / "broken_profile.png"
    PIL.Image.new("RGB", (8, 8), (200, 30, 10)).save(source, icc_profile=b"not a profile" * 20)
    mismatched = tmp_path / "grey_profile_on_rgb.png"
    PIL.Image.new("RGB", (8, 8), (200, 30, 10)).save(mismatched, icc_profile=GREY_LINEAR)
    out = tmp_path / "out"
    for path in (source, mismatched):
        code, lines = _upscale(model, path, out, capsys)
        assert code == 0 and len(lines) == 1 and lines[0].startswith(f"warning: {path}: ignoring its ICC profile")
        red, green, _ = _mean_colour(out / f"{path.stem}.png")
        assert red > 150 and green < 80  # the pixels, taken as sRGB


# ----------------------------------------------------------------------------------- frames and 16-bit samples
def _png_48_bit(path: Path, array: np.ndarray) -> None:
    """Write (H, W, 3) uint16 as a 16-bit-per-channel PNG (PIL reads such files but cannot write them)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, _ = array.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in array)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def test_extra_frames_are_warned_about_and_16_bit_samples_kept(model, tmp_path, capsys):
    red, blue = PIL.Image.new("RGB", (8, 8), (220, 20, 20)), PIL.Image.new("RGB", (8, 8), (20, 20, 220))
    gif, tiff = tmp_path / "animated.gif", tmp_path / "pages.tiff"
    red.save(gif, save_all=True, append_images=[blue], duration=100, loop=0)
    red.save(tiff, save_all=True, append_images=[blue, blue])
    grey16, rgb48, plain = tmp_path / "grey16.png", tmp_path / "rgb48.png", tmp_path / "plain.png"
    PIL.Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(grey16)
    _png_48_bit(rgb48, np.full((8, 8, 3), (50000, 10000, 10000), dtype=np.uint16))
    red.save(plain)
    out = tmp_path / "out"

    expected = {
        gif: ["it has 2 frames (animated or multi-page): only the first is upscaled"],
        tiff: ["it has 3 frames (animated or multi-page): only the first is upscaled"],
        grey16: [],  # 16 bits in, 16 bits out (tests/test_sixteen_bit.py)
        rgb48: [],
    }
    for source, warnings_ in expected.items():
        assert _upscale(model, source, out, capsys) == (0, [f"warning: {source}: {w}" for w in warnings_])
    assert _upscale(model, plain, out, capsys) == (0, [])
    for name in ("animated", "pages"):
        r, _, b = _mean_colour(out / f"{name}.png")
        assert r > 150 and b < 80  # the first frame
    with PIL.Image.open(out / "grey16.png") as image:
        assert image.mode.startswith("I") and np.asarray(image).mean() == pytest.approx(40000, abs=3 * 257)
    with PIL.Image.open(out / "plain.png") as image:
        assert image.mode == "RGB"  # 8 bits stay 8 bits

    # A format without 16-bit samples still warns, and the output is 8-bit.
    code = main(["upscale", str(rgb48), "--model", str(model), "-o", str(out), "--format", "jpg"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert code == 0 and lines == [f"warning: {rgb48}: 16-bit input: the output is 8-bit"]
    r, g, _ = _mean_colour(out / "rgb48.jpg")
    assert r == pytest.approx(50000 / 257, abs=3) and g == pytest.approx(10000 / 257, abs=3)


def test_pil_warnings_are_one_line_naming_the_file(model, tmp_path, capsys, monkeypatch):
    source = tmp_path / "large.png"
    photo("coffee", (8, 8)).save(source)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 40)  # 64 pixels: a possible decompression bomb, not yet refused
    code, lines = _upscale(model, source, tmp_path / "out", capsys)
    assert code == 0 and len(lines) == 1
    assert lines[0].startswith(f"warning: {source}: Image size (64 pixels) exceeds limit of 40 pixels")


# ------------------------------------------------------------------------------- a folder of malformed files
HEADERS = {
    "png": b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
    "jpg": b"\xff\xd8\xff\xe0\0\x10JFIF\0",
    "gif": b"GIF89a",
    "bmp": b"BM",
    "tiff": b"II*\0",
    "webp": b"RIFF\x40\0\0\0WEBPVP8 ",
}


def _decodes(path: Path) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with PIL.Image.open(path) as image:
                image.load()
        return True
    except Exception:  # noqa: BLE001 - any failure makes it a bad file
        return False


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_folder_of_malformed_files(model, tmp_path, capsys):
    """Random bytes behind image headers and every format cut at many offsets: each good file is written, each bad
    one is named in one error line, nothing else in -o changes, and nothing prints a traceback."""
    rng = np.random.default_rng(0)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for index, (extension, header) in enumerate(HEADERS.items()):
        encoded = io.BytesIO()
        photo("coffee", (10 + index, 8)).save(encoded, format=PIL.Image.registered_extensions()[f".{extension}"])
        data = encoded.getvalue()
        (inputs / f"good_{extension}.{extension}").write_bytes(data)
        for offset in sorted({int(offset) for offset in np.linspace(0, len(data) - 1, 9)}):
            (inputs / f"{extension}_cut{offset}.{extension}").write_bytes(data[:offset])
        for size in (0, 7, 64, 300):
            noise = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            (inputs / f"{extension}_noise{size}.{extension}").write_bytes(header + noise)

    sources = sorted(inputs.iterdir())
    good = {path for path in sources if _decodes(path)}
    must_fail = [path for path in sources if "noise" in path.name or "_cut0." in path.name]
    assert not good.intersection(must_fail)
    assert {path.name for path in good} >= {f"good_{extension}.{extension}" for extension in HEADERS}
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file\n")
    (out / "good_png.png").write_bytes(b"an earlier output, kept without --overwrite")
    before = {path.name: _digest(path) for path in out.iterdir()}

    code = main(["upscale", str(inputs), "--model", str(model), "-o", str(out), "--batch-size", "2"])
    captured = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in captured.err + captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    kept = inputs / "good_png.png"
    for path in sources:
        named = [line for line in errors if line.startswith(f"error: {path}: ")]
        if path in good and path != kept:
            assert named == [], named
            with PIL.Image.open(path) as source, PIL.Image.open(out / f"{path.stem}.png") as output:
                assert output.size == (4 * source.width, 4 * source.height)
        else:
            assert len(named) == 1, (path, named)
    assert len(errors) == len(sources) - len(good) + 1
    assert "already exists" in next(line for line in errors if line.startswith(f"error: {kept}: "))
    assert sorted(path.name for path in out.iterdir()) == sorted({*before, *(f"{p.stem}.png" for p in good)})
    assert {name: _digest(out / name) for name in before} == before
    written = len(good) - 1
    assert f"Upscaled {written} of {len(sources)} input(s)" in captured.out
    assert f"{len(sources) - written} failed" in captured.out
