"""`python -m benchmarks.quality`: scoring folders, --model with LR folders or seeded degradation (loaded as the CLI
loads it), reports, errors."""

import csv
import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import color, data

from benchmarks.quality import image_seed, load_image, main
from tests.tiny_pipelines import tiny_student
from tinysr_diffusers.training_utils.degradations import RealESRGANDegradation
from tinysr_diffusers.training_utils.perceptual import LPIPS


PHOTOS = {
    "astronaut": lambda: data.astronaut()[40:232, 120:312],
    "coffee": lambda: data.coffee()[100:292, 200:392],
    "chelsea": lambda: data.chelsea()[50:242, 100:292],
}

STANDIN_PIPELINE = '''
"""A stand-in for a TinySR pipeline: bicubic 4x upscaling (the real pipelines are tested in their own suite)."""
from PIL import Image

from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput


class BicubicPipeline(DiffusionPipeline):
    def __init__(self):
        super().__init__()

    def __call__(self, image, output_type="pil"):
        width, height = image.size
        return ImagePipelineOutput(images=[image.resize((4 * width, 4 * height), Image.BICUBIC)])
'''


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """HR photos (192x192), their 4x bicubic LR images, and bicubic SR images made from those."""
    root = tmp_path_factory.mktemp("quality")
    paths = {kind: root / kind for kind in ("hr", "lr", "sr")}
    for path in paths.values():
        path.mkdir()
    for name, photo in PHOTOS.items():
        hr = Image.fromarray(photo())
        lr = hr.resize((48, 48), Image.BICUBIC)
        hr.save(paths["hr"] / f"{name}.png")
        lr.save(paths["lr"] / f"{name}.png")
        lr.resize((192, 192), Image.BICUBIC).save(paths["sr"] / f"{name}.png")
    return paths


@pytest.fixture(scope="module")
def standin_pipeline(tmp_path_factory) -> Path:
    """A pipeline folder with its own code: it loads with `--trust-remote-code` only."""
    path = tmp_path_factory.mktemp("pipeline")
    (path / "pipeline_bicubic.py").write_text(textwrap.dedent(STANDIN_PIPELINE))
    (path / "model_index.json").write_text(
        json.dumps({"_class_name": ["pipeline_bicubic", "BicubicPipeline"], "_diffusers_version": "0.42.1"})
    )
    return path


def read_report(output_dir: Path) -> dict:
    assert sorted(p.name for p in output_dir.iterdir() if p.is_file()) == ["quality.csv", "quality.json", "quality.md"]
    assert not list(output_dir.glob(".tmp-*"))
    return json.loads((output_dir / "quality.json").read_text())


