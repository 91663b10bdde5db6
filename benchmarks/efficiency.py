"""TinySR against its teacher TSD-SR: parameters, MACs, FLOPs, latency and peak memory, and a size sweep.

    python -m benchmarks.efficiency [--quick] [--device cpu|cuda] [--dtypes fp32,fp16,bf16] [--compile-dtypes fp32]
        [--models teacher,tinysr,tinysr-folded] [--schedule interleaved|one-at-a-time]

The teacher is the TSD-SR architecture (SD3-medium transformer with its 333-token prompt, SD3 VAE) and the student
TinySR (12 of its 24 layers cut by `TinySRPipeline.from_teacher`, modulation cached, tiny VAE), both with random
weights: speed and memory depend on the architecture, not on the weights. Each part is measured through the
pipelines: the whole call (`output_type="pt"`), the transformer alone (the velocity of one latent) and the VAE alone
(encode + decode). Latency is the median of `--repeats` runs after `--warmup` runs (`torch.cuda.synchronize` around
each on CUDA); peak memory is the extra memory a call needs above what was allocated before it (see
`benchmarks.memory.PeakMemory`), the weights are listed apart. A group is one device, dtype and compiled or not.

Two schedules keep the teacher / student ratio honest on a noisy machine:

- `interleaved` (the default with `--quick`): every model is built once; for each group, copies of all of them run
  every case in turn, repetition after repetition, so that noise slows teacher and student alike.
- `one-at-a-time` (the default at full size): the teacher's fp32 weights alone are 8.1 GiB, and holding them next
  to per-group copies runs a 24 GB machine out of memory. Only one model is held while it is measured, and freed after
  (`del`, a full garbage collection, `malloc_trim`): for each group the students run half of the timed runs, then the
  teacher alone, then the students the other half. Their medians before and after the teacher are reported: the gap
  is how much the machine drifted while the teacher ran. The teacher is rebuilt from the seed for each group, in fp32
  then cast in place (no copy), so that every dtype measures the cast of the same fp32 weights, as `interleaved`
  does; the students are copies of an fp32 student cut from it, dropped while the teacher is held and cut again
  from a rebuilt teacher after (the same weights). The peak is about the fp32 teacher plus its activations and the
  Python runtime: about 11 GiB at full size.

Params, module MACs (Linear/Conv only, as the paper) and FLOPs (all operations) come from
`tinysr_diffusers.evaluation.profiling`, counted once on the same pipelines built on the meta device (shapes, no
weights: no memory, seconds at full size); they equal the counts on real weights (tests/test_efficiency_memory.py).
The resident memory after each build and free, and the peak memory of the whole process (`VmHWM` over the run), are
recorded with the results.

The sweep runs the tiled pipeline from 256 to 4096 output pixels (and untiled where that fits) to show that latency
grows with the pixels while peak memory stays bounded by the tile size. Untiled, the teacher's activations grow with
the pixels (its SD3 VAE alone: 0.3 GiB in fp32 at 256 px, so about 1, 4 and 16 GiB at 512, 1024 and 2048 px): on a
24 GB CPU machine keep `--sweep-sizes` at 1024 or less.

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

from benchmarks.memory import MemoryLog, PeakMemory, machine_memory_mib, process_peak_mib, release_free_memory
from benchmarks.reporting import command_line, environment, environment_markdown, markdown_table
from tinysr_diffusers import PromptEmbeddings, TinySRAutoencoder, TinySRPipeline, TSDSRPipeline
from tinysr_diffusers.evaluation.profiling import count_parameters, module_macs, total_flops
from tinysr_diffusers.evaluation.reference_configs import (
    SD3_MEDIUM_TRANSFORMER_CONFIG,
    SD3_VAE_CONFIG,
    TINYSR_KEEP_LAYERS,
    TSDSR_PROMPT_TOKENS,
)
from tinysr_diffusers.utils import atomic_path, atomic_write_text


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPONENTS = ("pipeline", "transformer", "vae")
TEACHER, STUDENT, STUDENT_FOLDED = "TSD-SR (teacher)", "TinySR", "TinySR, folded modulation"
MODELS = {"teacher": TEACHER, "tinysr": STUDENT, "tinysr-folded": STUDENT_FOLDED}  # `--models` names, in row order
SCHEDULES = ("interleaved", "one-at-a-time")
TINY_VAE_CHANNELS = 64  # TinySRAutoencoder's default width


@dataclass(frozen=True)
class Scale:
    """Model and image sizes of one benchmark mode, and how its models are held (`SCHEDULES`)."""

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
    schedule: str = "interleaved"
    note: str = ""


FULL = Scale(
    "full", 1, 24, TINYSR_KEEP_LAYERS, 512, (256, 512, 1024, 2048, 4096), 2048, repeats=10, warmup=2, sweep_repeats=3,
    schedule="one-at-a-time", note="The paper's architectures at full size.",
)  # fmt: skip
QUICK = Scale(
    "quick", 8, 8, (1, 3, 5, 7), 256, (256, 512, 1024, 2048, 4096), 1024, repeats=3, warmup=1, sweep_repeats=1,
    sweep_models=(STUDENT,),
    note=(
        "Quick mode: every width (attention heads 24 -> 3, text widths, SD3-VAE and tiny-VAE channels) divided by 8, "
        "8 teacher layers of which the student keeps 4, 256 px output, 333 text tokens kept. The ratios below are "
        "those of these scaled models, not the paper's; run without --quick for the real sizes."
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


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_teacher(scale: Scale, seed: int = 0) -> TSDSRPipeline:
    """The teacher in fp32 on the default device (`meta` inside `with torch.device("meta")`), random weights drawn
    from `seed`: the same weights at every call, so that it can be freed and rebuilt."""
    torch.manual_seed(seed)
    config = transformer_config(scale)
    transformer = SD3Transformer2DModel(**config).eval()
    prompt = PromptEmbeddings.from_tensors(
        torch.randn(scale.text_tokens, config["joint_attention_dim"]), torch.randn(config["pooled_projection_dim"])
    )
    vae = AutoencoderKL(**vae_config(scale)).eval()
    return _quiet(TSDSRPipeline(transformer=transformer, vae=vae, prompt_embeddings=prompt))


def cut_student(teacher: TSDSRPipeline, scale: Scale) -> TinySRPipeline:
    """The student: the teacher's transformer cut to `scale.keep_layers` (copies of its tensors) and a tiny VAE."""
    vae = TinySRAutoencoder(**tiny_vae_config(scale)).eval()
    return _quiet(TinySRPipeline.from_teacher(teacher, scale.keep_layers, vae=vae))


