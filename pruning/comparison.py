"""Depth-pruning methods compared the way the paper's Table 2 does: the same teacher, data and keep count for every
method, then the same recovery fine-tune, then the metrics; a markdown table and its JSON record.

`compare_methods` runs the comparison on a `Setup`: `small_setup` (a 16-layer SD3 transformer trained from scratch on
scikit-image photos, minutes on a laptop CPU), `latent_setup` (a given teacher and latent pairs) or `recipe_setup`
(a run of the mini recipe). `python -m benchmarks.pruning_methods` is its command line; the mini recipe's
`pruning_table` stage calls it directly.

Per method: the decision (time, kept layers), the one-step distillation error right after pruning (before any
training: what the immediate-loss methods optimise) and, after the recovery fine-tune (LoRA as the paper's stage 1,
distillation loss of paper A.4, the same steps, data order and seed for all), distillation error and PSNR / SSIM on
the Y channel against the HR images of the held-out photos.
"""

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from peft import LoraConfig
from tqdm.auto import tqdm

from tinysr_diffusers.utils import PathLike, atomic_write_text, write_json

from .config import DEFAULT_LORA_TARGETS, MaskLearnerConfig
from .data import LatentBatch, LatentPairDataset
from .export import prune_sd3
from .losses import PruningLoss
from .masked import MaskedTransformer
from .methods import get_method
from .search_space import SearchSpace


TRAIN_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "retina", "immunohistochemistry", "stereo_motorcycle")
EVAL_PHOTOS = ("coffee", "chelsea")
UNSHUFFLE = 4
NOISE = (0.05, 0.1)  # Gaussian noise std range of the degradation
# Variants beside the registry's methods (whose learned searches compute every layer while learning): the paper
# text's bypass of pruned layers, the paper text's `next` rule, and the other mask-sampling granularity.
VARIANTS = {
    "tinysr+skip": ("tinysr", {"skip_pruned_layers": True}),
    "tinyfusion+skip": ("tinyfusion", {"skip_pruned_layers": True}),
    "tinysr+marginal": ("tinysr", {"next_rule": "marginal"}),
    "tinysr+per-sample": ("tinysr", {"per_sample_masks": True}),
    "tinyfusion+per-batch": ("tinyfusion", {"per_sample_masks": False}),
}


@dataclass
class Setup:
    """What every method is compared on: the teacher and its fixed conditioning, the training and evaluation latent
    batches, and for image metrics `decode` (latents -> images in [0, 1]) with, per evaluation batch, the input and HR
    images the metrics compare with (None: latent metrics only). `settings`: what it was built from, which an
    interrupted comparison must match to be resumed."""

    teacher: SD3Transformer2DModel
    conditioning: dict
    train: list
    evaluation: list
    description: str
    decode: Optional[Callable] = None
    references: Optional[list] = None  # per evaluation batch: (input images, HR images), each (B, 3, H, W) in [0, 1]
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ComparisonSettings:
    """What every method is compared under besides the setup, the search space and the learned methods' settings:
    the score-based methods' data (`calibration_batches`: only the first N training batches; None: all, like the
    learned methods) and random-min's draws, the recovery fine-tune (LoRA of `recovery_rank`, 0: all weights) and the
    seed of every method's run."""

    calibration_batches: Optional[int] = None
    random_candidates: int = 100
    recovery_steps: int = 300
    recovery_lr: float = 1e-4
    recovery_rank: int = 4
    seed: int = 80


# ------------------------------------------------------------------------------------------------ small setup
def _photo(name: str) -> torch.Tensor:
    from skimage import data as photos

    image = getattr(photos, name)()
    image = image[0] if isinstance(image, tuple) else image
    return torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float() / 255.0