def test_scores_match_independent_computations(folders, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--sr", str(folders["sr"]), "--hr", str(folders["hr"]), "--metrics", "psnr,lpips,niqe,musiq",
            "--no-download", "--output-dir", str(out), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    report = read_report(out)
    assert report["command"] == "python -m benchmarks.quality " + " ".join(argv)
    assert report["environment"]["versions"]["torch"] == torch.__version__.split("+")[0]
    assert [row["image"] for row in report["images"]] == sorted(PHOTOS)

    lpips = LPIPS("alex")
    for row in report["images"]:
        sr, hr = load_image(folders["sr"] / f"{row['image']}.png"), load_image(folders["hr"] / f"{row['image']}.png")
        with torch.no_grad():
            assert row["scores"]["lpips"] == pytest.approx(lpips(sr, hr, normalize=True).item(), abs=1e-5)
        y_sr = color.rgb2ycbcr(np.asarray(Image.open(folders["sr"] / f"{row['image']}.png")))[..., 0]
        y_hr = color.rgb2ycbcr(np.asarray(Image.open(folders["hr"] / f"{row['image']}.png")))[..., 0]
        assert row["scores"]["psnr"] == pytest.approx(10 * np.log10(255**2 / np.mean((y_sr - y_hr) ** 2)), abs=1e-3)
        assert 2 < row["scores"]["niqe"] < 30
    metrics = report["metrics"]
    assert metrics["lpips"]["value"] == pytest.approx(np.mean([r["scores"]["lpips"] for r in report["images"]]))
    assert metrics["lpips"]["status"] == "ok" and metrics["lpips"]["lower_better"]
    # MUSIQ's weights are not in this machine's cache and downloads are off: listed, with the reason, never dropped.
    if metrics["musiq"]["status"] != "ok":
        assert metrics["musiq"]["status"] == "unavailable" and "downloads were off" in metrics["musiq"]["reason"]
        assert "musiq" not in report["images"][0]["scores"]
        assert "unavailable" in (out / "quality.md").read_text()

    with open(out / "quality.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["image", "psnr", "lpips", "niqe", "musiq"]
    assert [row[0] for row in rows[1:]] == [*sorted(PHOTOS), "mean"]
    assert float(rows[-1][2]) == pytest.approx(metrics["lpips"]["value"])
    assert "| lpips |" in capsys.readouterr().out


def test_no_reference_only(folders, tmp_path):
    out = tmp_path / "run"
    assert main(["--sr", str(folders["sr"]), "--metrics", "ssim,niqe", "--output-dir", str(out)]) == 0
    metrics = read_report(out)["metrics"]
    assert metrics["ssim"]["status"] == "not applicable" and "--hr" in metrics["ssim"]["reason"]
    assert metrics["niqe"]["status"] == "ok"


def test_model_on_hr_images_degrades_with_a_seed(folders, standin_pipeline, tmp_path):
    out = tmp_path / "run"
    argv = ["--model", str(standin_pipeline), "--trust-remote-code", "--hr", str(folders["hr"]),
            "--metrics", "psnr,lpips", "--seed", "3", "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = read_report(out)
    assert report["inputs"]["degradation"]["noise_range"] == [1.0, 30.0] and report["inputs"]["seed"] == 3
    degrade = RealESRGANDegradation()
    for name in PHOTOS:
        # Each LR image is the seeded Real-ESRGAN degradation of its HR image (seed from the run seed and the name).
        generator = torch.Generator().manual_seed(image_seed(3, name))
        expected = degrade(load_image(folders["hr"] / f"{name}.png"), generator)
        torch.testing.assert_close(load_image(out / "lr" / f"{name}.png"), expected, atol=0, rtol=0)
        bicubic = Image.open(out / "lr" / f"{name}.png").resize((192, 192), Image.BICUBIC)
        assert np.array_equal(np.asarray(Image.open(out / "sr" / f"{name}.png")), np.asarray(bicubic))
    assert len({image_seed(3, name) for name in PHOTOS} | {image_seed(4, name) for name in PHOTOS}) == 2 * len(PHOTOS)
    # The degraded inputs are much worse than plain bicubic ones (about 24-29 dB on those).
    assert all(row["scores"]["psnr"] < 28 for row in report["images"])


def test_model_on_lr_folder(folders, standin_pipeline, tmp_path):
    out, sr = tmp_path / "run", tmp_path / "sr"
    argv = ["--model", str(standin_pipeline), "--trust-remote-code", "--lr", str(folders["lr"]),
            "--hr", str(folders["hr"]), "--sr", str(sr), "--metrics", "psnr", "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = read_report(out)
    # The stand-in does what made the SR fixture folder, so the images are the same.
    for name in PHOTOS:
        written, expected = Image.open(sr / f"{name}.png"), Image.open(folders["sr"] / f"{name}.png")
        assert np.array_equal(np.asarray(written), np.asarray(expected))
    assert report["metrics"]["psnr"]["status"] == "ok"
    with pytest.raises(SystemExit, match="already holds images"):  # never overwrite earlier results
        main(argv)


def test_model_loads_as_the_cli_does(folders, standin_pipeline, tmp_path, monkeypatch):
    """A folder whose only code is TinySR's shims loads without a flag; a folder with other code is refused without
    `--trust-remote-code`, before its code runs and before any image is made."""
    pipeline = tmp_path / "tinysr"
    tiny_student().save_pretrained(pipeline)
    out = tmp_path / "run"
    argv = ["--lr", str(folders["lr"]), "--hr", str(folders["hr"]), "--metrics", "psnr", "--device", "cpu"]
    assert main(["--model", str(pipeline), *argv, "--output-dir", str(out)]) == 0
    assert sorted(path.name for path in (out / "sr").iterdir()) == [f"{name}.png" for name in sorted(PHOTOS)]

    foreign = tmp_path / "foreign"
    shutil.copytree(standin_pipeline, foreign)
    marker = tmp_path / "ran"
    with open(foreign / "pipeline_bicubic.py", "a") as handle:
        handle.write(f"open({str(marker)!r}, 'w').close()\n")
    refused = tmp_path / "refused"
    with pytest.raises(SystemExit, match="cannot load --model .*pipeline module .pipeline_bicubic., not"):
        main(["--model", str(foreign), *argv, "--output-dir", str(refused)])
    assert not marker.exists()
    assert not (refused / "sr").exists()
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="No such folder: runs/final"):  # a mistyped path, not a Hub failure
        main(["--model", "runs/final", *argv, "--output-dir", str(refused)])


def test_bad_inputs_are_named(folders, tmp_path):
    partial = tmp_path / "partial_hr"
    partial.mkdir()
    (partial / "coffee.png").write_bytes((folders["hr"] / "coffee.png").read_bytes())
    score_sr = ["--sr", str(folders["sr"]), "--metrics", "psnr", "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"no HR image for the SR images \['astronaut', 'chelsea'\]"):
        main([*score_sr, "--hr", str(partial)])
    with pytest.raises(SystemExit, match="is 192x192 but HR"):
        main([*score_sr, "--hr", str(folders["lr"])])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no images"):
        main(["--sr", str(empty), "--metrics", "niqe", "--output-dir", str(tmp_path / "c")])
    for argv in (
        ["--metrics", "psnr"],
        ["--sr", str(folders["sr"]), "--metrics", "psnr,vif"],
        ["--model", "x"],
        ["--sr", str(folders["sr"]), "--trust-remote-code"],
    ):
        with pytest.raises(SystemExit) as raised:
            main(argv)
        assert raised.value.code == 2
    bad_config = tmp_path / "degradation.json"
    bad_config.write_text(json.dumps({"noise_rnage": [1, 5]}))
    with pytest.raises(SystemExit, match="noise_rnage"):
        main(["--model", "unused", "--hr", str(folders["hr"]), "--degradation", str(bad_config),
              "--output-dir", str(tmp_path / "d")])  # fmt: skip
    bad_config.write_text('{"noise_range": [1, 5]')
    with pytest.raises(SystemExit, match="degradation.json is not valid JSON"):
        main(["--model", "unused", "--hr", str(folders["hr"]), "--degradation", str(bad_config),
              "--output-dir", str(tmp_path / "d")])  # fmt: skip
