"""ONNX export (`tinysr export onnx`) and `OnnxTinySRPipeline`: same recipe, same tiling, same outputs within 1e-3
(streamed AdaIN: one 16-bit level times its gain)."""

import argparse
import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch


onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from tests.tiny_pipelines import photo, tiny_autoencoder_tiny, tiny_student, tiny_teacher
from tinysr_diffusers.cli import add_export_parser
from tinysr_diffusers.onnx_export import export_onnx
from tinysr_diffusers.pipelines import OnnxTinySRPipeline
from tinysr_diffusers.pipelines.onnx_folder import COMPONENTS, CONFIG_NAME, MODEL_FILE, SETTINGS


def _export_cli(*argv: str) -> int:
    """`tinysr export ...` through the parser `add_export_parser` registers, as `cli.main` does."""
    parser = argparse.ArgumentParser(prog="tinysr")
    add_export_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny student saved as a pipeline folder and exported by the command line; the torch pipeline to compare."""
    root = tmp_path_factory.mktemp("onnx")
    tiny_student().save_pretrained(root / "pipeline")
    assert _export_cli("onnx", str(root / "pipeline"), "-o", str(root / "onnx")) == 0
    pipe = OnnxTinySRPipeline.from_pretrained(root / "onnx")
    pipe.set_progress_bar_config(disable=True)
    return tiny_student(), pipe, root


@pytest.fixture(scope="module")
def exported_int8(exported):
    torch_pipe, _, root = exported
    export_onnx(torch_pipe, str(root / "int8"), int8=True)
    pipe = OnnxTinySRPipeline.from_pretrained(root / "int8")
    pipe.set_progress_bar_config(disable=True)
    return pipe, root / "int8"


def _outputs(pipe, images, **kwargs) -> torch.Tensor:
    result = pipe(images, output_type="pt", **kwargs).images
    return torch.stack(result) if isinstance(result, list) else result


def _tolerance(kwargs: dict) -> float:
    """Float rounding (1e-3), or for AdaIN over several bands one level of the 16-bit copy that its second pass reads
    (the statistics come first): a value at a rounding edge in one runtime and not the other moves by 1/65535 times
    AdaIN's gain, which is up to 80 for the tiny random model's low-contrast output (measured 1.2e-3)."""
    streamed_adain = kwargs.get("tile_size") is not None and kwargs.get("color_fix", "adain") == "adain"
    return 1.5e-3 if streamed_adain else 1e-3


def test_the_folder_holds_three_graphs_with_dynamic_batch_height_and_width(exported):
    _, pipe, root = exported
    config = json.loads((root / "onnx" / CONFIG_NAME).read_text())
    assert config["_class_name"] == "OnnxTinySRPipeline" and config["source_class_name"] == "TinySRPipeline"
    assert config["int8"] is False and config["max_latent_size"] == 96
    for name in COMPONENTS:
        onnx.checker.check_model(str(root / "onnx" / name / MODEL_FILE))
    for model in (pipe.vae.encoder, pipe.vae.decoder, pipe.transformer):
        batch, channels, height, width = model.session.get_inputs()[0].shape
        assert isinstance(channels, int)
        assert all(isinstance(dim, str) for dim in (batch, height, width))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tile_size": None},
        {"tile_size": 4, "tile_overlap": 2},
        {"tile_size": 6, "tile_overlap": 2, "tile_batch_size": 3},
        {"tile_size": 4, "tile_overlap": 0, "color_fix": "wavelet"},
    ],
    ids=["untiled", "tiled", "tiled-batched", "tiled-wavelet"],
)
@pytest.mark.parametrize("size", [(40, 24), (18, 30)], ids=["40x24", "18x30"])  # latents 20x12 and 9x15 (padded)
def test_outputs_match_the_torch_pipeline(exported, kwargs, size):
    torch_pipe, pipe, _ = exported
    images = [photo(size=size), photo("coffee", size=size)]
    expected = _outputs(torch_pipe, images, **kwargs)
    got = _outputs(pipe, images, **kwargs)
    assert got.shape == expected.shape == (2, 3, 4 * size[1], 4 * size[0])
    torch.testing.assert_close(got, expected, atol=_tolerance(kwargs), rtol=0)
    latents = pipe(images, output_type="latent", **kwargs).images
    torch.testing.assert_close(latents, torch_pipe(images, output_type="latent", **kwargs).images, atol=1e-3, rtol=0)


def test_pil_outputs_and_greyscale_go_through_the_same_call(exported):
    torch_pipe, pipe, _ = exported
    grey = photo(size=(16, 16)).convert("L")
    expected, got = torch_pipe(grey).images[0], pipe(grey).images[0]
    assert got.mode == "L" and got.size == expected.size == (64, 64)
    difference = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert difference.max() <= 1


def test_uint16_outputs_are_the_float_outputs_at_16_bits(exported):
    """The base class's `__call__`, so every output type, streamed as the torch pipeline's."""
    _, pipe, _ = exported
    rgba = np.dstack([np.asarray(photo(size=(40, 24))), np.full((24, 40), 200, dtype=np.uint8)])
    kwargs = {"tile_size": 4, "tile_overlap": 2}
    deep = pipe(rgba, output_type="uint16", **kwargs).images
    floats = pipe(rgba, output_type="np", **kwargs).images
    assert deep.dtype == np.uint16 and deep.shape == (1, 96, 160, 4)
    np.testing.assert_array_equal(deep, (floats * 65535).round().astype(np.uint16))


def test_autoencoder_tiny_pipelines_export_too(tmp_path):
    torch_pipe = tiny_student(vae=tiny_autoencoder_tiny())
    pipe = OnnxTinySRPipeline.from_pretrained(export_onnx(torch_pipe, str(tmp_path)))
    pipe.set_progress_bar_config(disable=True)
    image = photo(size=(24, 16))
    for kwargs in ({"tile_size": None}, {"tile_size": 4, "tile_overlap": 2}):
        expected = _outputs(torch_pipe, image, **kwargs)
        torch.testing.assert_close(_outputs(pipe, image, **kwargs), expected, atol=_tolerance(kwargs), rtol=0)


def test_int8_transformer_is_close_but_not_identical(exported, exported_int8):
    """The quantisation's cost as a property: the output moves, but stays near the float32 one."""
    _, pipe, root = exported
    pipe_int8, folder = exported_int8
    ops = {node.op_type for node in onnx.load(str(folder / "transformer" / MODEL_FILE)).graph.node}
    float_ops = {node.op_type for node in onnx.load(str(root / "onnx" / "transformer" / MODEL_FILE)).graph.node}
    assert "MatMulInteger" in ops and "MatMulInteger" not in float_ops
    assert json.loads((folder / CONFIG_NAME).read_text())["int8"] is True
    image = photo(size=(40, 24))
    for kwargs in ({"tile_size": None}, {"tile_size": 4, "tile_overlap": 2}):
        reference, quantised = _outputs(pipe, image, **kwargs), _outputs(pipe_int8, image, **kwargs)
        difference = (quantised - reference).abs()
        assert difference.max() > 1e-5  # quantised, so not the float32 graph
        assert difference.mean() < 0.02 and difference.max() < 0.2


