"""NaN and infinities (issue 27, item 4): a non-finite number in a model's config is refused when the pipeline is
made or loaded, and a model whose output holds NaN or an infinity is an error naming that model's folder, never an
image (NaN pixels become black). Tiny random models saved as pipeline folders, real photos, CPU."""

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from tests.tiny_pipelines import photo, tiny_student, tiny_teacher
from tinysr_diffusers import OneStepSRPipeline, TinySRPipeline
from tinysr_diffusers.cli import main


TILES = {"one tile": {}, "streamed": {"tile_size": 16, "tile_overlap": 4}, "untiled": {"tile_size": None}}


@pytest.mark.parametrize(
    "make, key, value",
    [
        (tiny_student, "scaling_factor", math.nan),
        (tiny_student, "shift_factor", math.inf),
        (tiny_teacher, "scaling_factor", -math.inf),  # diffusers' AutoencoderKL: its config is checked too
    ],
    ids=["nan-scaling", "inf-shift", "teacher-kl"],
)
def test_a_non_finite_number_in_a_component_config_is_refused_at_load(tmp_path, make, key, value):
    make().save_pretrained(tmp_path)
    config_path = tmp_path / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config[key] = value
    config_path.write_text(json.dumps(config))  # NaN / Infinity, which json (and diffusers) read back
    message = f"{config_path}: `{key}` is {value}"
    with pytest.raises(ValueError, match=message):
        OneStepSRPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)


def test_a_non_finite_config_of_a_model_built_in_memory_is_refused():
    pipe = tiny_student()
    pipe.vae.register_to_config(scaling_factor=math.nan)
    with pytest.raises(ValueError, match="The vae's config: `scaling_factor` is nan"):
        TinySRPipeline(transformer=pipe.transformer, vae=pipe.vae)


def _poison(module: torch.nn.Module) -> None:
    """One infinity in the first weight, as a damaged checkpoint has."""
    with torch.no_grad():
        next(module.parameters()).view(-1)[0] = math.inf


PARTS = {
    "encoder": (lambda pipe: pipe.vae.encoder, "vae"),
    "transformer": (lambda pipe: pipe.transformer, "transformer"),
    "decoder": (lambda pipe: pipe.vae.decoder, "vae"),
}


@pytest.fixture(scope="module", params=sorted(PARTS))
def poisoned(request, tmp_path_factory) -> tuple[Path, str]:
    """A saved pipeline folder with an infinity in one model's weights, and the folder that must be named."""
    part, folder_name = PARTS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    pipe = tiny_student()
    _poison(part(pipe))
    pipe.save_pretrained(folder)
    return folder, str(folder / folder_name)


@pytest.mark.parametrize("tiles", sorted(TILES))
def test_a_model_giving_non_finite_values_is_an_error_naming_its_folder(poisoned, tiles):
    folder, named = poisoned
    pipe = TinySRPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(FloatingPointError, match=f"^{named} gave NaN or infinite values"):
        pipe(photo("astronaut", (60, 44)), **TILES[tiles])


def test_tinysr_upscale_writes_no_black_image_for_a_non_finite_model(poisoned, tmp_path, capsys):
    folder, named = poisoned
    source = tmp_path / "small.png"
    photo("astronaut", (32, 24)).save(source)
    out = tmp_path / "out"
    assert main(["upscale", str(source), "--model", str(folder), "-o", str(out), "--dtype", "float32"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{source}: FloatingPointError: {named} gave NaN or infinite values" in errors[0]
    assert not (out / "small.png").exists()


def test_auto_tiles_on_cuda_stay_within_the_transformers_position_grid(monkeypatch):
    """`tile_size="auto"` on CUDA starts from the whole latent image, but never beyond what the transformer takes in one
    piece (found by the GPU check's preparation: a 1280-px output of the default model failed). The device is faked:
    only the choice of the first tile is checked here; tests/test_cuda.py runs it on a GPU."""
    from tests.tiny_pipelines import tiny_student
    from tinysr_diffusers.pipelines import OneStepSRPipeline

    pipe = tiny_student()
    limit = pipe.transformer.config.pos_embed_max_size * pipe.transformer.config.patch_size
    assert pipe.max_latent_size == limit
    assert pipe._auto_tile_size((32, 32)) == 64  # on the CPU: the releases' tiles
    monkeypatch.setattr(OneStepSRPipeline, "_execution_device", property(lambda self: torch.device("cuda")))
    assert pipe._auto_tile_size((8, 8)) == pipe._latent_side((8, 8)) < limit
    assert pipe._auto_tile_size((4 * limit, 4 * limit)) == limit


def test_a_weights_file_missing_a_tensor_is_named(tmp_path, capsys):
    """Issue 27 (item 10): a safetensors file without one of its tensors failed with "Cannot copy out of meta
    tensor"; now the load names the component and the tensor, and `tinysr upscale` says so in one line."""
    from safetensors.torch import load_file, save_file

    from tests.tiny_pipelines import photo, tiny_student
    from tinysr_diffusers import TinySRPipeline
    from tinysr_diffusers.cli import main

    folder = tmp_path / "model"
    tiny_student().save_pretrained(folder)
    (weights,) = (folder / "vae").glob("*.safetensors")
    state = load_file(weights)
    key = sorted(state)[3]
    del state[key]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"vae: the weights file lacks {key}"):
        TinySRPipeline.from_pretrained(folder)
    photo("astronaut", (32, 24)).save(tmp_path / "small.png")
    assert main(["upscale", str(tmp_path / "small.png"), "--model", str(folder), "-o", str(tmp_path / "out")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"the weights file lacks {key}" in errors[0] and "meta tensor" not in errors[0]