def _crops(names, count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    images = [_photo(name) for name in names]
    crops = []
    for i in range(count):
        image = images[i % len(images)]
        top = int(torch.randint(0, image.shape[1] - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, image.shape[2] - size + 1, (1,), generator=generator))
        crops.append(image[:, top : top + size, left : left + size])
    return torch.stack(crops)


def _degrade(hr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur (sigma 0.4-1.6), x4 bicubic down, Gaussian noise (`NOISE`), x4 bicubic up: the SR input at HR size."""
    out = []
    for image in hr:
        sigma = float(torch.empty(1).uniform_(0.4, 1.6, generator=generator))
        radius = 4
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(x**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        blurred = F.conv2d(
            F.pad(image[None], (radius,) * 4, mode="reflect"),
            (kernel[:, None] * kernel[None])[None, None].expand(3, 1, -1, -1),
            groups=3,
        )
        low = F.interpolate(blurred, scale_factor=0.25, mode="bicubic", antialias=True)
        noise = float(torch.empty(1).uniform_(*NOISE, generator=generator))
        low = (low + noise * torch.randn(low.shape, generator=generator)).clamp(0, 1)
        out.append(F.interpolate(low, scale_factor=4, mode="bicubic").clamp(0, 1)[0])
    return torch.stack(out)


def to_latent(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> the lossless latent space of the small setup: [-1, 1], pixel-unshuffled by 4."""
    return F.pixel_unshuffle(images * 2 - 1, UNSHUFFLE)


def to_image(latents: torch.Tensor) -> torch.Tensor:
    return ((F.pixel_shuffle(latents, UNSHUFFLE) + 1) / 2).clamp(0, 1)


def _batches(lr: torch.Tensor, hr: torch.Tensor, batch_size: int) -> list[LatentBatch]:
    return [
        LatentBatch(lr[i : i + batch_size], hr[i : i + batch_size])
        for i in range(0, len(lr) - batch_size + 1, batch_size)
    ]


def train_small_teacher(train: list[LatentBatch], steps: int, seed: int) -> SD3Transformer2DModel:
    """A 16-layer SD3 transformer trained from scratch as a one-step SR model (z_H = z_L - v)."""
    torch.manual_seed(seed)
    teacher = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=3 * UNSHUFFLE**2,
        out_channels=3 * UNSHUFFLE**2,
        num_layers=16,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=64,
        pooled_projection_dim=32,
        pos_embed_max_size=16,
    )
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    with MaskedTransformer(teacher, pooled_projections=torch.zeros(32)) as model:
        teacher.train()
        for step in tqdm(range(steps), desc="teacher: training from scratch"):
            batch = train[step % len(train)]
            loss = F.mse_loss(model.predict_clean(batch.lr), batch.hr)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    return teacher.eval().requires_grad_(False)


def small_setup(
    *, seed: int, batch_size: int, train_crops: int, eval_crops: int, crop_size: int, teacher_steps: int
) -> Setup:
    """Crops of scikit-image photos, degraded (blur, x4 bicubic down, strong noise, x4 bicubic up) and mapped to a
    lossless "latent" space (pixel-unshuffle by 4, so image PSNR/SSIM are exact); the teacher is trained from scratch
    on the held-in photos, two photos are held out for evaluation."""
    settings = dict(seed=seed, batch_size=batch_size, train_crops=train_crops, eval_crops=eval_crops,
                    crop_size=crop_size, teacher_steps=teacher_steps)
    generator = torch.Generator().manual_seed(seed)
    hr_train = _crops(TRAIN_PHOTOS, train_crops, crop_size, generator)
    hr_eval = _crops(EVAL_PHOTOS, eval_crops, crop_size, generator)
    train = _batches(to_latent(_degrade(hr_train, generator)), to_latent(hr_train), batch_size)
    evaluation = _batches(to_latent(_degrade(hr_eval, generator)), to_latent(hr_eval), batch_size)
    teacher = train_small_teacher(train, teacher_steps, seed)
    description = (
        f"Small CPU setup: {train_crops} training / {eval_crops} evaluation crops of {crop_size} px from "
        f"scikit-image photos (train {', '.join(TRAIN_PHOTOS)}; held out {', '.join(EVAL_PHOTOS)}), blur + x4 bicubic "
        f"down + Gaussian noise ({NOISE[0]:g}-{NOISE[1]:g}) + x4 up, pixel-unshuffle-by-4 latents; teacher: 16-layer "
        f"SD3 transformer (dim 64) trained {teacher_steps} steps from scratch."
    )
    references = [(to_image(b.lr), to_image(b.hr)) for b in evaluation]  # the latents are lossless
    return Setup(teacher, {"pooled_projections": torch.zeros(32)}, train, evaluation, description, to_image,
                 references, settings)


def latent_setup(
    teacher: PathLike,
    data: PathLike,
    *,
    batch_size: int,
    subfolder: Optional[str] = None,
    eval_data: Optional[PathLike] = None,
    prompt_embeds: Optional[str] = None,
    pooled_projections: Optional[str] = None,
    train_batches: Optional[int] = None,
) -> Setup:
    """A saved SD3 transformer with its conditioning files, and latent pairs for training and (`eval_data`, default
    `data`) evaluation: latent metrics only."""
    from .cli import load_tensor

    settings = dict(teacher=teacher, data=data, batch_size=batch_size, subfolder=subfolder, eval_data=eval_data,
                    prompt_embeds=prompt_embeds, pooled_projections=pooled_projections, train_batches=train_batches)
    model = SD3Transformer2DModel.from_pretrained(teacher, subfolder=subfolder).eval().requires_grad_(False)
    conditioning = {
        "encoder_hidden_states": load_tensor(prompt_embeds),
        "pooled_projections": load_tensor(pooled_projections),
    }

    description = f"Teacher {teacher}; data {data}; evaluation data {eval_data or data}."
    train = read_latents(data, batch_size, train_batches)
    return Setup(model, conditioning, train, read_latents(eval_data or data, batch_size), description,
                 settings=settings)


def read_latents(path: PathLike, batch_size: int, limit: Optional[int] = None) -> list[LatentBatch]:
    """The first `limit` (default: all) full batches of a latent-pair file or folder, in its order."""
    loader = torch.utils.data.DataLoader(LatentPairDataset(path), batch_size=batch_size, drop_last=True)
    batches = []
    for batch in loader:
        if limit is not None and len(batches) == limit:
            break
        batches.append(LatentBatch(batch["lr_latents"], batch["hr_latents"]))
    if not batches:
        raise ValueError(f"no full batch of {batch_size} latent pairs in {path}.")
    return batches


def recipe_setup(run: PathLike, *, batch_size: int, train_batches: Optional[int], eval_crops: int,
                 crop_size: int) -> Setup:
    """
    A run folder of the mini recipe (`python -m training.recipes.mini`): its trained teacher in TAEF2's latent space
    with its prompt embeddings and t = 1000, the first `train_batches` batches of the latent cache its prune stage
    learns from, and crops of its held-out photos (HR, and the LR of the recipe's seeded degradation through the
    pipelines' own bicubic x4 and TAEF2 encoder). PSNR/SSIM compare TAEF2's decoding of each prediction with the real
    HR pixels, without colour fix.
    """
    from tinysr_diffusers import TSDSRPipeline
    from tinysr_diffusers.evaluation.scoring import load_image
    from tinysr_diffusers.image_processing import bicubic_upscale

    run = Path(run)
    settings = dict(run=run, batch_size=batch_size, train_batches=train_batches, eval_crops=eval_crops,
                    crop_size=crop_size)
    for needed in ("teacher", "latents", "data/heldout/hr", "data/heldout/lr"):
        if not (run / needed).exists():
            raise FileNotFoundError(f"{run / needed} is missing: run `python -m training.recipes.mini` first.")
    pipe = TSDSRPipeline.from_pretrained(run / "teacher")
    teacher = pipe.transformer.eval().requires_grad_(False)
    prompt_embeds, pooled = (t.detach() for t in pipe.prompt_embeddings(1))
    conditioning = {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled, "timestep": pipe.timestep}
    train = read_latents(run / "latents", batch_size, train_batches)

    files = sorted((run / "data" / "heldout" / "hr").glob("*.png"))
    if not files:
        raise FileNotFoundError(f"no held-out photos in {run / 'data' / 'heldout' / 'hr'}.")
    per_photo = -(-eval_crops // len(files))
    lr_crops, hr_crops = [], []
    for file in files:
        hr = load_image(file)[0]
        lr = bicubic_upscale(load_image(run / "data" / "heldout" / "lr" / file.name), 4)[0]
        grid = [(top, left) for top in range(0, hr.shape[1] - crop_size + 1, crop_size)
                for left in range(0, hr.shape[2] - crop_size + 1, crop_size)]
        for index in np.linspace(0, len(grid) - 1, min(per_photo, len(grid))).round().astype(int):
            top, left = grid[index]
            hr_crops.append(hr[:, top : top + crop_size, left : left + crop_size])
            lr_crops.append(lr[:, top : top + crop_size, left : left + crop_size])
    evaluation, references = [], []
    with torch.no_grad():
        for i in range(0, len(hr_crops), batch_size):
            lr, hr = torch.stack(lr_crops[i : i + batch_size]), torch.stack(hr_crops[i : i + batch_size])
            evaluation.append(LatentBatch(pipe.encode_latents(lr * 2 - 1, sample_posterior=False),
                                          pipe.encode_latents(hr * 2 - 1, sample_posterior=False)))
            references.append((lr, hr))

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return ((pipe.decode_latents(latents) + 1) / 2).clamp(0, 1)

    layers = teacher.config.num_layers
    description = (
        f"Mini recipe run `{run}`: its {layers}-layer SD3 teacher (width {teacher.inner_dim}) in TAEF2's latent space; "
        f"the first {len(train)} batches of {batch_size} of its latent cache (degraded 256-px crops of the "
        f"training photos); evaluation on {len(hr_crops)} crops of {crop_size} px (at most {per_photo} per photo) "
        f"of the {len(files)} held-out photos ({', '.join(f.stem for f in files)}), PSNR-Y/SSIM-Y of TAEF2's decoding "
        "against the real HR pixels (no colour fix); 'Degraded input' is the bicubic x4 of the LR photo."
    )
    return Setup(teacher, conditioning, train, evaluation, description, decode, references, settings)


# -------------------------------------------------------------------------------------------------- evaluation
def _y_channel(images: torch.Tensor) -> np.ndarray:
    r, g, b = images.unbind(1)
    return ((65.481 * r + 128.553 * g + 24.966 * b + 16.0) / 255.0).numpy()


@torch.no_grad()
def evaluate(model: MaskedTransformer, setup: Setup, teacher_outputs) -> dict[str, float]:
    distill, images = [], []
    for batch, target in zip(setup.evaluation, teacher_outputs):
        prediction = model.predict_clean(batch.lr)
        distill.append(F.mse_loss(prediction, target).item())
        if setup.decode is not None:
            images.append(setup.decode(prediction))
    metrics = {"distill_mse": float(np.mean(distill))}
    if setup.decode is not None:
        metrics.update(image_metrics(images, [hr for _, hr in setup.references]))
    return metrics


def image_metrics(predictions: list[torch.Tensor], references: list[torch.Tensor]) -> dict[str, float]:
    """Mean PSNR / SSIM on the Y channel of batches of images in [0, 1] against their references."""
    from skimage.metrics import structural_similarity

    pairs = [(a, b) for x, y in zip(predictions, references) for a, b in zip(_y_channel(x), _y_channel(y))]
    return {
        "psnr_y": float(np.mean([10 * np.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-12)) for a, b in pairs])),
        "ssim_y": float(np.mean([structural_similarity(a, b, data_range=1.0) for a, b in pairs])),
    }