def student_variants(student: TinySRPipeline, models: Sequence[str]) -> dict[str, TinySRPipeline]:
    """The students among `models`: `student` itself and a copy with its modulation folded, sharing its VAE."""
    variants = {STUDENT: student} if STUDENT in models else {}
    if STUDENT_FOLDED in models:
        folded = copy.deepcopy(student.transformer).fold_modulation()
        variants[STUDENT_FOLDED] = _quiet(TinySRPipeline(transformer=folded, vae=student.vae))
    return variants


def build_pipelines(
    scale: Scale, seed: int = 0, models: Sequence[str] = tuple(MODELS.values())
) -> dict[str, "TSDSRPipeline | TinySRPipeline"]:
    """Every model of `models` at once (teacher, student, student with folded modulation), fp32 on the default
    device, random weights; the students are cut from the teacher even when it is not among `models`."""
    teacher = build_teacher(scale, seed)
    pipelines = {TEACHER: teacher} if TEACHER in models else {}
    if set(models) - {TEACHER}:
        pipelines.update(student_variants(cut_student(teacher, scale), models))
    return pipelines


class ModelSource:
    """The pipelines each measurement gets: fresh (fp32, on the CPU) and its own, so that they are freed with it.

    `interleaved`: every model is built here once and each measurement gets copies. `one-at-a-time`: the teacher is
    rebuilt from the seed for each measurement; the students are copies of an fp32 student cut from it, kept here
    between the students' rounds but dropped while the teacher is held (and cut again after, the same weights), so
    that the peak is the fp32 teacher and its activations.
    """

    def __init__(self, scale: Scale, models: Sequence[str], seed: int = 0):
        self.scale, self.models, self.seed = scale, [model for model in MODELS.values() if model in models], seed
        self.students = [model for model in self.models if model != TEACHER]
        self.pipelines = build_pipelines(scale, seed, self.models) if scale.schedule == "interleaved" else {}
        self.student: Optional[TinySRPipeline] = None

    def rounds(self, repeats: int) -> list[tuple[list[str], int]]:
        """(models measured together, timed runs) of one group, in order: all models at once, or the students'
        runs split around the teacher's."""
        if self.scale.schedule == "interleaved":
            return [(self.models, repeats)]
        if TEACHER not in self.models:
            return [(self.students, repeats)]
        if not self.students:
            return [([TEACHER], repeats)]
        rounds = [(self.students, (repeats + 1) // 2), ([TEACHER], repeats), (self.students, repeats // 2)]
        return [(models, runs) for models, runs in rounds if runs]

    def build(self, models: Sequence[str]) -> dict[str, "TSDSRPipeline | TinySRPipeline"]:
        """Fresh pipelines of `models`, fp32 on the CPU, for the caller alone."""
        if self.scale.schedule == "interleaved":  # one deep copy, so the student variants still share a VAE
            return copy.deepcopy({model: self.pipelines[model] for model in models})
        pipelines = {}
        if TEACHER in models:
            self.student = None  # not held next to the teacher: cut again after it
            release_free_memory(full=True)
            pipelines[TEACHER] = build_teacher(self.scale, self.seed)
        if set(models) - {TEACHER}:
            if self.student is None:
                self.student = cut_student(build_teacher(self.scale, self.seed), self.scale)
            pipelines.update(student_variants(copy.deepcopy(self.student), models))
        return pipelines


def _compile(pipe) -> None:
    """Compile the modules the pipeline calls (the VAEs through their encoder and decoder)."""
    pipe.transformer.compile()
    pipe.vae.encoder.compile()
    pipe.vae.decoder.compile()


def _place(pipelines: dict, device: torch.device, dtype: torch.dtype, compiled: bool) -> None:
    """Move and cast the pipelines in place, one tensor at a time (no second copy of the weights); on the CPU the
    VAEs in channels_last, as `tinysr upscale` runs them (`devices.optimize_for_cpu`); compile them."""
    from tinysr_diffusers.devices import optimize_for_cpu

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # diffusers warns at every cast of a model built in fp32
    try:
        for pipe in pipelines.values():
            optimize_for_cpu(pipe.to(device=device, dtype=dtype))
            if compiled:
                _compile(pipe)
    finally:
        diffusers_logging.set_verbosity(verbosity)


# ------------------------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    component: str
    model: str
    fn: Callable[[], object]
    modules: list = field(default_factory=list)
    count_fn: Optional[Callable[[], object]] = None  # what is counted, if not `fn`


def cases(pipelines: dict, output_size: int, device: torch.device, dtype: torch.dtype) -> list[Case]:
    """Every (component, model) measurement at one output size. The VAE is measured once for the student.

    The whole call is counted through the pipeline's untiled recipe (`upscale`, what the call runs for one image):
    the call's input checks read values, which tensors on the meta device do not have.
    """
    generator = torch.Generator().manual_seed(0)
    low_res = torch.rand(1, 3, output_size // 4, output_size // 4, generator=generator).to(device)
    latent_side = output_size // 8
    in_channels = next(iter(pipelines.values())).transformer.config.in_channels
    latents = torch.randn(1, in_channels, latent_side, latent_side, generator=generator).to(device, dtype)
    pixels = (torch.rand(1, 3, output_size, output_size, generator=generator) * 2 - 1).to(device, dtype)

    result = []
    for model, pipe in pipelines.items():
        result.append(
            Case("pipeline", model, lambda p=pipe: p(low_res, output_type="pt", tile_size=None).images,
                 [pipe.transformer, pipe.vae],
                 lambda p=pipe: p.upscale(low_res, output_type="pt", color_fix=p.default_color_fix))
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
    """Run every case once per round, `warmup` rounds then `repeats` timed rounds, rotating the order each round, then
    one more call per case under the memory probe.

    The probe stays out of the timed rounds: it empties the CUDA cache / trims the heap before its call, so a call it
    wraps pays for fresh allocations that a warm pipeline does not. Returns, per case index, the latencies in ms and
    the peak extra memory in MiB of the probed call.
    """
    memory = PeakMemory(device)
    with torch.no_grad():
        for _ in range(warmup):
            for case in group:
                case.fn()
        latencies = {index: [] for index in range(len(group))}
        for round_index in range(repeats):
            shift = round_index % len(group)
            order = list(range(len(group)))[shift:] + list(range(len(group)))[:shift]
            for index in order:
                _synchronize(device)
                start = time.perf_counter()
                group[index].fn()
                _synchronize(device)
                latencies[index].append((time.perf_counter() - start) * 1e3)
        peaks = {}
        for index, case in enumerate(group):
            memory.start()
            case.fn()
            _synchronize(device)
            peaks[index] = memory.stop()
    return {index: (latencies[index], peaks[index]) for index in latencies}


def _weights_mib(modules: list) -> float:
    tensors = {id(t): t for module in modules for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def count(case: Case) -> dict:
    """Params, module MACs and FLOPs of one case (runs it twice, once per counter)."""
    model = torch.nn.ModuleList(case.modules)
    fn = case.count_fn or case.fn
    return {"params": count_parameters(case.modules), "module_macs": module_macs(fn, model), "flops": total_flops(fn)}


def count_all(scale: Scale, models: Sequence[str]) -> dict[tuple[str, str], dict]:
    """Counts of every case, on the pipelines built on the meta device: shapes without weights, no memory."""
    meta = torch.device("meta")
    with meta:
        pipelines = build_pipelines(scale, models=models)
    group = cases(pipelines, scale.output_size, meta, torch.float32)
    return {(case.component, case.model): count(case) for case in group}


# --------------------------------------------------------------------------------------------------------- benchmark
def measure(
    pipelines: dict, scale: Scale, device: torch.device, dtype_name: str, compiled: bool, repeats: int
) -> dict[tuple[str, str], tuple[list[float], Optional[float], float]]:
    """Place `pipelines` (in place) for one group and time all their cases together: per (component, model), the
    latencies in ms, the peak extra memory in MiB and the weights in MiB."""
    dtype = DTYPES[dtype_name]
    _place(pipelines, device, dtype, compiled)
    group = cases(pipelines, scale.output_size, device, dtype)
    timings = time_interleaved(group, device, scale.warmup, repeats)
    if compiled:
        torch.compiler.reset()  # dynamo's caches hold on to the compiled modules
    return {
        (case.component, case.model): (*timings[index], _weights_mib(case.modules)) for index, case in enumerate(group)
    }


def _row_order(key: tuple[str, str]) -> tuple[int, int]:
    component, model = key
    return list(MODELS.values()).index(model), COMPONENTS.index(component)


def compare(
    source: ModelSource, scale: Scale, device: torch.device, dtypes: Sequence[str], compile_dtypes: Sequence[str],
    counts: dict[tuple[str, str], dict], memory_log: Callable[[str], None] = lambda stage: None,
    progress: Callable[[str], None] = print,
) -> list[dict]:
    """Every case of `source`'s models in every group (dtype x compiled), measured in `source.rounds`."""
    groups = [(name, False) for name in dtypes] + [(name, True) for name in compile_dtypes]
    rows = []
    for dtype_name, compiled in groups:
        label = f"{dtype_name}{' + torch.compile' if compiled else ''}"
        rounds: dict[tuple[str, str], list[list[float]]] = {}
        peaks: dict[tuple[str, str], Optional[float]] = {}
        weights: dict[tuple[str, str], float] = {}
        for models, repeats in source.rounds(scale.repeats):
            names = " + ".join(models)  # the models' names hold commas
            progress(f"[efficiency] group {label} on {device}: {names}")
            pipelines = source.build(models)
            memory_log(f"{label}: {names} built")
            measured = measure(pipelines, scale, device, dtype_name, compiled, repeats)
            del pipelines
            release_free_memory(full=True)
            memory_log(f"{label}: {names} measured and freed")
            for key, (latencies, peak, weights_mib) in measured.items():
                rounds.setdefault(key, []).append(latencies)
                if peak is not None:
                    peaks[key] = max(peaks.get(key) or 0.0, peak)
                weights[key] = weights_mib
        for key in sorted(rounds, key=_row_order):
            component, model = key
            latencies = [value for runs in rounds[key] for value in runs]
            peak = peaks.get(key)
            rows.append(
                {
                    "component": component,
                    "model": model,
                    "dtype": dtype_name,
                    "compiled": compiled,
                    "output_size": scale.output_size,
                    **counts[key],
                    "weights_mib": round(weights[key], 3),
                    "latency_ms": round(statistics.median(latencies), 3),
                    "latency_ms_runs": [round(value, 3) for value in latencies],
                    "latency_ms_rounds": [round(statistics.median(runs), 3) for runs in rounds[key]],
                    "peak_extra_mib": None if peak is None else round(peak, 1),
                }
            )
    return rows


def _ratio(teacher: dict, student: dict, key: str) -> Optional[float]:
    if not student[key] or teacher[key] is None:
        return None
    return round(teacher[key] / student[key], 2)


def ratios(rows: list[dict]) -> list[dict]:
    """Teacher / student per component and group, for both student variants (none without the teacher)."""
    index = {(r["component"], r["model"], r["dtype"], r["compiled"]): r for r in rows}
    result = []
    for (component, model, dtype, compiled), row in index.items():
        teacher = index.get((component, TEACHER, dtype, compiled))
        if model == TEACHER or teacher is None:
            continue
        result.append(
            {
                "component": component,
                "student": model,
                "dtype": dtype,
                "compiled": compiled,
                "speedup": _ratio(teacher, row, "latency_ms"),
                "params_ratio": _ratio(teacher, row, "params"),
                "macs_ratio": _ratio(teacher, row, "module_macs"),
                "flops_ratio": _ratio(teacher, row, "flops"),
                "memory_ratio": _ratio(teacher, row, "peak_extra_mib"),
            }
        )
    return result


def best_ratios(rows: list[dict]) -> list[dict]:
    """Per component, the teacher in its fastest group against the fastest student (either variant, any group):
    each model in its best setting, on the same machine in the same run."""
    result = []
    for component in COMPONENTS:
        teachers = [r for r in rows if r["component"] == component and r["model"] == TEACHER]
        students = [r for r in rows if r["component"] == component and r["model"] != TEACHER]
        if not teachers or not students:
            continue
        teacher = min(teachers, key=lambda r: r["latency_ms"])
        student = min(students, key=lambda r: r["latency_ms"])
        result.append(
            {
                "component": component,
                "teacher_group": _group_label(teacher),
                "teacher_latency_ms": teacher["latency_ms"],
                "student": student["model"],
                "student_group": _group_label(student),
                "student_latency_ms": student["latency_ms"],
                "speedup": _ratio(teacher, student, "latency_ms"),
            }
        )
    return result


def sweep(pipelines: dict, scale: Scale, device: torch.device, dtype_name: str, progress=print) -> list[dict]:
    """Latency and peak extra memory of whole pipeline calls against the output size, tiled (and untiled if small),
    of `pipelines` placed in place."""
    dtype = DTYPES[dtype_name]
    rows = []
    _place(pipelines, device, dtype, compiled=False)
    for model, pipe in pipelines.items():
        generator = torch.Generator().manual_seed(0)
        for size in scale.sweep_sizes:
            low_res = torch.rand(1, 3, size // 4, size // 4, generator=generator).to(device)
            for tiled in (True, False):
                if not tiled and size > scale.untiled_max:
                    continue
                progress(f"[efficiency] sweep {model} {size} px {'tiled' if tiled else 'untiled'}")
                call = dict(tile_size=scale.tile_size if tiled else None, tile_overlap=scale.tile_overlap)
                fn = lambda: pipe(low_res, output_type="pt", **call).images  # noqa: E731
                case = Case("pipeline", model, fn, [pipe.transformer, pipe.vae])
                latencies, peak = time_interleaved([case], device, 1, scale.sweep_repeats)[0]
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


def _drift(row: dict) -> float:
    """How much a student's median moved between its runs before and after the teacher, relative to the faster."""
    before, after = row["latency_ms_rounds"]
    return abs(after - before) / min(before, after)


def _schedule_markdown(scale: dict) -> str:
    timing = f"Latency: median of {scale['repeats']} runs after {scale['warmup']} warm-up"
    if scale["schedule"] == "interleaved":
        return f"{timing}, all cases of a group interleaved (every model held at once)."
    return (
        f"{timing} per round, one model at a time (each built for its round and freed after it, to bound memory): "
        "per group the students run first (half of the timed runs, both variants interleaved), then the teacher "
        "alone, then the students again (the other half) on fresh copies of the same weights. Teacher and student "
        "do not share rounds, so a machine that slows down while the teacher runs would bias their ratio; the "
        "students' medians before and after the teacher (last column) show how much it drifted."
    )


def _memory_markdown(memory: dict) -> list[str]:
    machine = memory["machine_mib"]
    lines = [
        "## Memory of this run",
        "",
        f"Peak resident memory of the benchmark process over the whole run (`VmHWM`, every model, activation, copy "
        f"and the Python runtime): **{_fmt(memory['process_peak_mib'], 0)} MiB**"
        + (f" of the machine's {machine:,.0f} MiB." if machine else "."),
        "",
    ]
    if memory["stages"]:
        lines.append(
            markdown_table(
                ["stage", "resident (MiB)", "peak so far (MiB)"],
                [[s["stage"], _fmt(s["rss_mib"], 0), _fmt(s["peak_mib"], 0)] for s in memory["stages"]],
            )
        )
    return lines


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
        f"{list(scale['keep_layers'])}. {_schedule_markdown(scale)} Peak memory: extra memory at the peak of a call "
        "above what was allocated before it (CUDA: max_memory_allocated; CPU: peak resident set via /proc VmHWM), "
        "weights listed apart. Params, MACs and FLOPs are counted on the meta device. On the CPU every VAE runs in "
        "channels_last, as `tinysr upscale` runs them.",
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
    header = ["group", "part", "model", "latency (ms)", "peak extra memory (MiB)", "weights (MiB)"]
    table = [
        [_group_label(r), r["component"], r["model"], _fmt(r["latency_ms"]), _fmt(r["peak_extra_mib"]),
         _fmt(r["weights_mib"])]
        for r in rows
    ]  # fmt: skip
    if scale["schedule"] != "interleaved":
        header.append("before / after teacher (ms)")
        for line, r in zip(table, rows):
            line.append(" / ".join(_fmt(value) for value in r["latency_ms_rounds"]) if r["model"] != TEACHER else "")
    lines.append(markdown_table(header, table, align="lll" + "r" * (len(header) - 3)))
    split = [r for r in rows if len(r["latency_ms_rounds"]) == 2]
    if split:
        worst = max(split, key=_drift)
        lines += [
            f"Largest gap between a student's medians before and after the teacher: {_drift(worst):.0%} "
            f"({_group_label(worst)}, {worst['component']}, {worst['model']}).",
            "",
        ]
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
    if results["best_ratios"]:
        lines += [
            "## Each in its best setting",
            "",
            "Per part, the teacher's fastest group against the fastest student (either variant, any group), both "
            "from this run on this machine.",
            "",
            markdown_table(
                ["part", "teacher group", "teacher (ms)", "student", "student group", "student (ms)", "speed-up"],
                [
                    [r["component"], r["teacher_group"], _fmt(r["teacher_latency_ms"]), r["student"],
                     r["student_group"], _fmt(r["student_latency_ms"]), _fmt(r["speedup"], 2) + "x"]
                    for r in results["best_ratios"]
                ],
                align="llrllrr",
            ),  # fmt: skip
        ]
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
    lines += _memory_markdown(results["memory"])
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
    command: str, progress: Callable[[str], None] = print, models: Sequence[str] = tuple(MODELS.values()),
) -> dict:
    """Count `models`, run the comparison and the sweep, and return everything the reports need, with the memory
    the process held along the way."""
    device = torch.device(device)
    memory_log = MemoryLog()
    memory_log("start")
    counts = count_all(scale, models)
    memory_log("counted on the meta device")
    source = ModelSource(scale, models)
    if scale.schedule == "interleaved":
        memory_log("all models built")
    rows = compare(source, scale, device, dtypes, compile_dtypes, counts, memory_log, progress)
    sweep_rows = []
    for model in scale.sweep_models if scale.sweep_sizes else ():
        if model in source.models:
            sweep_rows += sweep(source.build([model]), scale, device, dtypes[0], progress)
            release_free_memory(full=True)
            memory_log(f"sweep {model}: measured and freed")
    del source
    release_free_memory(full=True)
    memory_log("end")
    peak = process_peak_mib()
    return {
        "command": command,
        "environment": environment(device),
        "scale": asdict(scale),
        "models": [model for model in MODELS.values() if model in models],
        "transformer_config": transformer_config(scale),
        "vae_config": vae_config(scale),
        "tiny_vae_config": tiny_vae_config(scale),
        "comparison": rows,
        "ratios": ratios(rows),
        "best_ratios": best_ratios(rows),
        "sweep": sweep_rows,
        "memory": {
            "process_peak_mib": None if peak is None else round(peak, 1),
            "machine_mib": machine_memory_mib(),
            "stages": memory_log.stages,
        },
    }


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Widths / 8, 4 of 8 layers, 256 px (2 CPU cores).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="fp32,fp16,bf16", help="Comma-separated, from fp32, fp16, bf16.")
    parser.add_argument(
        "--models", default=",".join(MODELS),
        help="Comma-separated models to build and measure, from teacher, tinysr, tinysr-folded (default: all; the "
        "ratios need the teacher). Fewer models take less time and memory: one at a time, the peak is the fp32 "
        "teacher (built to cut the students from, even without `teacher`) or the largest model measured, plus its "
        "activations.",
    )
    parser.add_argument(
        "--schedule", choices=SCHEDULES,
        help="interleaved: every model held at once, all cases of a group run in turn (default with --quick); "
        "one-at-a-time: one model held at a time, the students measured before and after the teacher (default at "
        "full size, where the fp32 teacher and copies of it do not fit in 24 GB).",
    )
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
    models = [MODELS[name] for name in _names(args.models, MODELS, "--models")]
    if not models:
        raise SystemExit("--models: give at least one")
    overrides = {} if args.schedule is None else {"schedule": args.schedule}
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

    command = command_line("benchmarks.efficiency", argv)
    results = run(scale, device, dtypes, compile_dtypes, command, models=models)
    directory = os.path.join(args.output_dir, f"{scale.name}-{device.type}")
    for path in write_results(results, directory):
        print(f"[efficiency] wrote {path}")
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
