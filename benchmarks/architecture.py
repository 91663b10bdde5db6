"""Parameters and MACs of the paper's architectures at 512x512 output, counted from their configs alone.

    python -m benchmarks.architecture [--output-dir benchmarks/results]

Everything is built on the meta device (no weights, no memory). "Module MACs" counts Linear and Conv modules only,
as the paper does (attention score/value matmuls and biases excluded); "FLOPs" counts every operation, attention
included (2 FLOPs per multiply-add). The paper's figures are printed beside ours with the relative difference.
"""

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from tinysr_diffusers.evaluation.profiling import count_parameters, module_macs, total_flops
from tinysr_diffusers.evaluation.reference_configs import (
    TINYSR_KEEP_LAYERS,
    TSDSR_PROMPT_TOKENS,
    sd3_medium_transformer,
    sd3_vae,
    tinysr_transformer,
    tinysr_vae,
)
from tinysr_diffusers.utils import atomic_write_text


OUTPUT_SIZE = 512
LATENT_SIZE = OUTPUT_SIZE // 8


@dataclass
class Row:
    name: str
    params: Optional[int]
    macs: Optional[int]
    flops: Optional[int]
    paper_params_m: Optional[float]
    paper_macs_g: Optional[float]
    note: str = ""


def _measure(model_fn: Callable[[], object], model: torch.nn.Module) -> tuple[int, int]:
    return module_macs(model_fn, model), total_flops(model_fn)


def measure() -> list[Row]:
    """Count every row of the comparison (meta device)."""
    teacher = sd3_medium_transformer()
    config = teacher.config
    latents = torch.empty(1, config.in_channels, LATENT_SIZE, LATENT_SIZE, device="meta")
    image = torch.empty(1, 3, OUTPUT_SIZE, OUTPUT_SIZE, device="meta")
    text = torch.empty(1, TSDSR_PROMPT_TOKENS, config.joint_attention_dim, device="meta")
    pooled = torch.empty(1, config.pooled_projection_dim, device="meta")
    timestep = torch.full((1,), 1000.0, device="meta")

    def teacher_call(skip_layers=None):
        return lambda: teacher(latents, text, pooled, timestep, skip_layers=skip_layers)

    teacher_macs, teacher_flops = _measure(teacher_call(), teacher)

    vae = sd3_vae()
    vae_fn = lambda: vae.decode(vae.encode(image).latent_dist.mode()).sample  # noqa: E731
    vae_macs, vae_flops = _measure(vae_fn, vae)

    def tiny_vae_counts(**conv_types):
        tiny = tinysr_vae(**conv_types)
        fn = lambda: tiny.decode(tiny.encode(image).latents).sample  # noqa: E731
        return count_parameters(tiny), *_measure(fn, tiny)

    tiny_std_params, tiny_std_macs, tiny_std_flops = tiny_vae_counts(encoder_conv="standard", decoder_conv="standard")
    tiny_params, tiny_macs, tiny_flops = tiny_vae_counts()

    student = tinysr_transformer(teacher)
    student_macs, student_flops = _measure(lambda: student(latents), student)
    student_params = count_parameters(student)

    kept = [teacher.transformer_blocks[i] for i in TINYSR_KEEP_LAYERS]
    uncached_params = count_parameters([student, teacher.norm_out.linear] + [block.norm1.linear for block in kept])
    time_text_params = count_parameters(teacher.time_text_embed)
    skipped = [i for i in range(config.num_layers) if i not in TINYSR_KEEP_LAYERS]
    text_time_params = count_parameters(
        [teacher.pos_embed, teacher.time_text_embed, teacher.context_embedder, teacher.norm_out, teacher.proj_out]
        + kept
    )
    text_time_macs, text_time_flops = _measure(teacher_call(skipped), teacher)

    vae_params = count_parameters(vae)
    teacher_params = count_parameters(teacher)
    return [
        Row("SD3-medium transformer (333 text tokens)", teacher_params, teacher_macs, teacher_flops, None, None),
        Row("SD3 VAE (encode 512 + decode 64x64)", vae_params, vae_macs, vae_flops, None, 1781.91),
        Row(
            "TSD-SR total (transformer + SD3 VAE)",
            teacher_params + vae_params,
            teacher_macs + vae_macs,
            teacher_flops + vae_flops,
            2112,
            2700,
        ),
        Row("TinySR transformer, 12 of 24 layers", student_params, student_macs, student_flops, None, None),
        Row("TinySR tiny VAE, standard convs", tiny_std_params, tiny_std_macs, tiny_std_flops, None, 131.91),
        Row("TinySR tiny VAE, separable encoder", tiny_params, tiny_macs, tiny_flops, None, 78.48),
        Row(
            "TinySR total (cached modulation, no text/time)",
            student_params + tiny_params,
            student_macs + tiny_macs,
            student_flops + tiny_flops,
            341,
            427,
        ),
        Row(
            "TinySR before caching (+ image-stream adaLN and norm_out linears)",
            uncached_params + tiny_params,
            student_macs + tiny_macs,
            student_flops + tiny_flops,
            516,
            427,
            f"the per-sample adaLN MACs are negligible and not counted; the time/text embedder "
            f"({time_text_params / 1e6:.1f} M) is not included either, as in the paper's 516 M",
        ),
        Row(
            "TinySR with text and time (12 full blocks incl. the last, 333 tokens)",
            text_time_params + tiny_params,
            text_time_macs + tiny_macs,
            text_time_flops + tiny_flops,
            1010,
            535,
        ),
    ]


def _difference(ours: Optional[float], paper: Optional[float]) -> str:
    if ours is None or paper is None:
        return ""
    return f"{100 * (ours - paper) / paper:+.1f}%"


def to_markdown(rows: list[Row]) -> str:
    lines = [
        f"Counted at {OUTPUT_SIZE}x{OUTPUT_SIZE} output ({LATENT_SIZE}x{LATENT_SIZE} latents) on the meta device by "
        "`python -m benchmarks.architecture`.",
        "",
        "| model | params (M) | paper | diff | module MACs (G) | paper | diff | FLOPs incl. attention (G) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        params_m = row.params / 1e6
        macs_g = row.macs / 1e9
        lines.append(
            f"| {row.name} | {params_m:,.1f} | {row.paper_params_m or ''} | {_difference(params_m, row.paper_params_m)} "
            f"| {macs_g:,.2f} | {row.paper_macs_g or ''} | {_difference(macs_g, row.paper_macs_g)} "
            f"| {row.flops / 1e9:,.1f} |"
        )
    notes = [row for row in rows if row.note]
    if notes:
        lines.append("")
        lines.extend(f"- {row.name}: {row.note}" for row in notes)
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", help="Also write architecture.md and architecture.json there.")
    args = parser.parse_args(argv)
    rows = measure()
    markdown = to_markdown(rows)
    sys.stdout.write(markdown)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        atomic_write_text(os.path.join(args.output_dir, "architecture.md"), markdown)
        atomic_write_text(
            os.path.join(args.output_dir, "architecture.json"), json.dumps([asdict(row) for row in rows], indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
