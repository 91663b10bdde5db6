"""`python -m benchmarks.student_vae`: the compressed VAE beside TAEF2, measured (not written) on given photos."""

import json
from pathlib import Path

import numpy as np
import PIL.Image

from benchmarks.student_vae import TAEF2, main
from tinysr_diffusers import TinySRAutoencoder
from tinysr_diffusers.hub.conversion import convert_taef2


def test_reconstruction_and_speed_of_a_narrowed_vae(tmp_path):
    photos = tmp_path / "hr"
    photos.mkdir()
    generator = np.random.default_rng(0)
    for index in range(2):
        small = generator.integers(0, 256, (8, 10, 3), dtype=np.uint8)
        PIL.Image.fromarray(small).resize((84, 68), PIL.Image.Resampling.BICUBIC).save(photos / f"p{index}.png")
    taef2 = convert_taef2(Path(TAEF2) / "taef2_encoder.pth", Path(TAEF2) / "taef2_decoder.pth")
    TinySRAutoencoder.from_autoencoder(taef2, decoder_block_out_channels=[64, 64, 32, 32]).save_pretrained(
        tmp_path / "narrow")
    output = tmp_path / "result.md"
    assert main(["--hr", str(photos), "--vae", f"narrow={tmp_path / 'narrow'}", "--output", str(output),
                 "--repeats", "1", "--side", "64"]) == 0
    results = json.loads(output.with_suffix(".json").read_text())
    quality = results["quality"]
    assert set(quality) == {"taef2", "narrow", "narrow decoder on TAEF2 latents"}
    assert quality["taef2"]["psnr"] > quality["narrow"]["psnr"] + 3  # untrained narrowing costs, TAEF2 is ~30 dB
    assert results["parameters"]["narrow"] < results["parameters"]["taef2"]
    assert all(seconds["encode"] > 0 and seconds["decode"] > 0 for seconds in results["latency_s"].values())
    assert "| narrow decoder on TAEF2 latents |" in output.read_text()
