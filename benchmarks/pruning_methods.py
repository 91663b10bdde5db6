"""Depth-pruning methods compared the way the paper's Table 2 does: same teacher, data and keep count for every method,
then the same recovery fine-tune, then the metrics.

Given a teacher and latent data:

    python -m benchmarks.pruning_methods --teacher PATH --data LATENTS --eval-data LATENTS --keep 12 \
        [--prompt-embeds FILE --pooled-projections FILE] [--methods shortgpt,tinysr,...]

The small configuration that runs on a laptop CPU in minutes (`--small`) builds everything from real photos: crops of
scikit-image photographs, degraded (blur, x4 bicubic down, strong noise, x4 bicubic up), mapped to a lossless "latent" space
(pixel-unshuffle by 4: 48 channels at 1/4 resolution, so image PSNR/SSIM can be measured exactly); a 16-layer SD3
transformer is first trained from scratch as the SR teacher on held-in photos, then pruned to 8 layers by every
method and recovered; two photos are held out for evaluation.

Per method: the decision (time, kept layers), the one-step distillation error right after pruning (before any
training: what the immediate-loss methods optimise) and, after the recovery fine-tune (LoRA as the paper's stage 1,
distillation loss of paper A.4, the same steps, data order and seed for all), distillation error and PSNR / SSIM on the Y channel
against the HR images of the held-out photos. The markdown, with the command that made it, goes to `--output`.
"""

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from peft import LoraConfig
from skimage import data as photos
from skimage.metrics import structural_similarity
from tqdm.auto import tqdm

