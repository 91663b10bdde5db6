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

This is the command line of `pruning.comparison`, which the mini recipe's `pruning_table` stage calls directly.
"""

import argparse
import dataclasses
import sys

from pruning.comparison import (
    VARIANTS,
    ComparisonSettings,
    Setup,
    compare_methods,
    latent_setup,
    learner_settings,
    recipe_setup,
    reproducing_command,
    small_setup,
)
from pruning.config import MaskLearnerConfig
from pruning.methods import METHODS
from pruning.search_space import SearchSpace


DEFAULTS = ComparisonSettings()


def build_setup(args: argparse.Namespace) -> Setup:
    """The setup that --small, --recipe-run or --teacher/--data asks for."""
    if args.small:
        return small_setup(seed=args.seed, batch_size=args.batch_size, train_crops=args.train_crops,
                           eval_crops=args.eval_crops, crop_size=args.crop_size, teacher_steps=args.teacher_steps)
    if args.recipe_run:
        return recipe_setup(args.recipe_run, batch_size=args.batch_size, train_batches=args.train_batches,
                            eval_crops=args.eval_crops, crop_size=args.crop_size)
    return latent_setup(args.teacher, args.data, batch_size=args.batch_size, subfolder=args.subfolder,
                        eval_data=args.eval_data, prompt_embeds=args.prompt_embeds,
                        pooled_projections=args.pooled_projections, train_batches=args.train_batches)


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
    parser.add_argument("--random-candidates", type=int, default=DEFAULTS.random_candidates)
    parser.add_argument("--recovery-steps", type=int, default=DEFAULTS.recovery_steps)
    parser.add_argument("--recovery-lr", type=float, default=DEFAULTS.recovery_lr)
    parser.add_argument("--recovery-rank", type=int, default=DEFAULTS.recovery_rank,
                        help="LoRA rank of the recovery (0: all weights).")
    parser.add_argument("--teacher-steps", type=int, default=2000)
    parser.add_argument("--train-crops", type=int, default=1024)
    parser.add_argument("--eval-crops", type=int, default=256)
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
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


def prune_stage_search(path: str, keep: int) -> MaskLearnerConfig:
    """The mask search of a prune-stage YAML of `training/distill.py` (the MaskLearnerConfig that stage builds)."""
    from training.config import load_config

    config = load_config(["--config", path, "teacher=unused", "latent_cache=unused", f"prune.keep={keep}"])
    return config.mask_learner_config()


def main(argv=None) -> None:
    args = parse_args(argv)
    command = reproducing_command("benchmarks.pruning_methods", sys.argv[1:] if argv is None else argv)
    try:
        setup = build_setup(args)
    except (FileNotFoundError, ValueError) as error:  # a recipe run not made yet, too little data
        raise SystemExit(f"error: {error}") from None
    num_layers = setup.teacher.config.num_layers
    keep = args.keep or num_layers // 2
    try:  # before any method runs: the learned methods need the keep count in every block
        space = SearchSpace.from_keep(num_layers, keep, args.block_size)
    except ValueError as error:
        raise SystemExit(f"error: --keep {keep}: {error}") from None
    if args.learner_config:
        learned = learner_settings(prune_stage_search(args.learner_config, keep), block_size=args.block_size,
                                   seed=args.seed)
    else:
        learned = dict(
            max_steps=args.search_steps,
            block_size=args.block_size,
            lora_rank=args.lora_rank,
            ema_decay=args.ema_decay,
            seed=args.seed,
            log_every=max(1, args.search_steps // 20),
        )  # the learned methods' MaskLearnerConfig: these settings, its defaults for the rest
    settings = ComparisonSettings(**{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(DEFAULTS)})
    print(compare_methods(setup, space, methods=args.methods.split(","), learned=learned, output=args.output,
                          command=command, settings=settings, learned_from=args.learner_config))


if __name__ == "__main__":
    main()
