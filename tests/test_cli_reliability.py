"""The command line and the demo under the attacks of issue 27 (round 2): parallel runs into one folder, outputs of
unbounded size, the input folder as output folder, Ctrl-C, transparency into JPEG, a file named twice, thin images in
the demo, and ONNX exports in the demo."""

from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from tests.tiny_pipelines import photo, tiny_student
from tinysr_diffusers import cli
from tinysr_diffusers.cli import main
from tinysr_diffusers.utils import atomic_path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    tiny_student().save_pretrained(folder)
    return folder


@pytest.fixture
def small(tmp_path) -> Path:
    path = tmp_path / "small.png"
    photo("astronaut", (32, 24)).save(path)
    return path


def _errors(capsys) -> tuple[list[str], str]:
    captured = capsys.readouterr()
    return [line for line in captured.err.splitlines() if line.startswith(("error: ", "warning: "))], captured.out


# -------------------------------------------------------------------------------------------- parallel runs (item 2)
def test_an_atomic_path_that_must_not_replace_keeps_the_existing_file(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("first")
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_path(target, replace=False) as temporary:
            Path(temporary).write_text("second")
    assert target.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]
    with atomic_path(tmp_path / "y.txt", replace=False) as temporary:
        Path(temporary).write_text("new")
    assert (tmp_path / "y.txt").read_text() == "new" and len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("existing", [[], ["--skip-existing"]])
def test_an_output_another_run_wrote_meanwhile_is_kept_and_reported(model, small, tmp_path, capsys, monkeypatch,
                                                                     existing):
    """The race of two runs into one -o: the other run publishes x.png after this one checked that it was free."""
    out = tmp_path / "out"
    read = cli.read_image

    def read_while_another_run_writes(path, *args, **kwargs):
        (out / "small.png").write_bytes(b"the other run's output")
        return read(path, *args, **kwargs)

    monkeypatch.setattr(cli, "read_image", read_while_another_run_writes)
    code = main(["upscale", str(small), "--model", str(model), "-o", str(out), *existing])
    errors, summary = _errors(capsys)
    assert (out / "small.png").read_bytes() == b"the other run's output"
    assert [p.name for p in out.iterdir()] == ["small.png"]  # no temporary file left
    if existing:
        assert code == 0 and not errors and "Upscaled 0 of 1 input(s)" in summary and "1 skipped" in summary
    else:
        assert code == 1 and len(errors) == 1 and "exists (written meanwhile by another run)" in errors[0]


def test_overwrite_still_replaces(model, small, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "small.png").write_bytes(b"old")
    assert main(["upscale", str(small), "--model", str(model), "-o", str(out), "--overwrite"]) == 0
    with PIL.Image.open(out / "small.png") as image:
        assert image.size == (128, 96)


# ------------------------------------------------------------------------------------------- output size (item 5)
def test_a_huge_outscale_is_refused_with_the_size_it_would_have_been(model, small, tmp_path, capsys):
    code = main(["upscale", str(small), "--model", str(model), "-o", str(tmp_path / "out"), "--outscale", "1e6"])
    errors, summary = _errors(capsys)
    assert code == 1 and len(errors) == 1
    assert "the output would be 32000000x24000000" in errors[0] and "--max-output-pixels" in errors[0]
    assert not list((tmp_path / "out").iterdir())


def test_the_output_limit_can_be_raised_or_lowered(model, small, tmp_path, capsys):
    argv = ["upscale", str(small), "--model", str(model), "-o", str(tmp_path / "out")]
    assert main([*argv, "--max-output-pixels", str(128 * 96 - 1)]) == 1
    assert "the output would be 128x96" in _errors(capsys)[0][0]
    assert main([*argv, "--max-output-pixels", str(128 * 96)]) == 0
    with pytest.raises(SystemExit):
        main([*argv, "--max-output-pixels", "0"])


# ----------------------------------------------------------------------------------- -o is the input folder (item 8)
def test_the_input_folder_as_output_folder_is_refused_the_first_time(model, tmp_path, capsys):
    folder = tmp_path / "sd"
    folder.mkdir()
    photo("astronaut", (32, 24)).save(folder / "x.png")
    code = main(["upscale", str(folder), "--model", str(model), "-o", str(folder), "--format", "tiff"])
    errors, _ = _errors(capsys)
    assert code == 2 and len(errors) == 1 and "is the input folder" in errors[0]
    assert [p.name for p in folder.iterdir()] == ["x.png"]


