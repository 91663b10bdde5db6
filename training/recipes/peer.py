"""The peer-distillation recipe: the default model distilled from Real-ESRGAN x4plus through the paper's chain.

    python -m training.recipes.peer [--output-dir runs/peer] [--only STAGE ...] [--list]     (make default-model)

The mini recipe regressed a from-scratch teacher onto the HR photos: an ill-posed regression that converges to the
blurred mean (softer than bicubic on mildly degraded photos). Here the teacher regresses onto Real-ESRGAN x4plus's
output for the same LR, a deterministic function of the LR, so nothing averages out; a little of the HR is mixed into
the target (`hr_mix`) for fidelity. Real-ESRGAN runs in torch (`tinysr_diffusers.evaluation.realesrgan`), its weights
fetched once with `python -m tinysr_diffusers.evaluation.realesrgan fetch`.

Stages, in order (`STAGES`), each skipped when its folder exists (the mini recipe's driver); long ones resume inside:

1. `data`: every offline source of real photographs (the mini recipe's, plus Debian's lomiri-wallpapers
   photographs), the held-out photos split off first; training photos downscaled to at most `max_side`.
2. `taef2`: TAEF2 as a `TinySRAutoencoder`.
3. `targets`: sharded (LR, Real-ESRGAN(LR), HR) crop triplets; each crop degraded at a level drawn from
   `level_probs` (clean bicubic, mild, Real-ESRGAN second order: `degradation_levels`), with real context around it
   for Real-ESRGAN. One `.npz` per shard, written atomically: an interrupted stage resumes at the next shard.
   `teacher_init`: a `TSDSRPipeline` with a zero-output SD3 transformer (it starts as TAEF2 of the bicubic upscale).
4. `latents`: TAEF2 latents of the targets in the latent-cache layout (`lr_latents` = z of the bicubic-upscaled LR,
   `hr_latents` = z of the target), read by the teacher, prune and latent stages.
5. `teacher`: `training/distill.py` stage `teacher` on that cache: latent MSE plus a small decoded LPIPS term.

Configs: `training/configs/peer/`. Shared helpers (photo sources, the stage driver, loss plots) are the mini recipe's.
"""

import argparse
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from training.recipes import mini


ROOT = mini.ROOT
CONFIG_DIR = ROOT / "training" / "configs" / "peer"
BACKGROUNDS = Path("/usr/share/backgrounds")
# The photographs among Debian's lomiri-wallpapers(-16.04, -20.04) (the others are drawings or renders), with the
# licence their copyright file gives each.
LOMIRI_PHOTOS = {
    "Bridge_by_Sander_Klootwijk": "CC-BY-SA-4.0", "Dragonfly_by_Bolly": "CC-BY-SA-4.0",
    "Kleiber_by_Lukas_Baubkus": "CC-BY-SA-3.0", "Picture_0B_by_freespace": "CC-BY-4.0",
    "Picture_1A_by_freespace": "CC-BY-4.0", "Wine_by_Jakkub_Mede": "CC-BY-4.0",
    "aitzgorri_by_Aitzol_Berasategi": "CC-BY-4.0", "analogpattern_by_Peter_Nerlich": "CC-BY-SA-4.0",
    "free_by_Peter_Nerlich": "CC-BY-SA-4.0", "friends_by_Aitzol_Berasategi": "CC-BY-4.0",
    "greentock_by_Peter_Nerlich": "CC-BY-SA-4.0", "life_by_Aitzol_Berasategi": "CC-BY-4.0",
    "picosdeeuropa_by_Aitzol_Berasategi": "CC-BY-4.0", "seeding_by_Clements_Engelhardt": "CC-BY-SA-4.0",
    "sunset_by_Aitzol_Berasategi": "CC-BY-4.0",
}
LOMIRI_INSTALL = "apt-get install lomiri-wallpapers lomiri-wallpapers-16.04 lomiri-wallpapers-20.04"

logger = logging.getLogger("tinysr.recipes.peer")


def load_recipe() -> dict:
    return mini.load_recipe(CONFIG_DIR)


def stage_config(name: str) -> dict:
    return mini.stage_config(name, CONFIG_DIR)


# ------------------------------------------------------------------------------------------------------------- data
def lomiri_photo(name: str):
    import PIL.Image

    path = BACKGROUNDS / f"{name}.jpg"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: install Debian's lomiri wallpapers with `{LOMIRI_INSTALL}`.")
    with PIL.Image.open(path) as image:
        return image.convert("RGB")