def recover(setup: Setup, keep_layers: list[int], teacher_train: list, settings: ComparisonSettings):
    """
    The same recovery for every method: the pruned model fine-tuned on the distillation loss (paper A.4), with LoRA
    of rank `settings.recovery_rank` as the paper's stage 1 (0: all weights).
    """
    torch.manual_seed(settings.seed)
    student = prune_sd3(setup.teacher, keep_layers).train()
    if settings.recovery_rank:
        student.requires_grad_(False)
        rank = settings.recovery_rank
        student.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(DEFAULT_LORA_TARGETS)))
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.recovery_lr, weight_decay=0.0)
    loss_fn = PruningLoss("mse", task_weight=0.0, distill_weight=1.0)
    train = setup.train
    with MaskedTransformer(student, **setup.conditioning) as model:
        for step in tqdm(range(settings.recovery_steps), desc="recovery fine-tune", leave=False):
            i = step % len(train)
            loss, _ = loss_fn(model.predict_clean(train[i].lr), train[i].hr, teacher_train[i])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return student.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------- the run
def learner_settings(config: MaskLearnerConfig, *, block_size: int, seed: int) -> dict:
    """The learned methods' settings from a mask search's config (e.g. a training prune stage's, its
    `TrainConfig.mask_learner_config()`), with the comparison's block size and seed; the keep count, search and
    run bookkeeping are the comparison's own."""
    settings = dataclasses.asdict(config)
    for name in ("keep", "search", "output_dir", "report_to", "checkpointing_steps", "checkpoints_total_limit"):
        settings.pop(name, None)
    settings.update(block_size=block_size, seed=seed)
    return settings


