"""`tinysr upscale`: good images written 4x and atomically, bad files reported one line each, inputs untouched."""

import hashlib
import io
import os
import stat
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
        main(["upscale", "-o", "y"])  # an input is required


def _upscale(model: Path, *args: str) -> int:
    return main(["upscale", *args, "--model", str(model)])


def test_existing_outputs_are_kept_unless_overwrite_and_skipped_with_skip_existing(model, tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    photo("coffee", (12, 8)).save(inputs / "coffee.png")
    photo("astronaut", (10, 10)).save(inputs / "astronaut.png")
    (out / "coffee.png").write_bytes(b"the user's own file")

    assert _upscale(model, str(inputs), "-o", str(out)) == 1  # the existing output is an error ...
    captured = capsys.readouterr()
    assert (out / "coffee.png").read_bytes() == b"the user's own file"  # ... and is kept
    (line,) = [line for line in captured.err.splitlines() if "already exists" in line]
    assert line.startswith(f"error: {inputs / 'coffee.png'}: ") and "--overwrite" in line
    assert "Upscaled 1 of 2 input(s)" in captured.out and "0 skipped" in captured.out and "1 failed" in captured.out
    written = _digests(out)["astronaut.png"]

    assert _upscale(model, str(inputs), "-o", str(out), "--skip-existing") == 0  # a resumed run
    captured = capsys.readouterr()
    assert "Upscaled 0 of 2 input(s)" in captured.out and "2 skipped" in captured.out and "0 failed" in captured.out
    assert (out / "coffee.png").read_bytes() == b"the user's own file" and _digests(out)["astronaut.png"] == written

    assert _upscale(model, str(inputs), "-o", str(out), "--overwrite") == 0
    assert "Upscaled 2 of 2 input(s)" in capsys.readouterr().out
    with PIL.Image.open(out / "coffee.png") as image:
        assert image.size == (48, 32)
    with pytest.raises(SystemExit):
        _upscale(model, str(inputs), "-o", str(out), "--overwrite", "--skip-existing")
    assert "not allowed with argument" in capsys.readouterr().err


def test_recursive_run_does_not_take_its_output_folder_as_input(model, tmp_path, capsys):
    inputs = tmp_path / "in"
    out = inputs / "out"
    out.mkdir(parents=True)
    photo("coffee", (12, 8)).save(inputs / "coffee.png")
    photo("astronaut", (10, 10)).save(out / "earlier_output.png")  # left by an earlier run

    assert _upscale(model, str(inputs), "-o", str(out), "--recursive") == 0
    assert "Upscaled 1 of 1 input(s)" in capsys.readouterr().out
    assert sorted(path.relative_to(inputs).as_posix() for path in inputs.rglob("*")) == [
        "coffee.png",
        "out",
        "out/coffee.png",
        "out/earlier_output.png",
    ]


def test_outputs_follow_the_umask(model, tmp_path, capsys):
    source = tmp_path / "photo.png"
    photo("coffee", (8, 8)).save(source)
    previous = os.umask(0o022)
    try:
        assert _upscale(model, str(source), "-o", str(tmp_path / "out")) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out" / "photo.png").stat().st_mode) == 0o644


def test_unusable_output_folder_is_refused_before_the_model_loads(tmp_path, capsys):
    source = tmp_path / "photo.png"
    photo("coffee", (8, 8)).save(source)
    missing_model = tmp_path / "no-model"  # loading it would fail: the -o check must come first
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")

    assert main(["upscale", str(source), "--model", str(missing_model), "-o", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: -o {a_file}: is a file, not a folder"]
    assert main(["upscale", str(source), "--model", str(missing_model), "-o", str(a_file / "out")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: -o {a_file / 'out'}: cannot write there") and "Traceback" not in line
    assert a_file.read_text() == "not a folder\n"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs permissions that bind (not root)")
def test_read_only_output_folder_is_refused_before_the_model_loads(tmp_path, capsys):
    source = tmp_path / "photo.png"
    photo("coffee", (8, 8)).save(source)
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    try:
        assert main(["upscale", str(source), "--model", str(tmp_path / "no-model"), "-o", str(read_only)]) == 2
    finally:
        read_only.chmod(0o755)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: -o {read_only}: cannot write there")


def test_large_files_get_a_tile_progress_bar_under_the_files_bar(model, tmp_path, capsys):
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    photo("astronaut", (16, 16)).save(small)  # one latent tile
    photo("astronaut", (48, 40)).save(large)  # 24x20 latents in 8-pixel tiles: several batches
    assert _upscale(model, str(small), "-o", str(tmp_path / "out")) == 0
    assert "Tiles" not in capsys.readouterr().err
    assert _upscale(model, str(large), "-o", str(tmp_path / "out"), "--tile-size", "8", "--tile-overlap", "2") == 0
    err = capsys.readouterr().err
    assert "Upscaling" in err and "Tiles: " in err and "batch" in err and "<" in err  # tqdm's elapsed<remaining


def test_tile_size_auto(model, tmp_path, capsys):
    source = tmp_path / "photo.png"
    photo("astronaut", (40, 30)).save(source)
    assert _upscale(model, str(source), "-o", str(tmp_path / "out"), "--tile-size", "auto") == 0  # CPU: 64
    with PIL.Image.open(tmp_path / "out" / "photo.png") as image:
        assert image.size == (160, 120)
    with pytest.raises(SystemExit):
        _upscale(model, str(source), "-o", str(tmp_path / "out"), "--tile-size", "big")
    assert "expected a whole number or auto, got 'big'" in capsys.readouterr().err