def collect_photos(recipe: dict) -> dict:
    """Every photo of the recipe by `source:name`, with its licence: (image, licence)."""
    photos = {name: (image, mini.LICENCES[name.split(":")[0]]) for name, image in mini.collect_photos(recipe).items()}
    for name, licence in LOMIRI_PHOTOS.items():
        photos[f"lomiri:{name}"] = (lomiri_photo(name), f"Debian lomiri-wallpapers: {licence}")
    return photos


def heldout_photo(name: str, recipe: dict):
    """A held-out HR photo (`source:name`), cropped to a multiple of 4, exactly as the data stage writes it: for
    checks of the shipped model on a machine without the recipe's outputs."""
    source, _, key = name.partition(":")
    if source == "lomiri":
        image = lomiri_photo(key)
    elif source == "skimage":
        image = mini._skimage_photo(key)
    elif source == "wallpaper":
        image = mini._wallpaper_photo(key, 1.0)
    else:
        raise ValueError(f"Held-out photos come from skimage, wallpaper or lomiri, not {name!r}.")
    return mini.crop_to_scale(fit_side(image, recipe["heldout_max_side"]))


def fit_side(image, max_side: int):
    """The photo downscaled (Lanczos) so that its longer side is at most `max_side`: sharper per-pixel detail, as
    in a photo viewed whole."""
    import PIL.Image

    factor = max_side / max(image.size)
    if factor >= 1:
        return image
    return image.resize((round(image.width * factor), round(image.height * factor)), PIL.Image.Resampling.LANCZOS)


def stage_data(recipe: dict, folder: Path) -> None:
    from tinysr_diffusers.utils import write_json

    try:
        photos = collect_photos(recipe)
    except (FileNotFoundError, ImportError) as error:
        raise SystemExit(f"error: {error}") from None
    missing = [name for name in recipe["heldout"] if name not in photos]
    if missing:
        raise ValueError(f"Held-out photos {missing} are not among the collected photos.")
    (folder / "train").mkdir(parents=True)
    (folder / "heldout").mkdir()
    sources = []
    for name, (image, licence) in photos.items():
        split = "heldout" if name in recipe["heldout"] else "train"
        if split == "heldout":
            image = heldout_photo(name, recipe)
        else:
            image = fit_side(image, recipe["max_side"])
        file = name.replace(":", "_") + ".png"
        image.save(folder / split / file)
        sources.append({"photo": name, "split": split, "file": file, "size": list(image.size), "licence": licence})
    write_json(folder / "sources.json", sources)


def stage_teacher_init(recipe: dict, folder: Path, out: Path) -> None:
    mini.stage_teacher_init(recipe, folder, out)