def test_the_export_keeps_the_pipelines_own_colour_fix(tmp_path):
    """A call's "default" colour fix is the source pipeline's (the default model's is wavelet), not the class's."""
    torch_pipe = tiny_student(color_fix="wavelet")
    pipe = OnnxTinySRPipeline.from_pretrained(export_onnx(torch_pipe, str(tmp_path)))
    pipe.set_progress_bar_config(disable=True)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["color_fix"] == pipe.config.color_fix == "wavelet"
    image = photo(size=(40, 24))
    expected = _outputs(torch_pipe, image)
    torch.testing.assert_close(_outputs(pipe, image), expected, atol=1e-3, rtol=0)
    assert (_outputs(pipe, image, color_fix="adain") - expected).abs().max() > 1e-2  # so the fix is what matched
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["color_fix"]  # an export from before the colour fix was kept: AdaIN, and a warning says so
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="export it again"):
        assert OnnxTinySRPipeline.from_pretrained(tmp_path).config.color_fix == "adain"


@pytest.mark.parametrize("kwargs", [{"tile_size": None}, {"tile_size": 4, "tile_overlap": 2}], ids=["untiled", "tiled"])
def test_openvino_runs_the_same_graphs(exported, kwargs):
    pytest.importorskip("openvino")
    torch_pipe, _, root = exported
    pipe = OnnxTinySRPipeline.from_pretrained(root / "onnx", runtime="openvino", num_threads=1)
    pipe.set_progress_bar_config(disable=True)
    assert "OpenVinoModel" in repr(pipe.vae)
    assert pipe.transformer.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    images = [photo(size=(40, 24)), photo("coffee", size=(40, 24))]
    expected = _outputs(torch_pipe, images, **kwargs)
    torch.testing.assert_close(_outputs(pipe, images, **kwargs), expected, atol=_tolerance(kwargs), rtol=0)


