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


# A component's library in model_index.json is a module name that diffusers imports, or a file `<component>/<name>.py`
# it runs; these must be refused before diffusers sees the folder (issue 27, item 1).
TAMPERED_LIBRARIES = [
    "../../evil", "../evil", "..", "./evil", "vae/../../evil", "/tmp/evil", "evil", "os", "os.path", "subprocess",
    "antigravity", "tinysr_diffusers.evil", "tinysr_diffusers/../evil", "tinysr_diffusers.py", " tinysr_diffusers",
    "TINYSR_DIFFUSERS", "diffusers.evil", "pipeline_tinysr_diffusers", "", 7, ["tinysr_diffusers"],
]


@pytest.mark.parametrize("library", TAMPERED_LIBRARIES, ids=repr)
def test_a_tampered_library_name_imports_nothing(saved, tmp_path, library):
    import sys

    marker = tmp_path / "ran"
    payload = f"open({str(marker)!r}, 'w').close()\nfrom tinysr_diffusers import *  # noqa\n"
    for place in (tmp_path / "evil.py", saved / "evil.py", saved / "vae" / "evil.py"):
        place.write_text(payload)
    (saved / "vae" / "evil.py").unlink()  # a .py beside the shims is refused for another reason: keep it outside
    (saved / "evil.py").unlink()
    index = json.loads((saved / "model_index.json").read_text())
    index["vae"] = [library, index["vae"][1]]
    (saved / "model_index.json").write_text(json.dumps(index))
    modules = set(sys.modules)
    with pytest.raises(UntrustedFolderError, match="vae.*names the library|refusing"):
        TinySRPipeline.from_pretrained(saved)
    assert not marker.exists()
    assert not {name for name in set(sys.modules) - modules if "evil" in name or name in ("antigravity",)}


def test_a_tampered_pipeline_module_is_refused(saved, tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    index = json.loads((saved / "model_index.json").read_text())
    index["_class_name"] = ["../evil", "TinySRPipeline"]
    (saved / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UntrustedFolderError, match="pipeline module '../evil'"):
        TinySRPipeline.from_pretrained(saved)
    assert not marker.exists()


def test_the_cli_refuses_a_library_path_without_running_it(saved, tmp_path, capsys):
    """The reproduction of issue 27: `"vae": ["../../evil", ...]` with the shims removed, `tinysr upscale`."""
    from tinysr_diffusers.cli import main

    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nfrom tinysr_diffusers import *  # noqa\n")
    for shim in saved.glob("vae/*.py"):
        shim.unlink()
    index = json.loads((saved / "model_index.json").read_text())
    index["vae"] = ["../../evil", index["vae"][1]]
    (saved / "model_index.json").write_text(json.dumps(index))
    image = tmp_path / "small.png"
    photo("astronaut", (32, 24)).save(image)
    assert main(["upscale", str(image), "-o", str(tmp_path / "out"), "--model", str(saved)]) == 2
    assert not marker.exists()
    error = capsys.readouterr().err
    assert "names the library '../../evil'" in error and len(error.strip().splitlines()) == 1
