"""The wheel: built from this checkout and installed into a fresh venv (no downloads: the venv sees this environment's
dependencies through a `.pth` line, the wheel's own packages first), it loads the default model it ships and writes a
Hub card from the `model_cards` templates installed with it."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
# What setup.py reads and packages; built from a copy, as setuptools writes build/ and *.egg-info beside the sources.
SOURCES = ["setup.py", "README.md", "tinysr_diffusers", "pruning", "training", "model_cards"]

WRITE_CARD = """
import json, sys
from importlib import resources

import model_cards, tinysr_diffusers
from tinysr_diffusers import TinySRPipeline
from tinysr_diffusers.hub.model_cards import pipeline_card

pipe = TinySRPipeline.from_pretrained()  # the default model, package data of the wheel
pipeline_card(pipe, "user/tinysr-default").save(sys.argv[1])
print(json.dumps({
    "tinysr_diffusers": tinysr_diffusers.__file__,
    "templates": str(resources.files("model_cards").joinpath("tinysr_pipeline.md")),
}))
"""


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_writes_a_model_card(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")

    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp_path / "dist"),
          str(source)], env=env)
    (wheel,) = (tmp_path / "dist").glob("tinysr_diffusers-*.whl")

    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    python = fresh / "bin" / "python"
    _run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)], env=env)
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    site_packages = Path(purelib)
    # This environment's dependencies after the wheel's packages; its .pth files (the editable install's finder) are
    # not processed from there, so tinysr_diffusers and model_cards can only come from the wheel.
    dependencies = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site_packages / "dependencies.pth").write_text("\n".join(sorted(dependencies)) + "\n")

    card = tmp_path / "README.md"
    result = _run([str(python), "-I", "-c", WRITE_CARD, str(card)], cwd=tmp_path, env=env)
    paths = json.loads(result.stdout.strip().splitlines()[-1])
    for path in paths.values():
        assert Path(path).is_relative_to(site_packages), paths
    text = card.read_text(encoding="utf-8")
    assert 'DiffusionPipeline.from_pretrained("user/tinysr-default", trust_remote_code=True)' in text
    assert "`TinySRPipeline`" in text and "Stability AI Community License" in text
    assert "Not measured for this checkpoint." in text