def test_runtime_arguments_are_checked(exported):
    root = exported[2] / "onnx"
    with pytest.raises(ValueError, match="Unknown runtime 'tensorrt'"):
        OnnxTinySRPipeline.from_pretrained(root, runtime="tensorrt")
    with pytest.raises(ValueError, match="onnxruntime's"):
        OnnxTinySRPipeline.from_pretrained(root, runtime="openvino", providers=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="not both"):
        OnnxTinySRPipeline.from_pretrained(root, num_threads=1, session_options=object())
    with pytest.raises(ValueError, match="num_threads must be at least 1, got 0"):
        OnnxTinySRPipeline.from_pretrained(root, num_threads=0)
    pipe = OnnxTinySRPipeline.from_pretrained(root, num_threads=1)
    assert pipe.transformer.session.get_session_options().intra_op_num_threads == 1


@pytest.mark.parametrize("runtime", [None, "openvino"])
def test_tinysr_upscale_runs_an_export_folder(exported, runtime, tmp_path, monkeypatch):
    from tinysr_diffusers.cli import main

    if runtime == "openvino":
        pytest.importorskip("openvino")
    _, pipe, root = exported
    loaded = []
    load = OnnxTinySRPipeline.from_pretrained.__func__
    monkeypatch.setattr(OnnxTinySRPipeline, "from_pretrained", classmethod(
        lambda cls, *args, **kwargs: loaded.append(load(cls, *args, **kwargs)) or loaded[-1]
    ))  # fmt: skip
    photo(size=(40, 24)).save(tmp_path / "in.png")
    runtime_args = ["--runtime", runtime] if runtime else []
    assert main(["upscale", str(tmp_path / "in.png"), "--model", str(root / "onnx"), "-o", str(tmp_path / "out"),
                 "--tile-size", "4", "--tile-overlap", "2", *runtime_args]) == 0  # fmt: skip
    model_class = "OpenVinoModel" if runtime == "openvino" else "OnnxModel"
    assert len(loaded) == 1 and type(loaded[0].transformer).__name__ == model_class
    written = np.asarray(PIL.Image.open(tmp_path / "out" / "in.png"), dtype=np.int16)
    expected = np.asarray(pipe(photo(size=(40, 24)), tile_size=4, tile_overlap=2).images[0], dtype=np.int16)
    assert written.shape == (96, 160, 3) and np.abs(written - expected).max() <= 1


@pytest.mark.parametrize(
    "options, message",
    [
        (["--dtype", "bfloat16"], "an ONNX export runs in float32 on the CPU"),
        (["--compile"], "an ONNX export runs in float32 on the CPU"),
        (["--device", "cuda"], "an ONNX export runs in float32 on the CPU"),
        (["--model", "{pipeline}", "--runtime", "openvino"], "--runtime openvino runs an ONNX export"),
        (["--runtime", "onnxruntime"], "--runtime onnxruntime runs an ONNX export"),  # the default model is torch
    ],
    ids=["dtype", "compile", "device", "runtime-torch-folder", "runtime-default-model"],
)
def test_tinysr_upscale_refuses_options_that_do_not_apply(exported, options, message, tmp_path, capsys):
    """Usage errors before anything is loaded or created: exit code 2, one line, no output folder."""
    from tinysr_diffusers.cli import main

    root = exported[2]
    photo(size=(16, 16)).save(tmp_path / "in.png")
    model = [] if "--model" in options else ["--model", str(root / "onnx")] * ("--runtime" not in options)
    options = [str(root / "pipeline") if option == "{pipeline}" else option for option in options]
    with pytest.raises(SystemExit) as exit_info:
        main(["upscale", str(tmp_path / "in.png"), *model, "-o", str(tmp_path / "out"), *options])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_latents_beyond_the_position_embedding_need_tiles(exported):
    _, pipe, _ = exported
    image = photo(size=(200, 8))  # latent width 100 > 96
    with pytest.raises(ValueError, match="exceeds the transformer's 96"):
        pipe(image, tile_size=None)
    assert pipe(image, tile_size=16, tile_overlap=4).images[0].size == (800, 32)


def test_export_refuses_what_it_cannot_export(tmp_path):
    with pytest.raises(TypeError, match="TinySRPipeline with a tiny VAE"):
        export_onnx(tiny_teacher(), str(tmp_path))
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        OnnxTinySRPipeline.from_pretrained(tmp_path)


def test_cli_keeps_an_existing_folder_unless_overwrite(exported, capsys):
    _, _, root = exported
    assert _export_cli("onnx", str(root / "pipeline"), "-o", str(root / "onnx")) == 1
    assert "already exists" in capsys.readouterr().err
    assert (root / "onnx" / CONFIG_NAME).is_file()


