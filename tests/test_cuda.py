"""The CUDA-only paths, skipped without a GPU (`pytest -m cuda`; benchmarks/device_check.py runs them on one): the
dtype `auto` picks there, the default model's outputs against the CPU's float32, `tile_size="auto"`, the
out-of-memory fallback under a real allocation limit, and training steps in bf16.

The heavy imports are inside the tests, so that collecting this file where there is no GPU costs nothing.
"""

import math
import warnings

import numpy as np
import pytest
import torch


pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _photo(size=(96, 64)):
    from tests.tiny_pipelines import photo

    return photo("chelsea", size)


def _default_model(device: str, dtype: torch.dtype = torch.float32):
    from tinysr_diffusers import TinySRPipeline

    pipe = TinySRPipeline.from_pretrained(dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _expected_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def test_dtype_auto_on_cuda_is_bf16_for_the_commands():
    from tinysr_diffusers.devices import auto_dtype
    from tinysr_diffusers.loading import load_pipeline

    assert auto_dtype("cuda") == auto_dtype(torch.device("cuda", 0)) == _expected_dtype()
    pipe = load_pipeline(device="cuda")  # what `tinysr upscale` and `tinysr demo` load without --dtype
    assert pipe._execution_device.type == "cuda"
    assert pipe.transformer.dtype == pipe.vae.dtype == _expected_dtype()


def test_tinysr_upscale_on_cuda_writes_every_photo_at_4x(tmp_path):
    import PIL.Image

    from tinysr_diffusers.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    sizes = {"chelsea": (96, 64), "coffee": (40, 72)}
    for name, size in sizes.items():
        _photo(size).save(folder / f"{name}.png")
    assert main(["upscale", str(folder), "-o", str(tmp_path / "out"), "--device", "cuda", "--tile-size", "auto"]) == 0
    for name, (width, height) in sizes.items():
        with PIL.Image.open(tmp_path / "out" / f"{name}.png") as output:
            assert output.size == (4 * width, 4 * height)


@pytest.mark.parametrize("tile_size", [None, 16])
def test_default_model_on_cuda_equals_the_cpus_float32(tile_size):
    from benchmarks.device_check import psnr, strict_float32

    image, call = _photo(), {"output_type": "np", "tile_size": tile_size, "tile_overlap": 4}
    expected = _default_model("cpu")(image, **call).images[0]
    with strict_float32():  # no TF32 (CUDA's convolutions use it by default)
        float32 = _default_model("cuda")(image, **call).images[0]
    np.testing.assert_allclose(float32, expected, atol=1e-3, rtol=0)
    half = _default_model("cuda", _expected_dtype())(image, **call).images[0]
    assert psnr(half, expected) >= 40, psnr(half, expected)  # the CPU's own bf16 gives 55 dB
    assert np.abs(half - expected).max() <= 0.05


def test_auto_tile_size_on_cuda_runs_the_whole_image_as_one_tile():
    pipe, image = _default_model("cuda"), _photo()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Out of memory", category=RuntimeWarning)  # no fallback needed
        auto = pipe(image, output_type="np", tile_size="auto").images[0]
    untiled = pipe(image, output_type="np", tile_size=None).images[0]
    np.testing.assert_allclose(auto, untiled, atol=1e-5, rtol=0)  # equal on the CPU


def test_auto_tile_size_on_cuda_stays_within_the_transformers_position_grid():
    pipe = _default_model("cuda", _expected_dtype())
    image = torch.rand(1, 3, 320, 320)  # 1280 px out: a latent of 160
    assert pipe(image, output_type="pt", tile_size="auto").images.shape[-2:] == (1280, 1280)


def test_out_of_memory_fallback_under_a_real_allocation_limit():
    from benchmarks.device_check import oom_fallback

    result = oom_fallback(_default_model("cuda", _expected_dtype()), _photo((256, 256)))  # 1024 px out
    assert result["warnings"] and all(m.startswith("Out of memory with tile_size=") for m in result["warnings"])
    assert result["settled_on"]["tile_size"] < result["latent_side"] == 128
    assert result["max_abs_diff"] <= 1e-2, result  # what those tiles give unconstrained
    # the limit is lifted afterwards: twice as much fits at once
    torch.empty(int(2 * result["limit_mib"] * 2**20), dtype=torch.uint8, device="cuda")


@pytest.mark.parametrize("stage", ["latent", "pixel"])
def test_training_steps_in_bf16_on_cuda(tmp_path, monkeypatch, stage):
    from accelerate.state import AcceleratorState

    from tests.test_training import config_for, make_assets
    from tinysr_diffusers import TinySRPipeline
    from training import distill
    from training.models import load_teacher

    loaded = []
    monkeypatch.setattr(distill, "load_teacher", lambda config: loaded.append(load_teacher(config)) or loaded[-1])
    gan = ["lpips_weight=1", "gan_weight=0.1"] if stage == "pixel" else []
    config = config_for(make_assets(tmp_path / "assets"), stage, tmp_path / "out", *gan, "hr_size=64", "max_steps=3",
                        "checkpointing_steps=3", "mixed_precision=bf16")
    result = distill.train(config)
    state = AcceleratorState()
    assert (state.device.type, state.mixed_precision) == ("cuda", "bf16")
    assert result["step"] == 3 and all(map(math.isfinite, result["losses"])), result["losses"]
    teacher = loaded[0].transformer  # frozen, kept in the autocast dtype on the GPU
    assert (teacher.device.type, teacher.dtype) == ("cuda", torch.bfloat16)
    assert TinySRPipeline.from_pretrained(result["export"]).transformer.dtype == torch.float32
