"""What a model folder or checkpoint cannot do (docs/security.md): run code nobody trusted. Every test plants code
that would create a marker file and checks that loading refuses it with one clear error and the marker never appears.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.payloads import Payload
from tests.release_layouts import make_tinysr_release
from tests.tiny_pipelines import photo, tiny_student
from tinysr_diffusers import TinySRPipeline
from tinysr_diffusers.hub.conversion import ConversionError, convert_taef2, convert_tinysr
from tinysr_diffusers.hub.pipeline_folders import SHIM_SOURCE, UntrustedFolderError
from training.latents import check_latent_cache


def _upscale(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(photo("astronaut", (12, 12)), output_type="np").images


@pytest.fixture
def saved(tmp_path) -> Path:
    folder = tmp_path / "pipe"
    tiny_student().save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------- pipeline folders
def test_a_symlinked_component_folder_is_checked_where_it_points(saved, tmp_path):
    """diffusers imports `transformer/tinysr_diffusers.py` through a symlinked `transformer/`: it is checked there."""
    expected = _upscale(TinySRPipeline.from_pretrained(saved))
    outside = tmp_path / "elsewhere"
    shutil.move(saved / "transformer", outside)
    (saved / "transformer").symlink_to(outside, target_is_directory=True)
    np.testing.assert_array_equal(_upscale(TinySRPipeline.from_pretrained(saved)), expected)  # only our shim: loads

    marker = tmp_path / "ran"
    (outside / "tinysr_diffusers.py").write_text(f"open({str(marker)!r}, 'w').close()\n{SHIM_SOURCE}")
    with pytest.raises(UntrustedFolderError, match="transformer/tinysr_diffusers.py differs from the shim"):
        TinySRPipeline.from_pretrained(saved)
    assert not marker.exists()

    (outside / "tinysr_diffusers.py").write_text(SHIM_SOURCE)
    (outside / "helpers.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(UntrustedFolderError, match="not a tinysr_diffusers shim: transformer/helpers.py"):
        TinySRPipeline.from_pretrained(saved)
    assert not marker.exists()


def test_a_symlink_loop_is_refused(saved):
    (saved / "vae" / "loop").symlink_to(saved, target_is_directory=True)
    with pytest.raises(UntrustedFolderError, match="symlink loop"):
        TinySRPipeline.from_pretrained(saved)


# ------------------------------------------------------------------------------------------ release checkpoints
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_tinysr_release(tmp_path_factory.mktemp("release"))


def test_pickled_code_in_release_pieces_is_refused(release, tmp_path):
    """`.pt` embeddings, `.bin` weights and TAEF2 `.pth` files are read with `weights_only=True`: a pickle that would
    run code is one error naming the file, and torch's advice to retry with `weights_only=False` is not passed on."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save(Payload(marker), evil)
    transformer = tmp_path / "transformer"
    shutil.copytree(release.transformer_dir, transformer)
    (transformer / "diffusion_pytorch_model.safetensors").unlink()
    shutil.copy(evil, transformer / "diffusion_pytorch_model.bin")

    loads = {
        "Pooled prompt embedding": lambda: convert_tinysr(**{**release.args(), "pool_embeds_path": evil}),
        "Transformer weights": lambda: convert_tinysr(**{**release.args(), "transformer_dir": transformer}),
        "TAEF2 encoder": lambda: convert_taef2(evil, evil),
    }
    for what, load in loads.items():
        with pytest.raises(ConversionError, match=f"^{what} .* holds objects other than tensors") as raised:
            load()
        assert "weights_only" not in str(raised.value)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload works: unpickled in full, it runs
    assert marker.exists()


# ------------------------------------------------------------------------------------------------- latent caches
@pytest.mark.parametrize("info", ['{"samples": 4,', '["teacher"]', '{"samples": 4}'])
def test_a_malformed_latent_cache_index_is_named(tmp_path, info):
    path = tmp_path / "cache.json"
    path.write_text(info)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} (is not valid JSON|lacks)"):
        check_latent_cache(str(tmp_path))
    path.write_text(json.dumps({"teacher": "t", "samples": 4, "hr_size": 64}))
    assert check_latent_cache(str(tmp_path))["samples"] == 4