def test_importing_the_export_module_and_the_pipelines_loads_no_onnxruntime():
    code = (
        "import json, sys; import tinysr_diffusers.onnx_export; torch_on_import = 'torch' in sys.modules; "
        "from tinysr_diffusers.pipelines import OnnxTinySRPipeline; "
        "print(json.dumps([torch_on_import, 'onnxruntime' in sys.modules, 'onnx' in sys.modules]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [False, False, False]


# ----------------------------------------------------------------- settings and non-finite outputs (issue 27, 3 and 4)
@pytest.fixture
def export_copy(exported, tmp_path):
    """A copy of the export whose settings a test may change."""
    folder = tmp_path / "export"
    shutil.copytree(exported[2] / "onnx", folder)
    return folder


def _edit_settings(folder, **changes) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps({k: v for k, v in config.items() if v is not _DELETE}))


_DELETE = object()
REQUIRED = sorted(set(SETTINGS) - {"color_fix"})  # an export older than the colour fix lacks it: AdaIN, warned


@pytest.mark.parametrize(
    "changes, message",
    [
        *[({name: _DELETE}, f"lacks `{name}`") for name in REQUIRED],
        ({"patch_size": "2"}, "`patch_size` must be a positive integer, got '2'"),
        ({"patch_size": 0}, "`patch_size` must be a positive integer, got 0"),
        ({"patch_size": 2.0}, "`patch_size` must be a positive integer, got 2.0"),
        ({"vae_scale_factor": 0}, "`vae_scale_factor` must be a positive integer, got 0"),
        ({"max_latent_size": True}, "`max_latent_size` must be a positive integer, got True"),
        ({"scaling_factor": 0}, "`scaling_factor` must be a finite number other than 0, got 0"),
        ({"scaling_factor": math.nan}, "`scaling_factor` must be a finite number other than 0, got nan"),
        ({"latent_shift": math.inf}, "`latent_shift` must be a finite number, got inf"),
        ({"latent_shift": None}, "`latent_shift` must be a finite number, got None"),
        ({"color_fix": "histogram"}, "`color_fix` must be a colour fix"),
    ],
    ids=lambda value: "-".join(f"{k}={'missing' if v is _DELETE else v!r}" for k, v in value.items())
    if isinstance(value, dict) else None,
)
def test_a_missing_or_wrong_setting_is_refused_at_load(export_copy, changes, message):
    _edit_settings(export_copy, **changes)
    with pytest.raises(ValueError, match=f"^{re.escape(str(export_copy / CONFIG_NAME))}.* {re.escape(message)}"):
        OnnxTinySRPipeline.from_pretrained(export_copy)


@pytest.mark.parametrize("content, message", [("{}", "lacks `scaling_factor`"), ("[]", "holds a JSON list")])
def test_settings_that_are_no_settings_are_refused_by_the_command_line(export_copy, content, message, tmp_path, capsys):
    """The reproduction: `echo '{}' > export/onnx_pipeline.json` ran with the defaults and exit 0."""
    from tinysr_diffusers.cli import main

    (export_copy / CONFIG_NAME).write_text(content)
    photo(size=(16, 12)).save(tmp_path / "small.png")
    assert main(["upscale", str(tmp_path / "small.png"), "--model", str(export_copy), "-o", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert message in error and str(export_copy / CONFIG_NAME) in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "small.png").exists()


class _Poisoned:
    """An exported model whose output holds an infinity, as a graph with an infinite weight gives."""

    dtype = torch.float32

    def __init__(self, model):
        self.model, self.path = model, model.path

    def __call__(self, sample: torch.Tensor) -> torch.Tensor:
        output = self.model(sample)
        output[..., 0, 0] = math.inf
        return output


@pytest.mark.parametrize("graph", COMPONENTS)
@pytest.mark.parametrize("tiles", [{"tile_size": None}, {"tile_size": 4, "tile_overlap": 2}], ids=["untiled", "tiled"])
def test_a_graph_giving_non_finite_values_is_an_error_naming_its_file(exported, graph, tiles, monkeypatch):
    _, pipe, root = exported
    owner, name = (pipe, "transformer") if graph == "transformer" else (pipe.vae, graph.removeprefix("vae_"))
    monkeypatch.setattr(owner, name, _Poisoned(getattr(owner, name)))
    path = str(root / "onnx" / graph / MODEL_FILE)
    with pytest.raises(FloatingPointError, match=f"^{path} gave NaN or infinite values"):
        pipe(photo(size=(40, 24)), **tiles)