def reproducing_command(module: str, argv: Sequence[str]) -> str:
    """`python -m module argv...`, with the OMP_NUM_THREADS it ran under when set: the decision times depend on it."""
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return f"{threads}python -m {module} " + " ".join(argv)


def compare_methods(
    setup: Setup,
    space: SearchSpace,
    *,
    methods: Sequence[str],
    learned: dict,
    output: PathLike,
    command: str,
    settings: ComparisonSettings = ComparisonSettings(),
    learned_from: Optional[str] = None,
) -> str:
    """
    Every method of `methods` (names of `pruning.methods.METHODS` or `VARIANTS`) keeps `space.num_keep` of the
    teacher's layers and is recovered and scored the same way. `learned`: the learned methods' `MaskLearnerConfig`
    settings but `keep` and `search` (e.g. `learner_settings(...)`), read from `learned_from` (named in the report;
    None: their defaults are the paper's and TinyFusion's).

    Writes the markdown table (with `command`, the command that made it) to `output` and its record to `output` with
    a `.json` suffix, and returns the table. Finished methods are kept in `output` with a `.partial.json` suffix until
    the table is written: a rerun with the same setup and settings resumes after them.
    """
    teacher, conditioning, train = setup.teacher, setup.conditioning, setup.train
    num_layers = teacher.config.num_layers
    if space.num_layers != num_layers:
        raise ValueError(f"The search space has {space.num_layers} layers but the teacher {num_layers}.")
    keep = space.num_keep
    MaskLearnerConfig.from_dict({"keep": keep, **learned})  # invalid settings stop before any method runs
    calibration = train[: settings.calibration_batches]

    with torch.no_grad(), MaskedTransformer(teacher, **conditioning) as model:
        teacher_train = [model.predict_clean(b.lr) for b in train]
        teacher_eval = [model.predict_clean(b.lr) for b in setup.evaluation]
        teacher_metrics = evaluate(model, setup, teacher_eval)
    if setup.decode is not None:
        teacher_metrics["input"] = image_metrics(*zip(*setup.references))

    output = Path(output)
    partial = output.with_suffix(".partial.json")
    sizes = dict(num_layers=num_layers, keep=keep, block_size=space.block_size, batch_size=len(train[0].lr),
                 num_train_batches=len(train), eval_samples=sum(len(batch.lr) for batch in setup.evaluation))
    # The teacher's scores fingerprint the teacher and the evaluation data, which the settings only name; as JSON
    # gives it back from the partial record.
    fingerprint = json.loads(json.dumps({"setup": setup.settings, **dataclasses.asdict(settings), **sizes,
                                         "learned": learned, "teacher_metrics": teacher_metrics}, default=str))
    rows = finished_rows(partial, fingerprint)
    for name in methods:
        if any(row["method"] == name for row in rows):
            print(f"{name}: done in an earlier run ({partial}), kept.", flush=True)
            continue
        base, extra = VARIANTS.get(name, (name, {}))
        options = {
            "tinysr": learned,
            "tinyfusion": learned,
            "random-min": {"num_candidates": settings.random_candidates, "seed": settings.seed},
        }.get(base, {})
        method = get_method(base, **{**options, **extra})
        torch.manual_seed(settings.seed)
        start = time.perf_counter()
        with MaskedTransformer(teacher, **conditioning) as model:
            decision = method.decide(model, calibration if base not in ("tinysr", "tinyfusion") else train, keep)
            seconds = time.perf_counter() - start
        with MaskedTransformer(prune_sd3(teacher, decision.keep_layers), **conditioning) as pruned:
            before = evaluate(pruned, setup, teacher_eval)
        student = recover(setup, decision.keep_layers, teacher_train, settings)
        with MaskedTransformer(student, **conditioning) as recovered:
            after = evaluate(recovered, setup, teacher_eval)
        rows.append(
            {"method": name, "keep_layers": decision.keep_layers, "seconds": seconds, "before": before, "after": after}
        )
        write_json(partial, {"settings": fingerprint, "rows": rows})
        print(json.dumps(rows[-1]), flush=True)

    order = list(methods)
    rows = sorted((row for row in rows if row["method"] in order), key=lambda row: order.index(row["method"]))
    text = markdown(rows, teacher_metrics, description=setup.description, space=space, settings=settings,
                    learned=learned, learned_from=learned_from, sizes=sizes, command=command)
    atomic_write_text(output, text)
    write_json(output.with_suffix(".json"), {"command": command, "teacher": teacher_metrics, "rows": rows})
    partial.unlink(missing_ok=True)
    return text


