"""`compile_pipeline`: torch.compile of the transformer and the VAE's encoder and decoder, opt-in (CPU, inductor)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_pipelines import photo, tiny_student
from tinysr_diffusers.devices import compile_pipeline, optimize_for_cpu


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def saved_weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {path.parent.name: load_file(path) for path in sorted(folder.glob("*/*.safetensors"))}


@pytest.mark.slow
def test_compiled_pipeline_keeps_the_tiled_output_and_the_saved_files(tmp_path):
    image = photo(size=(24, 16))  # 12x8 latents: 6 tiles of 4 with an overlap of 2
    # No colour fix: the random tiny VAE's output has a tiny spread, so AdaIN would magnify a one-step change of
    # the streamed path's uint16 buffer (1.5e-5, from compiled kernels' float rounding) to ~1e-3.
    tiles = {"output_type": "pt", "tile_size": 4, "tile_overlap": 2, "color_fix": None}
    pipe = optimize_for_cpu(tiny_student())
    expected = pipe(image, **tiles).images
    expected_latents = pipe(image, **{**tiles, "output_type": "latent"}).images
    pipe.save_pretrained(tmp_path / "plain")

    modules = (pipe.transformer, pipe.vae.encoder, pipe.vae.decoder)
    assert compile_pipeline(pipe) is pipe
    assert all(module._compiled_call_impl is not None for module in modules)  # nn.Module.compile, in place
    assert (pipe.transformer, pipe.vae.encoder, pipe.vae.decoder) == modules
    first = pipe(image, **tiles).images
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it really ran compiled graphs
    torch.testing.assert_close(first, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(pipe(image, **tiles).images, expected, atol=1e-4, rtol=0)  # cached graphs
    latents = pipe(image, **{**tiles, "output_type": "latent"}).images
    torch.testing.assert_close(latents, expected_latents, atol=1e-4, rtol=0)

    pipe.save_pretrained(tmp_path / "compiled")
    plain, compiled = saved_weights(tmp_path / "plain"), saved_weights(tmp_path / "compiled")
    assert set(plain) == set(compiled) == {"transformer", "vae"}
    for name in plain:
        assert list(compiled[name]) == list(plain[name])  # same keys, no `_orig_mod.` prefixes
        assert not any("_orig_mod" in key for key in compiled[name])
        for key, tensor in plain[name].items():
            torch.testing.assert_close(compiled[name][key], tensor, atol=0, rtol=0)
    for config in ("model_index.json", "transformer/config.json", "vae/config.json"):
        assert json.loads((tmp_path / "compiled" / config).read_text()) == json.loads(
            (tmp_path / "plain" / config).read_text()
        )


def test_compile_passes_mode_and_dynamic_to_every_heavy_module(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append((self, kwargs)))
    pipe = tiny_student()
    compile_pipeline(pipe, mode="max-autotune-no-cudagraphs", dynamic=False)
    assert [module for module, _ in calls] == [pipe.transformer, pipe.vae.encoder, pipe.vae.decoder]
    assert all(kwargs == {"mode": "max-autotune-no-cudagraphs", "dynamic": False} for _, kwargs in calls)


def test_a_pipeline_without_torch_modules_is_refused():
    onnx_like = SimpleNamespace(transformer=object(), vae=SimpleNamespace(encoder=object(), decoder=object()))
    with pytest.raises(ValueError, match="no torch modules"):
        compile_pipeline(onnx_like)


def test_tinysr_upscale_compile_flag_compiles_the_loaded_pipeline(tmp_path, monkeypatch):
    from tinysr_diffusers import devices
    from tinysr_diffusers.cli import main

    tiny_student().save_pretrained(tmp_path / "model")
    photo(size=(8, 8)).save(tmp_path / "in.png")
    compiled = []
    monkeypatch.setattr(devices, "compile_pipeline", lambda pipe: compiled.append(pipe) or pipe)
    common = ["upscale", str(tmp_path / "in.png"), "--model", str(tmp_path / "model"), "--dtype", "float32"]
    assert main([*common, "-o", str(tmp_path / "plain")]) == 0 and compiled == []
    assert main([*common, "-o", str(tmp_path / "compiled"), "--compile"]) == 0
    assert [type(pipe).__name__ for pipe in compiled] == ["TinySRPipeline"]
