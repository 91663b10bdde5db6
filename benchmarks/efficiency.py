"""TinySR against its teacher TSD-SR: parameters, MACs, FLOPs, latency and peak memory, and a size sweep.

    python -m benchmarks.efficiency [--quick] [--device cpu|cuda] [--dtypes fp32,fp16,bf16] [--compile-dtypes fp32]

The teacher is the TSD-SR architecture (SD3-medium transformer with its 333-token prompt, SD3 VAE) and the student
TinySR (12 of its 24 layers cut by `TinySRPipeline.from_teacher`, modulation cached, tiny VAE), both with random
weights: speed and memory depend on the architecture, not on the weights. Each part is measured through the
pipelines: the whole call (`output_type="pt"`), the transformer alone (the velocity of one latent) and the VAE alone
(encode + decode). Within one group (device, dtype, compiled or not) every case runs in turn, repetition after
repetition, so that a noisy machine slows teacher and student alike and their ratio holds. Latency is the median of
`--repeats` runs after `--warmup` runs (`torch.cuda.synchronize` around each on CUDA); peak memory is the extra
memory a call needs above what was allocated before it (see `benchmarks.memory.PeakMemory`), the weights are listed
apart. Params, module MACs (Linear/Conv only, as the paper) and FLOPs (all operations) come from
`tinysr_diffusers.profiling`.

The sweep runs the tiled pipeline from 256 to 4096 output pixels (and untiled where that fits) to show that latency
grows with the pixels while peak memory stays bounded by the tile size.

`--quick` divides every width (attention heads, text widths, VAE channels) by 8 and keeps 4 of 8 layers, at 256 px:
a few minutes on 2 CPU cores. Its ratios are those of the scaled models, not of the paper's; the output says so.
Results go to `<output-dir>/<full|quick>-<device>/` (markdown, JSON, PNG plots; command, versions, device recorded).
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from diffusers.utils import logging as diffusers_logging

from benchmarks.memory import PeakMemory
from benchmarks.reporting import command_line, environment, environment_markdown, markdown_table
from tinysr_diffusers import PromptEmbeddings, TinySRAutoencoder, TinySRPipeline, TSDSRPipeline
from tinysr_diffusers.profiling import count_parameters, module_macs, total_flops
from tinysr_diffusers.reference_configs import (
    SD3_MEDIUM_TRANSFORMER_CONFIG,
    SD3_VAE_CONFIG,
    TINYSR_KEEP_LAYERS,
    TSDSR_PROMPT_TOKENS,
)
from tinysr_diffusers.utils import atomic_path, atomic_write_text


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPONENTS = ("pipeline", "transformer", "vae")
TEACHER, STUDENT, STUDENT_FOLDED = "TSD-SR (teacher)", "TinySR", "TinySR, folded modulation"
TINY_VAE_CHANNELS = 64  # TinySRAutoencoder's default width


@dataclass(frozen=True)
class Scale:
    """Model and image sizes of one benchmark mode."""

    name: str
    width_divisor: int  # divides the attention heads, the text widths and both VAEs' channels
    num_layers: int  # teacher layers; the student keeps `keep_layers`
    keep_layers: tuple[int, ...]
    output_size: int  # output side of the comparison (the low-resolution input is a quarter of it)
    sweep_sizes: tuple[int, ...]  # output sides of the sweep
    untiled_max: int  # largest output side also run untiled in the sweep
    repeats: int
    warmup: int
    sweep_repeats: int
    text_tokens: int = TSDSR_PROMPT_TOKENS
    tile_size: int = 64  # latent tile of the sweep (the pipelines' default, 512 px)
    tile_overlap: int = 8
    sweep_models: tuple[str, ...] = (STUDENT, TEACHER)
    note: str = ""


FULL = Scale(
    "full", 1, 24, TINYSR_KEEP_LAYERS, 512, (256, 512, 1024, 2048, 4096), 2048, repeats=10, warmup=2, sweep_repeats=3,
    note="The paper's architectures at full size.",
)
QUICK = Scale(
    "quick", 8, 8, (1, 3, 5, 7), 256, (256, 512, 1024, 2048, 4096), 1024, repeats=3, warmup=1, sweep_repeats=1,
    sweep_models=(STUDENT,),
    note=(
        "Quick mode: every width (attention heads 24 -> 3, text widths, SD3-VAE and tiny-VAE channels) divided by 8, "
        "8 teacher layers of which the student keeps 4, 256 px output, 333 text tokens kept. The ratios below are "
        "those of these scaled models, not the paper's; run without --quick (a GPU) for the real sizes."
    ),
)


# ------------------------------------------------------------------------------------------------------------ models
def transformer_config(scale: Scale) -> dict:
    d = scale.width_divisor
    base = SD3_MEDIUM_TRANSFORMER_CONFIG
    return dict(
        base,
        num_layers=scale.num_layers,
        num_attention_heads=max(base["num_attention_heads"] // d, 1),
        joint_attention_dim=base["joint_attention_dim"] // d,
        caption_projection_dim=base["caption_projection_dim"] // d,
        pooled_projection_dim=base["pooled_projection_dim"] // d,
    )


def vae_config(scale: Scale) -> dict:
    d = scale.width_divisor
    return dict(
        SD3_VAE_CONFIG,
        block_out_channels=tuple(c // d for c in SD3_VAE_CONFIG["block_out_channels"]),
        norm_num_groups=max(SD3_VAE_CONFIG["norm_num_groups"] // d, 1),
    )


def tiny_vae_config(scale: Scale) -> dict:
    channels = (max(TINY_VAE_CHANNELS // scale.width_divisor, 1),) * 4
    return dict(encoder_block_out_channels=channels, decoder_block_out_channels=channels)


def build_pipelines(scale: Scale, seed: int = 0) -> dict[str, "TSDSRPipeline | TinySRPipeline"]:
    """Teacher, student and student with folded modulation, fp32 on the CPU, random weights."""
    torch.manual_seed(seed)
    config = transformer_config(scale)
    transformer = SD3Transformer2DModel(**config).eval()
    prompt = PromptEmbeddings.from_tensors(
        torch.randn(scale.text_tokens, config["joint_attention_dim"]), torch.randn(config["pooled_projection_dim"])
    )
    teacher = TSDSRPipeline(transformer=transformer, vae=AutoencoderKL(**vae_config(scale)).eval(), prompt_embeddings=prompt)
    student = TinySRPipeline.from_teacher(
        teacher, scale.keep_layers, vae=TinySRAutoencoder(**tiny_vae_config(scale)).eval()
    )
    folded = TinySRPipeline(transformer=copy.deepcopy(student.transformer).fold_modulation(), vae=student.vae)
    pipelines = {TEACHER: teacher, STUDENT: student, STUDENT_FOLDED: folded}
    for pipe in pipelines.values():
        pipe.set_progress_bar_config(disable=True)
    return pipelines


def _compile(pipe) -> None:
    """Compile the modules the pipeline calls (the VAEs through their encoder and decoder)."""
    pipe.transformer.compile()
    pipe.vae.encoder.compile()
    pipe.vae.decoder.compile()


def _place(pipelines: dict, device: torch.device, dtype: torch.dtype, compiled: bool) -> dict:
    """Copies of the pipelines on `device` in `dtype` (one deep copy, so the student variants still share a VAE)."""
    placed = copy.deepcopy(pipelines)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # diffusers warns at every cast of a model built in fp32
    try:
        for pipe in placed.values():
            pipe.to(device=device, dtype=dtype)
            if compiled:
                _compile(pipe)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return placed


# ------------------------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    component: str
    model: str
    fn: Callable[[], object]
    modules: list = field(default_factory=list)


def cases(pipelines: dict, output_size: int, device: torch.device, dtype: torch.dtype) -> list[Case]:
    """Every (component, model) measurement at one output size. The VAE is measured once for the student."""
    generator = torch.Generator().manual_seed(0)
    low_res = torch.rand(1, 3, output_size // 4, output_size // 4, generator=generator).to(device)
    latent_side = output_size // 8
    in_channels = pipelines[STUDENT].transformer.config.in_channels
    latents = torch.randn(1, in_channels, latent_side, latent_side, generator=generator).to(device, dtype)
    pixels = (torch.rand(1, 3, output_size, output_size, generator=generator) * 2 - 1).to(device, dtype)

    result = []
    for model, pipe in pipelines.items():
        result.append(
            Case("pipeline", model, lambda p=pipe: p(low_res, output_type="pt", tile_size=None).images,
                 [pipe.transformer, pipe.vae])
        )  # fmt: skip
        result.append(Case("transformer", model, lambda p=pipe: p.predict_velocity(latents), [pipe.transformer]))
        if model != STUDENT_FOLDED:
            result.append(Case("vae", model, lambda p=pipe: p.decode_latents(p.encode_latents(pixels)), [pipe.vae]))
    return result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    group: Sequence[Case], device: torch.device, warmup: int, repeats: int
) -> dict[int, tuple[list[float], Optional[float]]]:
    """Run every case once per round, `warmup` rounds then `repeats` timed rounds, rotating the order each round.

    Returns, per case index, the latencies in ms and the largest peak extra memory in MiB over the timed rounds.
    """
    memory = PeakMemory(device)
    with torch.no_grad():
        for _ in range(warmup):
            for case in group:
                case.fn()
        latencies = {index: [] for index in range(len(group))}
        peaks = {index: None for index in range(len(group))}
        for round_index in range(repeats):
            shift = round_index % len(group)
            order = list(range(len(group)))[shift:] + list(range(len(group)))[:shift]
            for index in order:
                memory.start()
                _synchronize(device)
                start = time.perf_counter()
                group[index].fn()
                _synchronize(device)
                latencies[index].append((time.perf_counter() - start) * 1e3)
                peak = memory.stop()
                if peak is not None:
                    peaks[index] = max(peaks[index] or 0.0, peak)
    return {index: (latencies[index], peaks[index]) for index in latencies}


def _weights_mib(modules: list) -> float:
    tensors = {id(t): t for module in modules for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def count(case: Case) -> dict:
    """Params, module MACs and FLOPs of one case (runs it twice, once per counter)."""
    model = torch.nn.ModuleList(case.modules)
    return {
        "params": count_parameters(case.modules),
        "module_macs": module_macs(case.fn, model),
        "flops": total_flops(case.fn),
    }


def count_all(pipelines: dict, output_size: int, device: torch.device) -> dict[tuple[str, str], dict]:
    """Counts of every case, in fp32 eager on `device` (a temporary copy, freed on return)."""
    placed = _place(pipelines, device, torch.float32, False)
    return {(case.component, case.model): count(case) for case in cases(placed, output_size, device, torch.float32)}


# --------------------------------------------------------------------------------------------------------- benchmark
def compare(
    pipelines: dict, scale: Scale, device: torch.device, dtypes: Sequence[str], compile_dtypes: Sequence[str],
    progress: Callable[[str], None] = print,
) -> list[dict]:
    """Every case in every group (dtype x compiled); counts are taken once, in fp32 eager on `device`."""
    groups = [(name, False) for name in dtypes] + [(name, True) for name in compile_dtypes]
    counts: dict[tuple[str, str], dict] = {}
    rows = []
    for dtype_name, compiled in groups:
        label = f"{dtype_name}{' + torch.compile' if compiled else ''}"
        progress(f"[efficiency] group {label} on {device}")
        dtype = DTYPES[dtype_name]
        placed = _place(pipelines, device, dtype, compiled)
        group = cases(placed, scale.output_size, device, dtype)
        if not counts:
            counts = count_all(pipelines, scale.output_size, device)
        timings = time_interleaved(group, device, scale.warmup, scale.repeats)
        for index, case in enumerate(group):
            latencies, peak = timings[index]
            rows.append(
                {
                    "component": case.component,
                    "model": case.model,
                    "dtype": dtype_name,
                    "compiled": compiled,
                    "output_size": scale.output_size,
                    **counts[(case.component, case.model)],
                    "weights_mib": round(_weights_mib(case.modules), 3),
                    "latency_ms": round(statistics.median(latencies), 3),
                    "latency_ms_runs": [round(value, 3) for value in latencies],
                    "peak_extra_mib": None if peak is None else round(peak, 1),
                }
            )
        del placed, group
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Teacher / student per component and group, for both student variants."""
    index = {(r["component"], r["model"], r["dtype"], r["compiled"]): r for r in rows}
    result = []
    for (component, model, dtype, compiled), row in index.items():
        if model == TEACHER:
            continue
        teacher = index[(component, TEACHER, dtype, compiled)]

        def ratio(key):
            if not row[key] or teacher[key] is None:
                return None
            return round(teacher[key] / row[key], 2)

        result.append(
            {
                "component": component,
                "student": model,
                "dtype": dtype,
                "compiled": compiled,
                "speedup": ratio("latency_ms"),
                "params_ratio": ratio("params"),
                "macs_ratio": ratio("module_macs"),
                "flops_ratio": ratio("flops"),
                "memory_ratio": ratio("peak_extra_mib"),
            }
        )
    return result