def finished_rows(partial: Path, settings: dict) -> list[dict]:
    """The rows an interrupted run with the same `settings` (as read back from JSON) finished (each method's run is
    seeded, so they are what this run would compute); none if the settings differ."""
    if not partial.exists():
        return []
    record = json.loads(partial.read_text())
    if record.get("settings") != settings:
        print(f"{partial}: an earlier run with other settings; starting afresh.", flush=True)
        return []
    return record["rows"]


# ---------------------------------------------------------------------------------------------------- report
def markdown(
    rows: list[dict],
    teacher_metrics: dict,
    *,
    description: str,
    space: SearchSpace,
    settings: ComparisonSettings,
    learned: dict,
    learned_from: Optional[str],
    sizes: dict,
    command: str,
) -> str:
    has_images = "psnr_y" in teacher_metrics
    header = ["Method", "Kept layers", "Decision (s)", "Distill MSE after pruning", "Distill MSE after recovery"]
    if has_images:
        header += ["PSNR-Y before", "PSNR-Y after", "SSIM-Y after"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    teacher_row = ["Teacher (unpruned)", f"all {sizes['num_layers']}", "-", "0", "0"]
    if has_images:
        teacher_row += [
            f"{teacher_metrics['psnr_y']:.2f}",
            f"{teacher_metrics['psnr_y']:.2f}",
            f"{teacher_metrics['ssim_y']:.4f}",
        ]
    lines.append("| " + " | ".join(teacher_row) + " |")
    if "input" in teacher_metrics:
        bicubic = teacher_metrics["input"]
        lines.append(
            f"| Degraded input (bicubic x4) | - | - | - | - | - | {bicubic['psnr_y']:.2f} | {bicubic['ssim_y']:.4f} |"
        )
    for row in rows:
        cells = [
            row["method"],
            " ".join(map(str, row["keep_layers"])),
            f"{row['seconds']:.1f}",
            f"{row['before']['distill_mse']:.5f}",
            f"{row['after']['distill_mse']:.5f}",
        ]
        if has_images:
            cells += [
                f"{row['before']['psnr_y']:.2f}",
                f"{row['after']['psnr_y']:.2f}",
                f"{row['after']['ssim_y']:.4f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    recovery = f"LoRA rank {settings.recovery_rank}" if settings.recovery_rank else "full fine-tuning"
    learner_source = f"from {learned_from}" if learned_from else "the paper's and TinyFusion's"
    return "\n".join(
        [
            "# Depth-pruning methods compared (Table 2 protocol)",
            "",
            f"Command: `{command}`",
            "",
            f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()} {platform.processor() or ''} "
            f"({torch.get_num_threads()} threads), torch {torch.__version__}, diffusers {diffusers.__version__}.",
            "",
            description,
            "",
            f"The same for every method: the teacher, keep {space.num_keep} of {sizes['num_layers']} layers, "
            f"{data_budget(sizes, settings)}, and the recovery ({settings.recovery_steps} steps of {recovery}, AdamW "
            f"lr {settings.recovery_lr}, distillation MSE (paper A.4), identical data order and seed). The score-based "
            f"methods evaluate on that data (random-min draws {settings.random_candidates} masks); the learned methods "
            f"search {learned['max_steps']} steps over it (LoRA rank {learned['lora_rank']}, EMA "
            f"{learned['ema_decay']}, other settings {learner_source}). "
            f"Metrics on {sizes['eval_samples']} "
            f"held-out samples. Search space: {space.summary()}",
            "",
            *lines,
            "",
            *(
                [
                    f"The teacher gains {teacher_metrics['psnr_y'] - teacher_metrics['input']['psnr_y']:+.2f} dB "
                    "PSNR-Y over its degraded input: the gap that pruning puts at risk and recovery must keep.",
                    "",
                ]
                if "input" in teacher_metrics
                else []
            ),
            "The learned methods compute every layer while the masks learn (the default). `+skip`: the paper text's "
            "bypass of the layers a sampled mask prunes (their masks then get no gradient). `+marginal`: "
            "Expansion-Corrosion's `next` by the paper text's marginal rule instead of the authors' pattern rule. "
            "`+per-sample` / `+per-batch`: one mask per sample or per batch (default: per sample for tinyfusion, "
            "per batch for tinysr).",
            "",
        ]
    )


def data_budget(sizes: dict, settings: ComparisonSettings) -> str:
    """What the decisions see: the same batches for every method unless `calibration_batches` cuts the score-based
    methods' share."""
    everything = f"the same {sizes['num_train_batches']} training batches of {sizes['batch_size']}"
    if settings.calibration_batches is None or settings.calibration_batches >= sizes["num_train_batches"]:
        return everything
    return (f"{everything} for the learned methods but only the first {settings.calibration_batches} of them for the "
            f"score-based ones (--calibration-batches)")