# ---------------------------------------------------------------------------------------------------------- targets
def shard_seed(seed: int, shard: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{shard}".encode()).digest()[:8], "little") >> 1


def sample_crop(photo, size: int, scale_range, generator):
    """A random `size` square of `photo` (uint8 HxWx3) at a random scale in `scale_range`, randomly flipped and
    rotated: float (3, size, size) in [0, 1]."""
    import numpy as np
    import PIL.Image
    import torch

    height, width = photo.shape[:2]
    low, high = scale_range
    scale = low + (high - low) * float(torch.rand((), generator=generator))
    side = min(round(size / scale), height, width)
    top = int(torch.randint(0, height - side + 1, (), generator=generator))
    left = int(torch.randint(0, width - side + 1, (), generator=generator))
    region = PIL.Image.fromarray(photo[top:top + side, left:left + side])
    if side != size:
        region = region.resize((size, size), PIL.Image.Resampling.LANCZOS)
    crop = torch.from_numpy(np.asarray(region).copy()).permute(2, 0, 1).float() / 255
    if bool(torch.rand((), generator=generator) < 0.5):
        crop = crop.flip(-1)
    return torch.rot90(crop, int(torch.randint(0, 4, (), generator=generator)), (-2, -1))


def make_shard(photos: list, settings: dict, model, seed: int) -> dict:
    """One shard of (LR, Real-ESRGAN, HR) crop triplets as uint8 arrays, plus each crop's level and photo index.

    Each crop is cut with `context` LR pixels of real surroundings per side, degraded and upscaled whole, then the
    centre kept: Real-ESRGAN sees what it would see inside a large image, not a reflected border.
    """
    import numpy as np
    import torch

    from tinysr_diffusers.training_utils.degradation_levels import LEVELS, MILD_TRAINING, degrade
    from tinysr_diffusers.training_utils.degradations import DegradationConfig

    generator = torch.Generator().manual_seed(seed)
    hr_size, context = settings["hr_size"], settings["context"]
    outer = hr_size + 8 * context
    realesrgan = DegradationConfig.from_dict(settings.get("realesrgan", {}))
    probabilities = torch.tensor([settings["level_probs"][level] for level in LEVELS], dtype=torch.float64)
    lrs, hrs, levels, sources = [], [], [], []
    for _ in range(settings["shard_size"]):
        index = int(torch.randint(0, len(photos), (), generator=generator))
        level = int(torch.multinomial(probabilities, 1, generator=generator))
        hr = sample_crop(photos[index], outer, settings["scale_range"], generator)[None]
        lrs.append(degrade(hr, LEVELS[level], generator, mild=MILD_TRAINING, realesrgan=realesrgan)[0])
        hrs.append(hr[0])
        levels.append(level)
        sources.append(index)
    lr = torch.stack(lrs)
    targets = []
    with torch.no_grad():
        for start in range(0, len(lr), settings["batch_size"]):
            batch = lr[start:start + settings["batch_size"]].contiguous(memory_format=torch.channels_last)
            targets.append(model(batch).clamp(0, 1))
    target = torch.cat(targets)
    inner = slice(4 * context, 4 * context + hr_size)

    def to_uint8(images):
        return (images * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()

    return {
        "lr": to_uint8(lr[..., context:context + hr_size // 4, context:context + hr_size // 4]),
        "target": to_uint8(target[..., inner, inner]),
        "hr": to_uint8(torch.stack(hrs)[..., inner, inner]),
        "level": np.asarray(levels, np.int8),
        "photo": np.asarray(sources, np.int16),
    }


def stage_targets(recipe: dict, folder: Path, out: Path) -> None:
    """Write `shards` shards of triplets into `<out>/targets.partial`, skipping finished ones; rename when done."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from tinysr_diffusers.evaluation.realesrgan import RRDBNet
    from tinysr_diffusers.utils import atomic_path, write_json

    settings = recipe["targets"]
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(exist_ok=True)
    files = sorted((out / "data" / "train").glob("*.png"))
    photos = [np.asarray(mini.load_rgb(path)) for path in files]
    try:
        model = RRDBNet.from_ncnn().to(memory_format=torch.channels_last)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    for shard in tqdm(range(settings["shards"]), desc="Real-ESRGAN targets"):
        path = partial / f"shard-{shard:05d}.npz"
        if path.exists():
            continue
        arrays = make_shard(photos, settings, model, shard_seed(recipe["seed"], shard))
        with atomic_path(path) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, **arrays)
    write_json(partial / "targets.json", {**settings, "photos": [path.name for path in files]})
    os.replace(partial, folder)


def read_shard(path: Path) -> dict:
    import numpy as np

    with np.load(path) as data:
        return {key: data[key] for key in data.files}


# ---------------------------------------------------------------------------------------------------------- latents
def stage_latents(recipe: dict, folder: Path, out: Path) -> None:
    """TAEF2 latents of the first `shards` target shards (all by default): `lr_latents` of the bicubic-upscaled LR,
    `hr_latents` of the target mixed with `hr_mix` of the HR (pixel space), in the latent-cache layout
    `training/latents.py` defines. One file per shard in `<folder>.partial`, renamed when all are done: an
    interrupted stage resumes at the next shard."""
    import torch
    from safetensors.torch import save_file

    from tinysr_diffusers import TSDSRPipeline
    from tinysr_diffusers.devices import optimize_for_cpu
    from tinysr_diffusers.image_processing import bicubic_upscale
    from tqdm.auto import tqdm

    from tinysr_diffusers.utils import atomic_path, write_json
    from training.latents import CACHE_INFO, training_latents

    settings = stage_config("latents")
    pipe = optimize_for_cpu(TSDSRPipeline.from_pretrained(out / "teacher_init"))  # channels_last: ~2x the encodes
    mix = settings["hr_mix"]
    shards = sorted((out / "targets").glob("shard-*.npz"))[:settings.get("shards")]
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(exist_ok=True)
    samples = 0

    def images(array):
        return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255

    with torch.no_grad():
        for number, path in enumerate(tqdm(shards, desc="TAEF2 latents")):
            arrays = read_shard(path)
            samples += len(arrays["lr"])
            file = partial / f"shard-000-{number:06d}.safetensors"
            if file.exists():  # done before an interruption
                continue
            lr_up = bicubic_upscale(images(arrays["lr"]), 4).clamp(0, 1)
            target = (1 - mix) * images(arrays["target"]) + mix * images(arrays["hr"])
            batch = settings["batch_size"]
            tensors = {"lr_latents": [], "hr_latents": []}
            for start in range(0, len(lr_up), batch):
                tensors["lr_latents"].append(training_latents(pipe, lr_up[start:start + batch] * 2 - 1))
                tensors["hr_latents"].append(training_latents(pipe, target[start:start + batch] * 2 - 1))
            tensors = {key: torch.cat(value).float().contiguous() for key, value in tensors.items()}
            with atomic_path(file) as temporary:
                save_file(tensors, temporary)
    write_json(partial / CACHE_INFO, {"teacher": str(out / "teacher_init"), "teacher_latents": False,
                                      "samples": samples, "hr_size": recipe["targets"]["hr_size"], "hr_mix": mix})
    os.replace(partial, folder)


# ---------------------------------------------------------------------------------------------------------- teacher
def distill_argv(recipe: dict, out: Path, name: str, **overrides) -> list[str]:
    """The command line of a `training/distill.py` stage: its YAML, the recipe's shared settings, `overrides`."""
    values = {"seed": recipe["seed"], "report_to": "tensorboard", "resume_from_checkpoint": "latest", **overrides}
    if "hr_size" not in stage_config(name):  # the latent stages match the shards' crops; image stages crop smaller
        values["hr_size"] = recipe["targets"]["hr_size"]
    if recipe.get("max_steps"):
        values.update(max_steps=recipe["max_steps"], checkpointing_steps=recipe["max_steps"])
    argv = ["--config", str(CONFIG_DIR / f"{name}.yaml")]
    return argv + [f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
                   for key, value in values.items()]


def stage_teacher(recipe: dict, folder: Path, out: Path) -> None:
    mini.run_distill(recipe, out, "teacher", folder, argv=distill_argv, teacher=str(out / "teacher_init"),
                     latent_cache=str(out / "latents"))
    shutil.copy(out / "taef2" / "LICENSE.taef2", folder / "LICENSE.taef2")


# ------------------------------------------------------------------------------------------------- student VAE
def stage_student_vae_init(recipe: dict, folder: Path, out: Path) -> None:
    """TAEF2 with the recipe's `student_vae` convolutions and widths, as the start of the VAE stages."""
    from tinysr_diffusers import TinySRAutoencoder

    taef2 = TinySRAutoencoder.from_pretrained(out / "taef2")
    TinySRAutoencoder.from_autoencoder(taef2, **recipe["student_vae"]).save_pretrained(folder)
    shutil.copy(out / "taef2" / "LICENSE.taef2", folder / "LICENSE.taef2")


def stage_vae_encoder(recipe: dict, folder: Path, out: Path) -> None:
    mini.run_distill(recipe, out, "vae_encoder", folder, argv=distill_argv, teacher=str(out / "teacher_init"),
                     student_vae=str(out / "student_vae_init"), pair_data=str(out / "targets"))
    shutil.copy(out / "taef2" / "LICENSE.taef2", folder / "LICENSE.taef2")


def stage_vae_decoder(recipe: dict, folder: Path, out: Path) -> None:
    """The decoder stage on the trained encoder: its export is the student's whole VAE."""
    mini.run_distill(recipe, out, "vae_decoder", folder, argv=distill_argv, teacher=str(out / "teacher_init"),
                     student_vae=str(out / "vae_encoder"), pair_data=str(out / "targets"),
                     pair_hr_mix=stage_config("latents")["hr_mix"])
    shutil.copy(out / "taef2" / "LICENSE.taef2", folder / "LICENSE.taef2")


# ----------------------------------------------------------------------------------------------- pruned student
def stage_prune(recipe: dict, folder: Path, out: Path) -> None:
    """The TinySR search on the trained teacher over the target latent cache; the student keeps TAEF2 until the
    pixel stage puts its own VAE in."""
    mini.run_distill(recipe, out, "prune", folder, argv=distill_argv, teacher=str(out / "teacher"),
                     latent_cache=str(out / "latents"), **{"prune.keep": recipe["keep_layers"]})
    for name in ("pruning.json", "keep_probabilities.png"):
        shutil.copy(out / "prune-run" / name, out / f"prune.{name}")


def stage_latent(recipe: dict, folder: Path, out: Path) -> None:
    mini.run_distill(recipe, out, "latent", folder, argv=distill_argv, teacher=str(out / "teacher"),
                     student=str(out / "prune"), latent_cache=str(out / "latents"))


def stage_pixel(recipe: dict, folder: Path, out: Path) -> None:
    mini.run_distill(recipe, out, "pixel", folder, argv=distill_argv, teacher=str(out / "teacher"),
                     student=str(out / "latent"), student_vae=str(out / "vae_decoder"),
                     pair_data=str(out / "targets"))
    shutil.copy(out / "taef2" / "LICENSE.taef2", folder / "LICENSE.taef2")


# ------------------------------------------------------------------------------------------------ export, ship
COLOUR_FIXES = (None, "wavelet", "adain")


def choose_colour_fix(pipe, shard: dict, count: int = 32) -> dict:
    """Mean PSNR-Y against the HR of `count` training crops (a target shard: all three degradation levels) with each
    colour fix; the shipped pipeline's own fix is the best. Training data only: the held-out photos are for the
    benchmark."""
    import numpy as np
    import torch

    from tinysr_diffusers.evaluation.metrics import create_metric

    psnr = create_metric("psnr", allow_download=False)
    lr = torch.from_numpy(shard["lr"][:count]).permute(0, 3, 1, 2).float() / 255
    hr = torch.from_numpy(shard["hr"][:count]).permute(0, 3, 1, 2).float() / 255
    pipe.set_progress_bar_config(disable=True)
    scores = {}
    with torch.no_grad():
        for fix in COLOUR_FIXES:
            outputs = pipe(lr, output_type="pt", color_fix=fix).images.clamp(0, 1)
            scores[str(fix).lower()] = float(np.mean([float(psnr(o[None], h[None])) for o, h in zip(outputs, hr)]))
    return {"psnr_y": scores, "chosen": max(scores, key=scores.get)}


def stage_export(recipe: dict, folder: Path, out: Path) -> None:
    """The pixel stage's student as the shipped default model: its colour fix chosen on the last target shard,
    weights at the smallest precision that keeps its outputs (`mini.export_student`)."""
    from tinysr_diffusers import TinySRPipeline
    from tinysr_diffusers.utils import write_json

    shard = read_shard(sorted((out / "targets").glob("shard-*.npz"))[-1])
    choice = choose_colour_fix(TinySRPipeline.from_pretrained(out / "pixel"), shard)
    write_json(out / "colour_fix.json", choice)
    fix = None if choice["chosen"] == "none" else choice["chosen"]
    lr = mini.load_rgb(sorted((out / "data" / "train").glob("*.png"))[0]).crop((0, 0, 128, 96))
    mini.export_student(out / "pixel", folder, lr=lr, color_fix=fix)
    shutil.copy(out / "taef2" / "LICENSE.taef2", folder / "LICENSE.taef2")


RESULTS = ROOT / "benchmarks" / "results" / "peer"
BENCHMARK = ("python -m benchmarks.peer_comparison --hr runs/peer/data/heldout --output-dir runs/peer/benchmark "
             "--model tinysr=runs/peer/export --model teacher=runs/peer/teacher --teacher teacher "
             "--model previous=default --figure docs/images/default_model_peer.jpg")


def results_sections(markdown: str) -> dict[str, str]:
    """The benchmark's results.md (`to_markdown`: per-level tables, a latency line, the aims table) cut into the
    card's fields."""
    lines = markdown.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("### "))
    aims = next((i for i, line in enumerate(lines) if line.startswith("| Aim |")), len(lines))
    latency = [line for line in lines[first:aims] if line.startswith("Seconds per")]
    quality = [line for line in lines[first:aims] if not line.startswith("Seconds per")]
    return {"quality_table": "\n".join(quality).strip(), "latency": "\n".join(latency) or "Latency: not measured.",
            "aims_table": "\n".join(lines[aims:]).strip() or "Not measured."}


def stage_ship(recipe: dict, folder: Path, out: Path) -> None:
    """The export, with its model card filled from the measurements, becomes the package's default model; the
    recipe's small outputs (benchmark results, loss curves, the pruning decision, timings, sources, the colour-fix and
    export checks) go to `benchmarks/results/peer/`, to be committed. Needs the benchmark's results in
    `<out>/benchmark` (`BENCHMARK`, run after the export stage)."""
    import string

    from tinysr_diffusers import TinySRPipeline, TSDSRPipeline

    benchmark = out / "benchmark"
    if not (benchmark / "results.json").exists():
        raise SystemExit(f"error: {benchmark / 'results.json'} is missing: run `{BENCHMARK}` first.")
    results = json.loads((benchmark / "results.json").read_text())
    sources = json.loads((out / "data" / "sources.json").read_text())
    timings = json.loads((out / "timings.json").read_text())
    export = json.loads((out / "export_check.json").read_text())
    colour = json.loads((out / "colour_fix.json").read_text())
    pruning = json.loads((out / "prune.pruning.json").read_text())
    teacher = TSDSRPipeline.from_pretrained(out / "teacher").transformer
    student = TinySRPipeline.from_pretrained(out / "export")
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in
              (("teacher", teacher), ("transformer", student.transformer), ("vae", student.vae))}
    millions = {name: f"{count / 1e6:.2f}" for name, count in counts.items()}
    train = [row for row in sources if row["split"] == "train"]
    fields = {
        "cpu": results["cpu"], "threads": results["threads"], "command": results["command"],
        "total_hours": f"{sum(timings.values()) / 3600:.1f}",
        "num_photos": len(train), "num_crops": recipe["targets"]["shards"] * recipe["targets"]["shard_size"],
        "teacher_params": millions["teacher"], "teacher_layers": teacher.config.num_layers,
        "kept_layers": ", ".join(map(str, pruning["keep_layers"])),
        "student_params": f"{(counts['transformer'] + counts['vae']) / 1e6:.2f}",
        "transformer_params": millions["transformer"], "vae_params": millions["vae"],
        "colour_fix": colour["chosen"],
        "colour_fix_scores": ", ".join(f"{name} {value:.2f} dB" for name, value in colour["psnr_y"].items()),
        "num_heldout": len(results["photos"]), "heldout": ", ".join(results["photos"]),
        "precision": export["chosen"], "export_difference": f"{export['tried'][-1]['max_abs_difference']:.1e}",
        "sources_table": mini.sources_table(train),
        **results_sections((benchmark / "results.md").read_text()),
    }
    card = string.Template((ROOT / "model_cards" / "default_model.md").read_text()).substitute(fields)
    mini.install_default_model(out / "export", card)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for source in (benchmark / "results.json", benchmark / "results.md", out / "timings.json",
                   out / "export_check.json", out / "colour_fix.json", out / "data" / "sources.json",
                   out / "prune.pruning.json", out / "prune.keep_probabilities.png", *out.glob("*.loss.png")):
        shutil.copy(source, RESULTS / source.name)
    (folder / "shipped.json").write_text(json.dumps({"to": str(mini.PACKAGE_MODEL)}) + "\n")


STAGES = {
    "data": lambda recipe, folder, out: stage_data(recipe, folder),
    "taef2": mini.STAGES["taef2"],
    "targets": stage_targets,
    "teacher_init": stage_teacher_init,
    "latents": stage_latents,
    "teacher": stage_teacher,
    "student_vae_init": stage_student_vae_init,
    "vae_encoder": stage_vae_encoder,
    "vae_decoder": stage_vae_decoder,
    "prune": stage_prune,
    "latent": stage_latent,
    "pixel": stage_pixel,
    "export": stage_export,
    "ship": stage_ship,
}
# They write their folder themselves (resumable inside); the rest atomically.
SELF_WRITING = ("targets", "latents", "teacher", "vae_encoder", "vae_decoder", "prune", "latent", "pixel")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.recipes.peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=None, help="Default: recipe.yaml's output_dir (runs/peer).")
    parser.add_argument("--only", nargs="+", choices=list(STAGES), help="Run only these stages (in recipe order).")
    parser.add_argument("--list", action="store_true", help="List the stages and whether each is done.")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="Cap every training stage at N steps: a quick check of the chain (not a usable model).")
    parser.add_argument("--shards", type=int, default=None, help="Target shards to make (default: recipe.yaml's).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = load_recipe()
    recipe["max_steps"] = args.max_steps
    if args.shards:
        recipe["targets"]["shards"] = args.shards
    mini.run_recipe(recipe, Path(args.output_dir or ROOT / recipe["output_dir"]).resolve(), args.only, args.list,
                    stages=STAGES, self_writing=SELF_WRITING)


if __name__ == "__main__":
    main()