# ------------------------------------------------------------------------------------------------ Ctrl-C (item 10)
def test_ctrl_c_prints_what_was_written_and_exits_130(model, tmp_path, capsys, monkeypatch):
    from tinysr_diffusers.pipelines import OneStepSRPipeline

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "b", "c"):
        photo("astronaut", (32, 24)).save(inputs / f"{name}.png")
    call = OneStepSRPipeline.__call__
    calls = []

    def interrupted_on_the_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return call(self, *args, **kwargs)

    monkeypatch.setattr(OneStepSRPipeline, "__call__", interrupted_on_the_second)
    code = main(["upscale", str(inputs), "--model", str(model), "-o", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 130
    assert "Traceback" not in captured.err and "Interrupted: 2 input(s) not processed." in captured.err
    assert "Upscaled 1 of 3 input(s)" in captured.out
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.png"]


# ------------------------------------------------------------------------------------- alpha into JPEG (item 10)
def test_jpeg_output_warns_that_transparency_is_dropped(model, tmp_path, capsys):
    rgba = photo("astronaut", (32, 24)).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(tmp_path / "alpha.png")
    photo("astronaut", (32, 24)).save(tmp_path / "opaque.png")
    argv = ["upscale", str(tmp_path / "alpha.png"), str(tmp_path / "opaque.png"), "--model", str(model)]
    assert main([*argv, "-o", str(tmp_path / "jpg"), "--format", "jpg"]) == 0
    warnings, _ = _errors(capsys)
    assert len(warnings) == 1 and "alpha.png" in warnings[0] and "alpha channel is dropped" in warnings[0]
    assert main([*argv, "-o", str(tmp_path / "png")]) == 0
    assert not _errors(capsys)[0]


# ------------------------------------------------------------------------------------ a file named twice (item 10)
def test_a_file_given_twice_is_one_input(model, small, tmp_path, capsys):
    code = main(["upscale", str(small), str(small), str(small.parent / "." / small.name), "--model", str(model),
                 "-o", str(tmp_path / "out")])
    errors, summary = _errors(capsys)
    assert code == 0 and not errors and "Upscaled 1 of 1 input(s)" in summary


# ------------------------------------------------------------------------------------------------- demo (7, 10)
def test_the_demo_bounds_the_padded_work_of_thin_images():
    from tinysr_diffusers.demo import DEFAULT_MAX_PIXELS, DemoInputError, check_size, padded_work

    check_size((512, 512), DEFAULT_MAX_PIXELS)
    assert padded_work((100000, 1)) == 800000 and padded_work((60, 51)) == 3060
    with pytest.raises(DemoInputError, match=r"100000x1 \(0.10 MP; padded for the model it costs as much as "
                                             r"0.80 MP\), above this demo's limit"):
        check_size((100000, 1), DEFAULT_MAX_PIXELS)


@pytest.mark.slow
def test_the_demo_loads_an_onnx_export_like_upscale(model, tmp_path):
    pytest.importorskip("onnxruntime")
    import argparse

    from tinysr_diffusers.demo import configure_parser
    from tinysr_diffusers.loading import check_model_arguments, load_pipeline_from_args
    from tinysr_diffusers.onnx_export import export_onnx
    from tinysr_diffusers.pipelines import OnnxTinySRPipeline, TinySRPipeline

    export_onnx(TinySRPipeline.from_pretrained(model), str(tmp_path / "onnx"))
    parser = configure_parser(argparse.ArgumentParser())
    args = parser.parse_args(["--model", str(tmp_path / "onnx"), "--runtime", "onnxruntime"])
    check_model_arguments(parser, args)
    pipe = load_pipeline_from_args(args)
    assert isinstance(pipe, OnnxTinySRPipeline)
    pipe.set_progress_bar_config(disable=True)
    output = np.asarray(pipe(photo("astronaut", (32, 24))).images[0])
    assert output.shape == (96, 128, 3)
    with pytest.raises(SystemExit):
        check_model_arguments(parser, parser.parse_args(["--model", str(tmp_path / "onnx"), "--dtype", "float16"]))


# ------------------------------------------------------------------------------------- greyscale + alpha (item 10)
def test_greyscale_with_alpha_stays_greyscale_with_alpha(model, tmp_path, capsys):
    """An LA input came back as RGBA with up to 3 levels of colour tint; now LA, its grey the L output's."""
    grey = photo("astronaut", (32, 24)).convert("L")
    la = grey.convert("LA")
    la.putalpha(PIL.Image.linear_gradient("L").resize((32, 24)))
    la.save(tmp_path / "la.png")
    grey.save(tmp_path / "l.png")
    assert main(["upscale", str(tmp_path / "la.png"), str(tmp_path / "l.png"), "--model", str(model),
                 "-o", str(tmp_path / "out")]) == 0
    with PIL.Image.open(tmp_path / "out" / "la.png") as out, PIL.Image.open(tmp_path / "out" / "l.png") as ref:
        assert out.mode == "LA" and out.size == (128, 96)
        np.testing.assert_array_equal(np.asarray(out)[..., 0], np.asarray(ref))
        alpha = np.asarray(out)[..., 1].astype(int)
    assert alpha.min() < 40 and alpha.max() > 215  # the gradient, upscaled
