"""The peer recipe's chain end to end on one tiny target shard, two steps per training stage (the wiring, not a
model): every stage from the latent cache to the export runs and hands the next what it reads, and the export is a
TinySRPipeline with the recipe's compressed VAE."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from tinysr_diffusers import TinySRPipeline
from training.config import load_config
from training.recipes import peer


TRAINING_STAGES = ("teacher", "vae_encoder", "vae_decoder", "prune", "latent", "pixel")


@pytest.mark.parametrize("name", TRAINING_STAGES)
def test_every_stage_config_is_a_valid_training_config(name, tmp_path):
    recipe = peer.load_recipe()
    keep = {"prune.keep": recipe["keep_layers"]} if name == "prune" else {}
    config = load_config(peer.distill_argv(recipe, tmp_path, name, teacher="t", student="s", pair_data="p",
                                           output_dir=str(tmp_path / name), **keep))
    own = peer.stage_config(name)
    assert config.hr_size == own.get("hr_size", recipe["targets"]["hr_size"])  # image stages crop smaller
    assert config.max_steps == own["max_steps"] and config.seed == recipe["seed"]


@pytest.mark.slow
def test_the_chain_runs_from_targets_to_export(tmp_path, monkeypatch):
    recipe = {**peer.load_recipe(), "max_steps": 2}
    recipe["targets"] = {**recipe["targets"], "hr_size": 128}  # the latent stages' crops: a quarter of the work
    out = tmp_path / "run"
    (out / "data" / "train").mkdir(parents=True)
    generator = np.random.default_rng(0)
    photos = []
    for index in range(2):  # smooth random photos: enough for crops, no photo source needed
        photo = PIL.Image.fromarray(generator.integers(0, 256, (24, 24, 3), dtype=np.uint8)).resize((400, 360))
        photo.save(out / "data" / "train" / f"photo_{index}.png")
        photos.append(np.asarray(photo))
    settings = {**recipe["targets"], "shard_size": 16, "batch_size": 4}
    upscale = lambda lr: torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic")  # noqa: E731
    (out / "targets").mkdir()
    np.savez(out / "targets" / "shard-00000.npz", **peer.make_shard(photos, settings, upscale, seed=1))
    only = ["taef2", "teacher_init", "latents", "teacher", "student_vae_init", "vae_encoder", "vae_decoder", "prune",
            "latent", "pixel", "export"]
    peer.mini.run_recipe(recipe, out, only, False, stages=peer.STAGES, self_writing=peer.SELF_WRITING)

    pipe = TinySRPipeline.from_pretrained(out / "export")
    student_vae = recipe["student_vae"]
    assert list(pipe.vae.config.decoder_block_out_channels) == student_vae["decoder_block_out_channels"]
    assert list(pipe.vae.config.encoder_block_out_channels) == student_vae["encoder_block_out_channels"]
    assert pipe.transformer.config.num_layers == recipe["keep_layers"]
    assert json.loads((out / "latents" / "cache.json").read_text())["samples"] == 16
    assert json.loads((out / "colour_fix.json").read_text())["chosen"] in ("none", "wavelet", "adain")
    assert (out / "export" / "LICENSE.taef2").is_file() and not (out / "latents.partial").exists()
    image = PIL.Image.fromarray(photos[0][:20, :24])
    assert pipe(image).images[0].size == (96, 80)
