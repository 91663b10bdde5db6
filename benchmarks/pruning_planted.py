"""How often mask learning finds a planted answer: TinyFusion vs TinySR, each in its default setting and with one
change at a time (pruned layers skipped as the paper's text says, the other `next` rule, the other mask sampling).

A planted teacher (`pruning.testing.planted_teacher`) has exact identity layers; every other layer is the same block,
so the loss-free mask is known. Two problems on an 8-layer SD3.5-style model, keeping 4 in blocks of 4:

- static: identity layers 1, 3, 4, 6, answer 0 2 5 7 (two per block: inside TinyFusion's static space);
- inter-block: identity layers 0, 1, 3, 6, answer 2 4 5 7 (1 + 3 per block: only Dynamic Inter-block Activation,
  operator T_-1, reaches it).

For every (problem, search, setting in `SETTINGS`) the learner runs `--seeds` times (seed 0, 1, ...) with the same
short schedule; the table gives how often the decision is the answer and the mean distillation MSE of the decided masks (0 = perfect).

    python -m benchmarks.pruning_planted [--seeds 5] [--steps 120]
"""

import argparse
import sys
import time
from datetime import datetime, timezone

import diffusers
import torch
import torch.nn.functional as F

from pruning.learner import MaskLearner, MaskLearnerConfig
from pruning.masked import MaskedTransformer
from pruning.testing import planted_teacher
from tinysr_diffusers.evaluation.profiling import cpu_model
from tinysr_diffusers.utils import atomic_write_text


PROBLEMS = {"static": ([1, 3, 4, 6], [0, 2, 5, 7]), "inter-block": ([0, 1, 3, 6], [2, 4, 5, 7])}


# (search, label, MaskLearnerConfig overrides): each search's defaults first, then one change at a time.
SETTINGS = (
    ("tinyfusion", "default (computed, per-sample masks)", {}),
    ("tinyfusion", "per-batch masks", {"per_sample_masks": False}),
    ("tinyfusion", "pruned layers skipped (paper text)", {"skip_pruned_layers": True}),
    ("tinysr", "default (computed, pattern next, per-batch masks)", {}),
    ("tinysr", "marginal next (paper text)", {"next_rule": "marginal"}),
    ("tinysr", "per-sample masks", {"per_sample_masks": True}),
    ("tinysr", "pruned layers skipped (paper text)", {"skip_pruned_layers": True}),
)


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(32, 4, 8, 8, generator=generator)
    for problem, (identity, answer) in PROBLEMS.items():
        teacher = planted_teacher("sd3.5", identity)
        with torch.no_grad(), MaskedTransformer(teacher) as masked:
            targets = masked.predict_clean(latents)
        data = [(latents[i : i + 8], targets[i : i + 8], targets[i : i + 8]) for i in range(0, 32, 8)]
        for search, label, overrides in (SETTINGS[i] for i in args.settings):
            found, losses, start = 0, [], time.perf_counter()
            for seed in range(args.seeds):
                config = MaskLearnerConfig(
                    keep=4,
                    search=search,
                    max_steps=args.steps,
                    lora_rank=4,
                    learning_rate=1e-4,
                    gate_learning_rate=1e-3,
                    ema_decay=0.95,
                    log_every=args.steps,
                    seed=seed,
                    **overrides,
                )
                decision = MaskLearner(teacher, config).train(data)
                found += decision.keep_layers == answer
                with torch.no_grad(), MaskedTransformer(teacher) as masked:
                    losses.append(F.mse_loss(masked.predict_clean(latents, decision.mask), targets).item())
            rows.append(
                {
                    "problem": problem,
                    "search": search,
                    "setting": label,
                    "found": found,
                    "runs": args.seeds,
                    "mean_mse": sum(losses) / len(losses),
                    "seconds_per_run": (time.perf_counter() - start) / args.seeds,
                }
            )
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--settings", type=lambda text: [int(i) for i in text.split(",")],
                        default=list(range(len(SETTINGS))),
                        help=f"Comma-separated indices into SETTINGS (default: all): "
                        f"{', '.join(f'{i}={search} {label}' for i, (search, label, _) in enumerate(SETTINGS))}.")
    parser.add_argument("--output", default="benchmarks/results/pruning_planted.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    command = "python -m benchmarks.pruning_planted " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = run(args)
    lines = [
        "# Mask learning on planted problems",
        "",
        f"Command: `{command}`",
        "",
        f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {cpu_model()} (1 thread), torch "
        f"{torch.__version__}, diffusers {diffusers.__version__}. {args.steps} steps per run, batch 8, LoRA rank 4, lr "
        "1e-4 (gates 1e-3), tau 4 -> 0.1, scale 100, EMA 0.95; answers: static 0 2 5 7, inter-block 2 4 5 7.",
        "",
        "| Problem | Search | Setting | Found the answer | Mean MSE of the decided mask | CPU s per run |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['problem']} | {r['search']} | {r['setting']} | {r['found']}/{r['runs']} | {r['mean_mse']:.4f} | "
            f"{r['seconds_per_run']:.1f} |"
            for r in rows
        ],
        "",
    ]
    atomic_write_text(args.output, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