from pruning.data import LatentBatch, LatentPairDataset
from pruning.export import prune_sd3
from pruning.config import DEFAULT_LORA_TARGETS, MaskLearnerConfig
from pruning.losses import PruningLoss
from pruning.masked import MaskedTransformer
from pruning.methods import METHODS, get_method
from pruning.search_space import SearchSpace
from tinysr_diffusers.utils import atomic_write_text, write_json


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
    images the metrics compare with (None: latent metrics only)."""

    teacher: SD3Transformer2DModel
    conditioning: dict
    train: list
    evaluation: list
    description: str
    decode: Optional[Callable] = None
    references: Optional[list] = None  # per evaluation batch: (input images, HR images), each (B, 3, H, W) in [0, 1]


# ------------------------------------------------------------------------------------------------ small setup
def _photo(name: str) -> torch.Tensor:
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


def small_setup(args: argparse.Namespace):
    generator = torch.Generator().manual_seed(args.seed)
    hr_train = _crops(TRAIN_PHOTOS, args.train_crops, args.crop_size, generator)
    hr_eval = _crops(EVAL_PHOTOS, args.eval_crops, args.crop_size, generator)
    train = _batches(to_latent(_degrade(hr_train, generator)), to_latent(hr_train), args.batch_size)
    evaluation = _batches(to_latent(_degrade(hr_eval, generator)), to_latent(hr_eval), args.batch_size)
    teacher = train_small_teacher(train, args.teacher_steps, args.seed)
    description = (
        f"Small CPU setup: {args.train_crops} training / {args.eval_crops} evaluation crops of {args.crop_size} px from "
        f"scikit-image photos (train {', '.join(TRAIN_PHOTOS)}; held out {', '.join(EVAL_PHOTOS)}), blur + x4 bicubic "
        f"down + Gaussian noise ({NOISE[0]:g}-{NOISE[1]:g}) + x4 up, pixel-unshuffle-by-4 latents; teacher: 16-layer SD3 transformer (dim 64) trained "
        f"{args.teacher_steps} steps from scratch."
    )
    references = [(to_image(b.lr), to_image(b.hr)) for b in evaluation]  # the latents are lossless
    return Setup(teacher, {"pooled_projections": torch.zeros(32)}, train, evaluation, description, to_image, references)


def given_setup(args: argparse.Namespace):
    from pruning.cli import load_tensor

    teacher = (
        SD3Transformer2DModel.from_pretrained(args.teacher, subfolder=args.subfolder).eval().requires_grad_(False)
    )
    conditioning = {
        "encoder_hidden_states": load_tensor(args.prompt_embeds),
        "pooled_projections": load_tensor(args.pooled_projections),
    }

    description = f"Teacher {args.teacher}; data {args.data}; evaluation data {args.eval_data or args.data}."
    train = read_latents(args.data, args.batch_size, args.train_batches)
    return Setup(teacher, conditioning, train, read_latents(args.eval_data or args.data, args.batch_size), description)


def read_latents(path, batch_size: int, limit: Optional[int] = None) -> list[LatentBatch]:
    """The first `limit` (default: all) full batches of a latent-pair file or folder, in its order."""
    loader = torch.utils.data.DataLoader(LatentPairDataset(path), batch_size=batch_size, drop_last=True)
    batches = []
    for batch in loader:
        if limit is not None and len(batches) == limit:
            break
        batches.append(LatentBatch(batch["lr_latents"], batch["hr_latents"]))
    return batches


def recipe_setup(args: argparse.Namespace) -> Setup:
    """
    A run folder of the mini recipe (`python -m training.recipes.mini`): its trained teacher in TAEF2's latent space
    with its prompt embeddings and t = 1000, the first `--train-batches` batches of the latent cache its prune stage
    learns from, and crops of its held-out photos (HR, and the LR of the recipe's seeded degradation through the
    pipelines' own bicubic x4 and TAEF2 encoder). PSNR/SSIM compare TAEF2's decoding of each prediction with the real
    HR pixels, without colour fix.
    """
    from benchmarks.quality import load_image
    from tinysr_diffusers import TSDSRPipeline
    from tinysr_diffusers.image_processing import bicubic_upscale

    run = Path(args.recipe_run)
    for needed in ("teacher", "latents", "data/heldout/hr", "data/heldout/lr"):
        if not (run / needed).exists():
            raise SystemExit(f"error: {run / needed} is missing: run `python -m training.recipes.mini` first.")
    pipe = TSDSRPipeline.from_pretrained(run / "teacher")
    teacher = pipe.transformer.eval().requires_grad_(False)
    prompt_embeds, pooled = (t.detach() for t in pipe.prompt_embeddings(1))
    conditioning = {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled, "timestep": pipe.timestep}
    train = read_latents(run / "latents", args.batch_size, args.train_batches)

    files = sorted((run / "data" / "heldout" / "hr").glob("*.png"))
    if not files:
        raise SystemExit(f"error: no held-out photos in {run / 'data' / 'heldout' / 'hr'}.")
    per_photo = -(-args.eval_crops // len(files))
    lr_crops, hr_crops = [], []
    for file in files:
        hr = load_image(file)[0]
        lr = bicubic_upscale(load_image(run / "data" / "heldout" / "lr" / file.name), 4)[0]
        size = args.crop_size
        grid = [(top, left) for top in range(0, hr.shape[1] - size + 1, size)
                for left in range(0, hr.shape[2] - size + 1, size)]
        for index in np.linspace(0, len(grid) - 1, min(per_photo, len(grid))).round().astype(int):
            top, left = grid[index]
            hr_crops.append(hr[:, top : top + size, left : left + size])
            lr_crops.append(lr[:, top : top + size, left : left + size])
    evaluation, references = [], []
    with torch.no_grad():
        for i in range(0, len(hr_crops), args.batch_size):
            lr, hr = torch.stack(lr_crops[i : i + args.batch_size]), torch.stack(hr_crops[i : i + args.batch_size])
            evaluation.append(LatentBatch(pipe.encode_latents(lr * 2 - 1, sample_posterior=False),
                                          pipe.encode_latents(hr * 2 - 1, sample_posterior=False)))
            references.append((lr, hr))

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return ((pipe.decode_latents(latents) + 1) / 2).clamp(0, 1)

    layers = teacher.config.num_layers
    description = (
        f"Mini recipe run `{run}`: its {layers}-layer SD3 teacher (width {teacher.inner_dim}) in TAEF2's latent space; "
        f"the first {len(train)} batches of {args.batch_size} of its latent cache (degraded 256-px crops of the "
        f"training photos); evaluation on {len(hr_crops)} crops of {args.crop_size} px (at most {per_photo} per photo) "
        f"of the {len(files)} held-out photos ({', '.join(f.stem for f in files)}), PSNR-Y/SSIM-Y of TAEF2's decoding "
        "against the real HR pixels (no colour fix); 'Degraded input' is the bicubic x4 of the LR photo."
    )
    return Setup(teacher, conditioning, train, evaluation, description, decode, references)


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
    pairs = [(a, b) for x, y in zip(predictions, references) for a, b in zip(_y_channel(x), _y_channel(y))]
    return {
        "psnr_y": float(np.mean([10 * np.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-12)) for a, b in pairs])),
        "ssim_y": float(np.mean([structural_similarity(a, b, data_range=1.0) for a, b in pairs])),
    }


def recover(teacher, conditioning, keep_layers, train, teacher_train, args):
    """
    The same recovery for every method: the pruned model fine-tuned on the distillation loss (paper A.4), with LoRA
    of rank `args.recovery_rank` as the paper's stage 1 (0: all weights).
    """
    torch.manual_seed(args.seed)
    student = prune_sd3(teacher, keep_layers).train()
    if args.recovery_rank:
        student.requires_grad_(False)
        rank = args.recovery_rank
        student.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(DEFAULT_LORA_TARGETS)))
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.recovery_lr, weight_decay=0.0)
    steps = args.recovery_steps
    loss_fn = PruningLoss("mse", task_weight=0.0, distill_weight=1.0)
    with MaskedTransformer(student, **conditioning) as model:
        for step in tqdm(range(steps), desc="recovery fine-tune", leave=False):
            i = step % len(train)
            loss, _ = loss_fn(model.predict_clean(train[i].lr), train[i].hr, teacher_train[i])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return student.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------- report
def markdown(rows: list[dict], teacher_metrics: dict, args: argparse.Namespace, description: str, command: str) -> str:
    has_images = "psnr_y" in teacher_metrics
    header = ["Method", "Kept layers", "Decision (s)", "Distill MSE after pruning", "Distill MSE after recovery"]
    if has_images:
        header += ["PSNR-Y before", "PSNR-Y after", "SSIM-Y after"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    teacher_row = ["Teacher (unpruned)", f"all {args.num_layers}", "-", "0", "0"]
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
    recovery = f"LoRA rank {args.recovery_rank}" if args.recovery_rank else "full fine-tuning"
    learner_source = f"from {args.learner_config}" if args.learner_config else "the paper's and TinyFusion's"
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
            f"The same for every method: the teacher, keep {args.keep} of {args.num_layers} layers, "
            f"{data_budget(args)}, and the recovery ({args.recovery_steps} steps of {recovery}, AdamW lr "
            f"{args.recovery_lr}, distillation MSE (paper A.4), identical data order and seed). The score-based "
            f"methods evaluate on that data (random-min draws {args.random_candidates} masks); the learned methods "
            f"search {args.search_steps} steps over it (LoRA rank {args.lora_rank}, EMA {args.ema_decay}, other "
            f"settings {learner_source}). "
            f"Metrics on {args.eval_samples} "
            f"held-out samples. Search space: {args.space.summary()}",
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


def data_budget(args: argparse.Namespace) -> str:
    """What the decisions see: the same batches for every method unless --calibration-batches cuts the score-based
    methods' share."""
    everything = f"the same {args.num_train_batches} training batches of {args.batch_size}"
    if args.calibration_batches is None or args.calibration_batches >= args.num_train_batches:
        return everything
    return (f"{everything} for the learned methods but only the first {args.calibration_batches} of them for the "
            f"score-based ones (--calibration-batches)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="Build the small CPU setup from scikit-image photos.")
    parser.add_argument("--recipe-run", help="A run folder of `python -m training.recipes.mini` (its teacher, latent "
                        "cache and held-out photos; not with --small).")
    parser.add_argument("--teacher", help="SD3 transformer folder (not with --small).")
    parser.add_argument("--subfolder", default=None)
    parser.add_argument("--data", help="Latent pairs for calibration, search and recovery (not with --small).")
    parser.add_argument("--eval-data", help="Held-out latent pairs (default: --data).")
    parser.add_argument("--prompt-embeds")
    parser.add_argument("--pooled-projections")
    parser.add_argument("--keep", type=int, default=None, help="Layers to keep (default: half).")
    parser.add_argument("--block-size", type=int, default=4)
    all_methods = list(METHODS) + list(VARIANTS)
    parser.add_argument("--methods", default=",".join(all_methods), help=f"Comma-separated, from {all_methods}.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--calibration-batches", type=int, default=None,
                        help="Score-based methods see only the first N training batches (default: all, like the "
                        "learned methods).")
    parser.add_argument("--train-batches", type=int, default=None,
                        help="Use only the first N batches of --data / the recipe's cache (default: all).")
    parser.add_argument("--learner-config", help="A training/distill.py prune-stage YAML: its `prune` section and "
                        "LoRA settings for the learned methods (then --search-steps, --lora-rank and --ema-decay come "
                        "from it).")
    parser.add_argument("--search-steps", type=int, default=400)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--random-candidates", type=int, default=100)
    parser.add_argument("--recovery-steps", type=int, default=300)
    parser.add_argument("--recovery-lr", type=float, default=1e-4)
    parser.add_argument("--recovery-rank", type=int, default=4, help="LoRA rank of the recovery (0: all weights).")
    parser.add_argument("--teacher-steps", type=int, default=2000)
    parser.add_argument("--train-crops", type=int, default=1024)
    parser.add_argument("--eval-crops", type=int, default=256)
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=80)
    parser.add_argument("--output", default="benchmarks/results/pruning_methods.md",
                        help="The markdown table; its .json record beside it; finished rows are kept in "
                        ".partial.json beside it until the table is written, and a rerun with the same settings "
                        "resumes after them.")
    args = parser.parse_args(argv)
    if [bool(args.small), bool(args.recipe_run), bool(args.teacher or args.data)].count(True) != 1:
        parser.error("give one of --small, --recipe-run, or --teacher and --data")
    unknown = [m for m in args.methods.split(",") if m not in all_methods]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {all_methods}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = f"{threads}python -m benchmarks.pruning_methods " + " ".join(sys.argv[1:] if argv is None else argv)
    setup = (small_setup if args.small else recipe_setup if args.recipe_run else given_setup)(args)
    teacher, conditioning, train = setup.teacher, setup.conditioning, setup.train
    if not train:
        raise SystemExit(f"error: no full training batch of {args.batch_size} in the data.")
    args.num_layers = teacher.config.num_layers
    args.keep = args.keep or args.num_layers // 2
    args.eval_samples = sum(len(batch.lr) for batch in setup.evaluation)
    try:  # before any method runs: the learned methods need the keep count in every block
        args.space = SearchSpace.from_keep(args.num_layers, args.keep, args.block_size)
    except ValueError as error:
        raise SystemExit(f"error: --keep {args.keep}: {error}") from None
    args.num_train_batches = len(train)
    calibration = train[: args.calibration_batches]

    with torch.no_grad(), MaskedTransformer(teacher, **conditioning) as model:
        teacher_train = [model.predict_clean(b.lr) for b in train]
        teacher_eval = [model.predict_clean(b.lr) for b in setup.evaluation]
        teacher_metrics = evaluate(model, setup, teacher_eval)
    if setup.decode is not None:
        teacher_metrics["input"] = image_metrics(*zip(*setup.references))

    if args.learner_config:
        learned = learner_settings(args)
    else:
        learned = dict(
            max_steps=args.search_steps,
            block_size=args.block_size,
            lora_rank=args.lora_rank,
            ema_decay=args.ema_decay,
            seed=args.seed,
            log_every=max(1, args.search_steps // 20),
        )  # the learned methods' MaskLearnerConfig: these settings, its defaults for the rest
    MaskLearnerConfig.from_dict({"keep": args.keep, **learned})  # invalid settings stop before any method runs
    partial = Path(args.output).with_suffix(".partial.json")
    settings = {key: value for key, value in sorted(vars(args).items()) if key not in ("output", "methods", "space")}
    # The teacher's scores fingerprint the teacher and the evaluation data, which the command line only names.
    settings.update(learned=learned, teacher_metrics=teacher_metrics)
    rows = finished_rows(partial, settings)
    for name in args.methods.split(","):
        if any(row["method"] == name for row in rows):
            print(f"{name}: done in an earlier run ({partial}), kept.", flush=True)
            continue
        base, extra = VARIANTS.get(name, (name, {}))
        options = {
            "tinysr": learned,
            "tinyfusion": learned,
            "random-min": {"num_candidates": args.random_candidates, "seed": args.seed},
        }.get(base, {})
        method = get_method(base, **{**options, **extra})
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        with MaskedTransformer(teacher, **conditioning) as model:
            decision = method.decide(model, calibration if base not in ("tinysr", "tinyfusion") else train, args.keep)
            seconds = time.perf_counter() - start
        with MaskedTransformer(prune_sd3(teacher, decision.keep_layers), **conditioning) as pruned:
            before = evaluate(pruned, setup, teacher_eval)
        student = recover(teacher, conditioning, decision.keep_layers, train, teacher_train, args)
        with MaskedTransformer(student, **conditioning) as recovered:
            after = evaluate(recovered, setup, teacher_eval)
        rows.append(
            {"method": name, "keep_layers": decision.keep_layers, "seconds": seconds, "before": before, "after": after}
        )
        write_json(partial, {"settings": settings, "rows": rows})
        print(json.dumps(rows[-1]), flush=True)

    order = args.methods.split(",")
    rows = sorted((row for row in rows if row["method"] in order), key=lambda row: order.index(row["method"]))
    text = markdown(rows, teacher_metrics, args, setup.description, command)
    atomic_write_text(args.output, text)
    write_json(Path(args.output).with_suffix(".json"), {"command": command, "teacher": teacher_metrics, "rows": rows})
    partial.unlink(missing_ok=True)
    print(text)


def finished_rows(partial: Path, settings: dict) -> list[dict]:
    """The rows an interrupted run with the same settings finished (each method's run is seeded, so they are what
    this run would compute); none if the settings differ."""
    if not partial.exists():
        return []
    record = json.loads(partial.read_text())
    if record.get("settings") != json.loads(json.dumps(settings, default=str)):
        print(f"{partial}: an earlier run with other settings; starting afresh.", flush=True)
        return []
    return record["rows"]


def learner_settings(args: argparse.Namespace) -> dict:
    """The learned methods' settings from a prune-stage YAML of `training/distill.py` (the same MaskLearnerConfig
    that stage builds), with this benchmark's keep count, block size and seed."""
    from training.config import load_config

    config = load_config(["--config", args.learner_config, "teacher=unused", "latent_cache=unused",
                          f"prune.keep={args.keep}"])
    settings = dataclasses.asdict(config.mask_learner_config())
    for name in ("keep", "search", "output_dir", "report_to", "checkpointing_steps", "checkpoints_total_limit"):
        settings.pop(name, None)
    settings.update(block_size=args.block_size, seed=args.seed)
    args.search_steps, args.lora_rank = settings["max_steps"], settings["lora_rank"]
    args.ema_decay = settings["ema_decay"]
    return settings


if __name__ == "__main__":
    main()
