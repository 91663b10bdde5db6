"""The model shipped in the package: it loads every documented way, is inside the wheel, and really super-resolves the
recipe's held-out real photos (random weights cannot beat bicubic by 0.5 dB)."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from benchmarks.showcase import tensor, to_pil
from tinysr_diffusers import DEFAULT_MODEL, TinySRPipeline
from tinysr_diffusers.cli import main
from tinysr_diffusers.image_processing import bicubic_upscale
from training.recipes.mini import heldout_pair, load_recipe


ROOT = Path(__file__).resolve().parents[1]


def psnr_y(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR on BT.601 Y (the SR literature's), images uint8 HWC."""
    weights = np.array([65.481, 128.553, 24.966]) / 255.0

    def y(array):
        return (array.astype(np.float64) / 255.0) @ weights + 16.0 / 255.0

    return float(10 * np.log10(1.0 / np.mean((y(image) - y(reference)) ** 2)))


@pytest.fixture(scope="module")
def pipe():
    return TinySRPipeline.from_pretrained()


# The recipe's held-out photos that every install has (the wallpaper one needs Debian's wallpapers package).
OFFLINE_HELDOUT = [name for name in load_recipe()["heldout"] if name.split(":")[0] in ("skimage", "pyiqa")]


def test_default_model_beats_bicubic_on_the_held_out_photos(pipe):
    """On every held-out photo at hand, with the recipe's seeded degradation: at least +0.5 dB PSNR-Y over bicubic
    on average (the per-photo figures, some below bicubic, are in benchmarks/results/mini/)."""
    gains = {}
    for name in OFFLINE_HELDOUT:
        hr, lr = heldout_pair(name)
        hr = np.asarray(hr)
        result = np.asarray(pipe(lr).images[0])
        bicubic = np.asarray(to_pil(bicubic_upscale(tensor(lr), 4)))
        assert result.shape == hr.shape
        gains[name] = psnr_y(result, hr) - psnr_y(bicubic, hr)
    assert len(gains) >= 4 and np.mean(list(gains.values())) >= 0.5, gains


def test_default_model_loads_every_documented_way(pipe):
    from diffusers import DiffusionPipeline

    assert pipe.transformer.dtype == torch.float32 and Path(DEFAULT_MODEL).is_dir()
    generic = DiffusionPipeline.from_pretrained(DEFAULT_MODEL, trust_remote_code=True, dtype=torch.float32)
    assert type(generic) is TinySRPipeline
    image = PIL.Image.new("RGB", (12, 10), (120, 80, 40))
    assert np.allclose(np.asarray(generic(image).images[0]), np.asarray(pipe(image).images[0]), atol=1)
    index = json.loads((Path(DEFAULT_MODEL) / "model_index.json").read_text())
    assert index["_class_name"][1] == "TinySRPipeline"
    assert sum(f.stat().st_size for f in Path(DEFAULT_MODEL).rglob("*") if f.is_file()) < 20 * 2**20


def test_cli_without_model_uses_the_default(tmp_path, capsys):
    source = tmp_path / "small.png"
    PIL.Image.fromarray((np.random.default_rng(0).random((16, 20, 3)) * 255).astype(np.uint8)).save(source)
    assert main(["upscale", str(source), "-o", str(tmp_path / "out")]) == 0
    with PIL.Image.open(tmp_path / "out" / "small.png") as image:
        assert image.size == (80, 64)


@pytest.mark.slow
def test_wheel_contains_the_default_model(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("tinysr_diffusers-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {"tinysr_diffusers/default_model/" + p.relative_to(DEFAULT_MODEL).as_posix()
               for p in Path(DEFAULT_MODEL).rglob("*") if p.is_file()}
    assert shipped and shipped <= names, sorted(shipped - names)