def sweep(pipelines: dict, scale: Scale, device: torch.device, dtype_name: str, progress=print) -> list[dict]:
    """Latency and peak extra memory of whole pipeline calls against the output size, tiled (and untiled if small)."""
    dtype = DTYPES[dtype_name]
    rows = []
    placed = _place({model: pipelines[model] for model in scale.sweep_models}, device, dtype, compiled=False)
    for model, pipe in placed.items():
        generator = torch.Generator().manual_seed(0)
        for size in scale.sweep_sizes:
            low_res = torch.rand(1, 3, size // 4, size // 4, generator=generator).to(device)
            for tiled in (True, False):
                if not tiled and size > scale.untiled_max:
                    continue
                progress(f"[efficiency] sweep {model} {size} px {'tiled' if tiled else 'untiled'}")
                call = dict(tile_size=scale.tile_size if tiled else None, tile_overlap=scale.tile_overlap)
                fn = lambda: pipe(low_res, output_type="pt", **call).images  # noqa: E731
                latencies, peak = time_interleaved([Case("pipeline", model, fn)], device, 1, scale.sweep_repeats)[0]
                rows.append(
                    {
                        "model": model,
                        "dtype": dtype_name,
                        "output_size": size,
                        "megapixels": round(size * size / 1e6, 4),
                        "tiled": tiled,
                        "tile": f"{scale.tile_size}/{scale.tile_overlap} latent px" if tiled else None,
                        "latency_ms": round(statistics.median(latencies), 3),
                        "latency_ms_runs": [round(value, 3) for value in latencies],
                        "peak_extra_mib": None if peak is None else round(peak, 1),
                        "output_mib": round(3 * size * size * 4 / 2**20, 3),
                    }
                )
    return rows


# ----------------------------------------------------------------------------------------------------------- reports
def _group_label(row: dict) -> str:
    return row["dtype"] + (" + compile" if row["compiled"] else "")


def _fmt(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def to_markdown(results: dict) -> str:
    scale, env = results["scale"], results["environment"]
    rows, sweep_rows = results["comparison"], results["sweep"]
    lines = [
        f"# Efficiency: TSD-SR teacher vs TinySR ({scale['name']} mode)",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {environment_markdown(env)}",
        "",
        scale["note"],
        "",
        f"Output {scale['output_size']} px from a {scale['output_size'] // 4} px input, batch 1, random weights; "
        f"teacher {scale['num_layers']} layers with {scale['text_tokens']} text tokens, student keeps layers "
        f"{list(scale['keep_layers'])}. Latency: median of {scale['repeats']} runs after {scale['warmup']} warm-up, "
        "all cases of a group interleaved. Peak memory: extra memory at the peak of a call above what was allocated "
        "before it (CUDA: max_memory_allocated; CPU: peak resident set via /proc VmHWM), weights listed apart.",
        "",
        "## Size and compute (counted in fp32)",
        "",
    ]
    counted = [r for r in rows if r["dtype"] == rows[0]["dtype"] and not r["compiled"]]
    lines.append(
        markdown_table(
            ["part", "model", "params (M)", "module MACs (G)", "FLOPs (G)"],
            [
                [r["component"], r["model"], _fmt(r["params"] / 1e6, 2), _fmt(r["module_macs"] / 1e9, 3),
                 _fmt(r["flops"] / 1e9, 3)]
                for r in counted
            ],
        )  # fmt: skip
    )
    lines += ["## Latency and peak memory", ""]
    lines.append(
        markdown_table(
            ["group", "part", "model", "latency (ms)", "peak extra memory (MiB)", "weights (MiB)"],
            [
                [_group_label(r), r["component"], r["model"], _fmt(r["latency_ms"]), _fmt(r["peak_extra_mib"]),
                 _fmt(r["weights_mib"])]
                for r in rows
            ],
            align="lllrrr",
        )  # fmt: skip
    )
    lines += ["## Teacher / student", ""]
    lines.append(
        markdown_table(
            ["group", "part", "student", "speed-up", "params", "module MACs", "FLOPs", "peak memory"],
            [
                [_group_label(r), r["component"], r["student"]]
                + [_fmt(r[key], 2) + ("x" if r[key] is not None else "")
                   for key in ("speedup", "params_ratio", "macs_ratio", "flops_ratio", "memory_ratio")]
                for r in results["ratios"]
            ],
            align="lllrrrrr",
        )  # fmt: skip
    )
    lines += ["![latency and memory, teacher vs student](comparison.png)", ""]
    if sweep_rows:
        lines += [
            "## Size sweep (whole pipeline calls)",
            "",
            f"Tiled with {scale['tile_size']}/{scale['tile_overlap']} latent pixels (tile/overlap) plus VAE tiling; "
            f"untiled up to {scale['untiled_max']} px. Median of {scale['sweep_repeats']} run(s) after one warm-up. "
            "The output image itself (3 x 4 bytes per pixel) is part of the peak. With tiling the model activations "
            "are bounded by the tile; what still grows with the image are the pipeline's full-resolution float "
            "buffers (bicubic upscale, padded input, decoded image, colour fix), so the peak tends to a fixed number "
            "of output-sized tensors (last column) instead of growing with the attention over the whole image.",
            "",
            markdown_table(
                ["model", "output (px)", "megapixels", "tiling", "latency (ms)", "peak extra memory (MiB)",
                 "output tensor (MiB)", "peak / output"],
                [
                    [r["model"], r["output_size"], _fmt(r["megapixels"], 2), r["tile"] or "none",
                     _fmt(r["latency_ms"]), _fmt(r["peak_extra_mib"]), _fmt(r["output_mib"]),
                     "n/a" if not r["peak_extra_mib"] else f"{r['peak_extra_mib'] / r['output_mib']:.1f}x"]
                    for r in sweep_rows
                ],
                align="lrrlrrrr",
            ),  # fmt: skip
            "![latency and memory against pixels](sweep.png)",
            "",
        ]
    return "\n".join(lines)


def _save_figure(figure, path: str) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, bbox_inches="tight", format="png")


def plot_comparison(rows: list[dict], path: str, title: str) -> None:
    """Bars: latency and peak memory per part, one bar per model, grouped by dtype/compile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(_group_label(r) for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    figure, axes = plt.subplots(2, len(COMPONENTS), figsize=(5 * len(COMPONENTS), 7), squeeze=False)
    width = 0.8 / len(models)
    for column, component in enumerate(COMPONENTS):
        for row_index, (key, label) in enumerate((("latency_ms", "latency (ms)"), ("peak_extra_mib", "peak extra (MiB)"))):
            axis = axes[row_index][column]
            for model_index, model in enumerate(models):
                values = {
                    _group_label(r): r[key] for r in rows if r["component"] == component and r["model"] == model
                }
                positions = [g + model_index * width for g in range(len(groups)) if groups[g] in values]
                heights = [values[group] or 0.0 for group in groups if group in values]
                if positions:
                    axis.bar(positions, heights, width, label=model)
            axis.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, rotation=20)
            axis.set_ylabel(label)
            axis.set_yscale("log")
            axis.set_title(component)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(title)
    _save_figure(figure, path)
    plt.close(figure)


def plot_sweep(rows: list[dict], path: str, title: str) -> None:
    """Lines: latency and peak memory against output megapixels, per model and tiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    series = dict.fromkeys((r["model"], r["tiled"]) for r in rows)
    for model, tiled in series:
        selected = [r for r in rows if r["model"] == model and r["tiled"] == tiled]
        label = f"{model}, {'tiled' if tiled else 'untiled'}"
        pixels = [r["megapixels"] for r in selected]
        axes[0].plot(pixels, [r["latency_ms"] for r in selected], marker="o", label=label)
        axes[1].plot(pixels, [r["peak_extra_mib"] or 0.0 for r in selected], marker="o", label=label)
    output = sorted({(r["megapixels"], r["output_mib"]) for r in rows})
    axes[1].plot([p for p, _ in output], [m for _, m in output], linestyle="--", color="grey", label="output tensor")
    for axis, label in zip(axes, ("latency (ms)", "peak extra memory (MiB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("output megapixels")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    _save_figure(figure, path)
    plt.close(figure)


def write_results(results: dict, directory: str) -> list[str]:
    """Write efficiency.md, efficiency.json and the PNG plots into `directory` (atomically); return their paths."""
    os.makedirs(directory, exist_ok=True)
    device_name = results["environment"]["device_name"]
    paths = [os.path.join(directory, name) for name in ("efficiency.md", "efficiency.json", "comparison.png")]
    atomic_write_text(paths[0], to_markdown(results))
    atomic_write_text(paths[1], json.dumps(results, indent=2) + "\n")
    plot_comparison(results["comparison"], paths[2], f"TSD-SR vs TinySR ({results['scale']['name']}), {device_name}")
    if results["sweep"]:
        paths.append(os.path.join(directory, "sweep.png"))
        plot_sweep(results["sweep"], paths[3], f"TinySR size sweep ({results['scale']['name']}), {device_name}")
    return paths


# -------------------------------------------------------------------------------------------------------------- CLI
def _names(text: str, allowed: Sequence[str], option: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise SystemExit(f"{option}: unknown {unknown}; choose from {list(allowed)}")
    return names


def run(
    scale: Scale, device: "str | torch.device", dtypes: Sequence[str], compile_dtypes: Sequence[str],
    command: str, progress: Callable[[str], None] = print,
) -> dict:
    """Build the models, run the comparison and the sweep, and return everything the reports need."""
    device = torch.device(device)
    pipelines = build_pipelines(scale)
    rows = compare(pipelines, scale, device, dtypes, compile_dtypes, progress)
    sweep_rows = sweep(pipelines, scale, device, dtypes[0], progress) if scale.sweep_sizes else []
    return {
        "command": command,
        "environment": environment(device),
        "scale": asdict(scale),
        "transformer_config": transformer_config(scale),
        "vae_config": vae_config(scale),
        "tiny_vae_config": tiny_vae_config(scale),
        "comparison": rows,
        "ratios": ratios(rows),
        "sweep": sweep_rows,
    }


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Widths / 8, 4 of 8 layers, 256 px (2 CPU cores).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="fp32,fp16,bf16", help="Comma-separated, from fp32, fp16, bf16.")
    parser.add_argument(
        "--compile-dtypes", default=None,
        help="Dtypes also measured under torch.compile (default: fp32 with --quick, else all --dtypes; '' for none).",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, help="Timed runs per case (median reported).")
    parser.add_argument("--warmup", type=int, help="Untimed runs per case first.")
    parser.add_argument("--sweep-sizes", help="Comma-separated output sides of the sweep ('' to skip it).")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's; recorded).")
    parser.add_argument("--output-dir", default="benchmarks/results/efficiency")
    args = parser.parse_args(argv)

    scale = QUICK if args.quick else FULL
    dtypes = _names(args.dtypes, DTYPES, "--dtypes")
    if not dtypes:
        raise SystemExit("--dtypes: give at least one")
    compile_dtypes = args.compile_dtypes if args.compile_dtypes is not None else ("fp32" if args.quick else args.dtypes)
    compile_dtypes = _names(compile_dtypes, DTYPES, "--compile-dtypes")
    overrides = {}
    for name in ("repeats", "warmup"):
        value = getattr(args, name)
        if value is not None:
            if value < (1 if name == "repeats" else 0):
                raise SystemExit(f"--{name} must be {'>= 1' if name == 'repeats' else '>= 0'}, got {value}")
            overrides[name] = value
    if args.sweep_sizes is not None:
        sizes = tuple(int(size) for size in args.sweep_sizes.split(",") if size)
        bad = [size for size in sizes if size <= 0 or size % 32]
        if bad:
            raise SystemExit(f"--sweep-sizes: output sides must be positive multiples of 32, got {bad}")
        overrides["sweep_sizes"] = sizes
    scale = replace(scale, **overrides)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")

    results = run(scale, device, dtypes, compile_dtypes, command_line("benchmarks.efficiency", argv))
    directory = os.path.join(args.output_dir, f"{scale.name}-{device.type}")
    for path in write_results(results, directory):
        print(f"[efficiency] wrote {path}")
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
