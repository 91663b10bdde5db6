"""`tinysr upscale`: good images written 4x and atomically, bad files reported one line each, inputs untouched."""

import hashlib
import io
from pathlib import Path

import PIL.Image
import pytest

from tests.tiny_pipelines import photo, tiny_student
from tinysr_diffusers.cli import main


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    tiny_student().save_pretrained(folder)
    return folder


def _digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir()}


@pytest.fixture
def inputs(tmp_path) -> Path:
    """Good photos beside a corrupt JPEG, a 0-byte file, a truncated PNG, a text file and a 1x1 image."""
    folder = tmp_path / "in"
    folder.mkdir()
    photo("astronaut", (40, 30)).save(folder / "astronaut.png")
    photo("coffee", (33, 21)).save(folder / "coffee.jpg")
    photo("chelsea", (27, 18)).convert("L").save(folder / "chelsea_grey.png")
    PIL.Image.new("RGB", (1, 1), (200, 30, 10)).save(folder / "one_pixel.png")
    (folder / "empty.png").write_bytes(b"")
    png = io.BytesIO()
    photo("rocket", (60, 40)).save(png, format="PNG")
    (folder / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 8)
    (folder / "notes.txt").write_text("not an image\n")
    return folder


GOOD = {"astronaut": (160, 120), "coffee": (132, 84), "chelsea_grey": (108, 72), "one_pixel": (4, 4)}
BAD = ["corrupt.jpg", "empty.png", "notes.txt", "truncated.png"]


def test_folder_with_bad_files(model, inputs, tmp_path, capsys):
    before = _digests(inputs)
    out = tmp_path / "out"
    code = main(["upscale", str(inputs), "--model", str(model), "-o", str(out), "--batch-size", "2"])
    captured = capsys.readouterr()

    assert code == 1  # some inputs failed
    assert sorted(path.name for path in out.iterdir()) == sorted(f"{name}.png" for name in GOOD)  # no temp files
    for name, size in GOOD.items():
        with PIL.Image.open(out / f"{name}.png") as image:
            assert image.size == size
    with PIL.Image.open(out / "chelsea_grey.png") as image:
        assert image.mode == "L"

    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(BAD)
    for name in BAD:
        (line,) = [line for line in errors if f"{name}:" in line]
        assert str(inputs / name) in line
    assert "Upscaled 4 of 8 input(s)" in captured.out and "4 failed" in captured.out
    assert _digests(inputs) == before  # inputs untouched


def test_output_next_to_the_inputs_never_overwrites_them(model, inputs, capsys):
    before = _digests(inputs)
    sources = [str(inputs / "astronaut.png"), str(inputs / "coffee.jpg")]
    code = main(["upscale", *sources, "--model", str(model), "-o", str(inputs)])
    captured = capsys.readouterr()
    assert code == 1
    assert "astronaut.png would overwrite an input" in captured.err
    assert _digests(inputs) == {**before, "coffee.png": _digests(inputs)["coffee.png"]}  # only the new file


def test_options_and_a_clean_run(model, tmp_path, capsys):
    source = tmp_path / "photo.png"
    photo("coffee", (18, 10)).save(source)
    out = tmp_path / "out"
    code = main(
        [
            "upscale",
            str(source),
            "--model",
            str(model),
            "-o",
            str(out),
            "--tile-size",
            "8",
            "--tile-overlap",
            "2",
            "--color-fix",
            "wavelet",
            "--dtype",
            "bfloat16",
            "--device",
            "cpu",
            "--format",
            "webp",
        ]
    )
    assert code == 0
    with PIL.Image.open(out / "photo.webp") as image:
        assert image.size == (72, 40) and image.format == "WEBP"
    assert "Upscaled 1 of 1 input(s)" in capsys.readouterr().out


def test_bad_model_and_bad_arguments(tmp_path, capsys):
    source = tmp_path / "photo.png"
    photo("coffee", (8, 8)).save(source)
    assert main(["upscale", str(source), "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "out")]) == 2
    assert "cannot load --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["upscale", str(source), "--model", "x", "-o", "y", "--tile-size", "8", "--tile-overlap", "8"])
    with pytest.raises(SystemExit):
        main(["upscale", str(source), "-o", "y"])  # --model is required
