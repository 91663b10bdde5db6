"""The mini recipe's wiring (no training here): every stage's settings are valid distill.py configs, the shared
settings do not override a stage's own, and a missing photo source stops with the command that installs it."""

from pathlib import Path

import pytest

from training.config import load_config
from training.recipes import mini


TRAINING_STAGES = ("teacher", "vae_encoder", "prune", "latent", "pixel")


@pytest.mark.parametrize("name", TRAINING_STAGES)
def test_every_stage_config_is_a_valid_training_config(name, tmp_path):
    recipe = mini.load_recipe()
    keep = {"prune.keep": recipe["keep_layers"]} if name == "prune" else {}  # what `stage_prune` adds
    argv = mini.distill_argv(recipe, tmp_path, name, teacher="teacher", student="student", train_data=["photos"],
                             latent_cache="cache", output_dir=str(tmp_path / name), **keep)
    config = load_config(argv)
    assert config.seed == recipe["seed"] and config.resume_from_checkpoint == "latest"
    assert config.degradation == recipe["degradation"]
    own = mini.stage_config(name)
    assert config.hr_size == own.get("hr_size", recipe["hr_size"])  # image stages may crop smaller than the cache
    assert config.max_steps == own["max_steps"]


def test_max_steps_caps_every_stage(tmp_path):
    recipe = {**mini.load_recipe(), "max_steps": 2}
    config = load_config(mini.distill_argv(recipe, tmp_path, "latent", teacher="t", student="s", latent_cache="c"))
    assert config.max_steps == 2 and config.checkpointing_steps == 2


def test_a_missing_photo_source_names_its_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(mini, "WALLPAPERS", tmp_path / "no-wallpapers")
    with pytest.raises(SystemExit, match="apt-get install plasma-workspace-wallpapers"):
        mini.stage_data(mini.load_recipe(), tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_heldout_photos_are_five_distinct_known_sources():
    recipe = mini.load_recipe()
    assert len(recipe["heldout"]) >= 5 and len(set(recipe["heldout"])) == len(recipe["heldout"])
    assert all(name.split(":")[0] in mini.LICENCES for name in recipe["heldout"])
    assert Path(mini.CONFIG_DIR, "recipe.yaml").is_file() and set(mini.STAGES) >= set(TRAINING_STAGES)


def test_the_aims_table_marks_each_aim_from_the_figures():
    from training.recipes.evaluate import aims_markdown

    def row(psnr, lpips):
        return {"mean": {"psnr": psnr, "lpips": lpips}}

    results = {"quality": {"bicubic": row(28.0, 0.60), "teacher": row(29.5, 0.40), "tinysr": row(28.9, 0.45)},
               "efficiency": {"speedup": 2.5}}
    lines = {line.split(" | ")[0].strip("| "): line for line in aims_markdown(results).splitlines()[2:]}
    assert "+0.90 dB" in lines["PSNR-Y over bicubic"] and lines["PSNR-Y over bicubic"].endswith("**missed** |")
    assert "25%" in lines["LPIPS below bicubic"] and lines["LPIPS below bicubic"].endswith("| met |")
    assert lines["PSNR-Y behind the teacher"].endswith("**missed** |")  # 0.6 dB
    assert lines["LPIPS above the teacher"].endswith("**missed** |")  # 0.05
    speed = lines["CPU speed-up over the teacher"]
    assert "2.50x" in speed and speed.endswith("| met |")
