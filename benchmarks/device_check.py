"""One prepared GPU check (issue 26): TinySR's device-specific paths and the paper's speed figures in one call.

    python -m benchmarks.device_check --out DIR [--smoke] [--steps NAME,...] [--budget-s N] [--device cuda]
    bash benchmarks/device_check.sh  # on the bare GPU machine: installs the carried wheels, then runs this

A GPU session is short (15 minutes of device time, 10 minutes a command), so everything it should learn runs in one
command. The steps, in order of importance (`STEPS`), each in a process of its own under a time box, so that a
hang, a crash or a broken CUDA context costs that step only; a step that no longer fits the global budget
(`--budget-s`) is skipped:

1. `paper`: the paper's architectures with random weights, built directly on the device by `benchmarks.efficiency`:
   TSD-SR and TinySR at a 512-px output, batch 1, fp16 and bf16, eager, interleaved (every case once per round,
   in a rotating order), median of `--repeats` after warm-up; TinySR's parts (transformer, VAE encode, decode) and
   its batch-32 throughput; then both again in bf16 after `compile_pipeline`, the first calls' time reported.
2. `default_model`: `TinySRPipeline.from_pretrained()` from 512 to 4096-px outputs with `tile_size="auto"` and 64:
   latency and peak memory; its bf16 output against strict float32 (PSNR).
3. `cli_demo`: `tinysr upscale --device DEVICE` on a folder of photos, and `tinysr demo` answering two requests: the
   app's own loading and request function (`upscale_file`), as gradio is not on the GPU machine and too large to
   carry there.
4. `oom`: the out-of-memory fallback provoked by a real allocation limit (`set_per_process_memory_fraction`): its
   warnings, and its output against an unconstrained run with the tiles it settled on.
5. `training`: every stage (teacher, vae_encoder, vae_decoder, prune, latent, pixel) for a few steps of the tests'
   tiny models under `accelerate launch --mixed_precision bf16`, then resumed; the latent stage under FSDP with one
   process (`training/accelerate_configs/fsdp.yaml`).
6. `pytest`: `pytest -m cuda` on the test files that carry the marker.

`--out` (default `$OUT`) receives `device_check.json`, rewritten atomically after every step (each step `ok`,
`failed` or `skipped`, its error on one line, its figures and its progress when a time box stopped it),
`device_check.md` (the tables and the issue's aims) and `device_check.log` (every step's output). `--smoke` runs
every step on the CPU at tiny sizes (tiny models, 2 repeats, a step or two of training, compilation without code
generation), so that a mistake here cannot waste a GPU session (tests/test_device_check.py).
"""

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from tinysr_diffusers.loading import one_line  # standard library only
from tinysr_diffusers.utils import atomic_write_text, write_json  # standard library only


if TYPE_CHECKING:
    import torch


ROOT = Path(__file__).resolve().parents[1]
MODULE = "benchmarks.device_check"
JSON_NAME, MARKDOWN_NAME, LOG_NAME = "device_check.json", "device_check.md", "device_check.log"
DEFAULT_BUDGET_S = {"gpu": 480.0, "smoke": 1800.0}
SMOKE_TIME_BOX_S = 600.0  # per step on a busy 2-core CPU
MIN_STEP_S = 20.0  # a step is skipped when less of the global budget is left
MARGIN_S = 5.0  # a step ends its own commands this long before its time box, to record why
TRAIN_STAGES = ("teacher", "vae_encoder", "vae_decoder", "prune", "latent", "pixel")
PAPER_AIMS = {"latency_ms": 5.0, "speedup": 5.68, "images_per_s": 300.0}  # issue 26, on an H100 in bf16


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    time_box_s: float  # on the GPU; every step gets SMOKE_TIME_BOX_S with --smoke


STEPS = (
    Step("paper", "TSD-SR vs TinySR: the paper's architectures, random weights", 240),
    Step("default_model", "the default model from 512 to 4096 px: latency, peak memory, bf16 PSNR", 90),
    Step("cli_demo", "`tinysr upscale` on a folder of photos and the demo's request", 60),
    Step("oom", "the out-of-memory fallback under a real allocation limit", 60),
    Step("training", "every training stage under bf16 with resume, and FSDP with one process", 150),
    Step("pytest", "pytest -m cuda", 120),
)


class CheckFailed(AssertionError):
    """A step ran, but what it checks did not hold (or its time box ran out)."""


@dataclass
class Settings:
    """What a step's process is told by the check."""

    device: str
    smoke: bool
    work_dir: str
    deadline: float  # time.time() at which the step's time box ends
    repeats: int
    compile_mode: Optional[str]

    def time_left(self) -> float:
        return max(self.deadline - time.time() - MARGIN_S, 1.0)


class StepRecord(dict):
    """A step's results, saved atomically at every milestone, so that a step stopped by its time box keeps them."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def save(self) -> None:
        write_json(self.path, self)

    def progress(self, what: str) -> None:
        self["progress"] = what
        self.save()
        print(f"[device_check] {what}", flush=True)


# ---------------------------------------------------------------------------------------------------------- helpers
def _device(settings: Settings) -> "torch.device":
    import torch

    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckFailed("--device cuda: torch sees no CUDA device here (use --smoke on a CPU)")
    return device


def _describe_device(record: StepRecord, device: "torch.device") -> None:
    import torch

    record["device"] = str(device)
    record["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _synchronize(device: "torch.device") -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: "torch.device") -> None:
    import torch

    from benchmarks.memory import release_free_memory

    release_free_memory(full=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_calls(calls: Sequence[Callable[[], object]], device: "torch.device", warmup: int, repeats: int) -> list:
    """Latencies in ms of every call, interleaved: each round runs all of them once, in an order rotated per round,
    so that drift slows all alike. Nothing runs between timed calls (no memory probe: on CUDA it empties the
    allocator's cache, and a millisecond model then pays for cudaMalloc)."""
    import torch

    with torch.no_grad():
        for _ in range(warmup):
            for call in calls:
                call()
        latencies = [[] for _ in calls]
        for round_index in range(repeats):
            shift = round_index % len(calls)
            for index in [*range(shift, len(calls)), *range(shift)]:
                _synchronize(device)
                start = time.perf_counter()
                calls[index]()
                _synchronize(device)
                latencies[index].append((time.perf_counter() - start) * 1e3)
    return latencies


def peak_extra_mib(call: Callable[[], object], device: "torch.device") -> Optional[float]:
    """The extra memory one call needs at its peak (`benchmarks.memory.PeakMemory`), in MiB."""
    import torch

    from benchmarks.memory import PeakMemory

    memory = PeakMemory(device)
    with torch.no_grad():
        memory.start()
        call()
        peak = memory.stop()
    return None if peak is None else round(peak, 1)


def psnr(actual, expected) -> Optional[float]:
    """PSNR in dB of two float images in [0, 1]; None when they are equal."""
    import numpy as np

    mse = float(np.mean((np.asarray(actual, np.float64) - np.asarray(expected, np.float64)) ** 2))
    return None if mse == 0 else round(10 * np.log10(1 / mse), 2)


@contextlib.contextmanager
def strict_float32():
    """float32 matrix products and convolutions without TF32 (CUDA's convolutions default to it): the reference."""
    import torch

    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _child_env() -> dict:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""), "PYTHONUNBUFFERED": "1"}


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def run_command(command: Sequence[str], timeout: float) -> tuple[int, str]:
    """Run `command` in the repository root within `timeout`; returns its exit code and output (stdout and stderr,
    also copied to this step's log). Raises `CheckFailed` when it runs out of time: it is killed, and whatever it
    started ends with this step's process group when the step ends (`run_child`)."""
    print(f"$ {shlex.join(command)}", flush=True)
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=_child_env(), stdout=output, stderr=subprocess.STDOUT)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            returncode = None
        output.seek(0)
        text = output.read()
    sys.stdout.write(text)
    sys.stdout.flush()
    if returncode is None:
        raise CheckFailed(f"`{shlex.join(command[:6])} ...` ran out of its time box ({timeout:.0f} s): "
                          f"{_last_line(text)}")
    return returncode, text


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> dict:
    return {"title": title, "header": list(header), "rows": [[_cell(value) for value in row] for row in rows]}


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.2f}" if value == 0 or abs(value) >= 1 else f"{value:.3g}"
    return str(value)


def _align(rows: Sequence[Sequence[str]], columns: int) -> str:
    """Right-aligned columns for numbers, left for text."""
    numeric = re.compile(r"^(n/a|-?[\d,]+(\.\d+)?(e-?\d+)?)$")
    return "".join("r" if all(numeric.match(row[i]) for row in rows) else "l" for i in range(columns))


def _aim(aim: str, value: Optional[float], target: str, met: Optional[bool]) -> dict:
    return {"aim": aim, "value": value, "target": target, "met": met}


# ------------------------------------------------------------------------------------------------- 1. paper figures
def paper_scale(settings: Settings):
    """`efficiency.FULL` (the paper's sizes) held at once and interleaved, or a tiny scale with --smoke."""
    from benchmarks import efficiency

    if settings.smoke:
        return replace(efficiency.QUICK, name="smoke", width_divisor=24, num_layers=2, keep_layers=(1,),
                       output_size=64, text_tokens=5, repeats=settings.repeats, warmup=1, sweep_sizes=(),
                       note="Smoke: tiny widths, 2 layers, 64 px; not the paper's figures.")
    return replace(efficiency.FULL, name="paper", repeats=settings.repeats, warmup=5, sweep_sizes=(),
                   schedule="interleaved", note="The paper's architectures at full size, every model held at once.")


def paper_cases(pipelines: dict, scale, device: "torch.device", dtype: "torch.dtype", batch: int) -> list:
    """`efficiency.cases` (whole call, transformer, VAE encode + decode of each model) and, for TinySR, the VAE's
    encode and decode apart and a whole call on a batch."""
    import torch

    from benchmarks import efficiency

    group = efficiency.cases(pipelines, scale.output_size, device, dtype)
    student = pipelines.get(efficiency.STUDENT)
    if student is not None:
        generator = torch.Generator().manual_seed(1)
        side = scale.output_size
        channels = student.transformer.config.in_channels
        pixels = (torch.rand(1, 3, side, side, generator=generator) * 2 - 1).to(device, dtype)
        latents = torch.randn(1, channels, side // 8, side // 8, generator=generator).to(device, dtype)
        batch_input = torch.rand(batch, 3, side // 4, side // 4, generator=generator).to(device)
        group += [
            efficiency.Case("vae encode", efficiency.STUDENT, lambda: student.encode_latents(pixels)),
            efficiency.Case("vae decode", efficiency.STUDENT, lambda: student.decode_latents(latents)),
            efficiency.Case(f"pipeline, batch {batch}", efficiency.STUDENT,
                            lambda: student(batch_input, output_type="pt", tile_size=None).images),
        ]  # fmt: skip
    return group


def measure_paper(pipelines: dict, scale, device: "torch.device", dtype_name: str, compiled: bool,
                  batch: int) -> list[dict]:
    """Every case of `pipelines` (placed) timed together, then one call each for its peak memory."""
    from benchmarks import efficiency

    group = paper_cases(pipelines, scale, device, efficiency.DTYPES[dtype_name], batch)
    latencies = time_calls([case.fn for case in group], device, scale.warmup, scale.repeats)
    rows = []
    for case, runs in zip(group, latencies):
        median = statistics.median(runs)
        row = {"group": dtype_name + (" + compile" if compiled else ""), "dtype": dtype_name, "compiled": compiled,
               "part": case.component, "model": case.model, "latency_ms": round(median, 3),
               "runs_ms": [round(value, 3) for value in runs], "peak_extra_mib": peak_extra_mib(case.fn, device)}
        if case.component.startswith("pipeline, batch"):
            row["images_per_s"] = round(batch * 1e3 / median, 1)
        rows.append(row)
    return rows


def paper_findings(rows: list[dict], compile_s: dict, smoke: bool) -> dict:
    """The paper step's table, aims and one-line summary from its rows so far."""
    from benchmarks.efficiency import STUDENT, TEACHER

    latency = {(r["group"], r["part"], r["model"]): r["latency_ms"] for r in rows}
    groups = list(dict.fromkeys(r["group"] for r in rows))
    parts = list(dict.fromkeys(r["part"] for r in rows))
    table = []
    for group in groups:
        for part in parts:
            teacher, student = latency.get((group, part, TEACHER)), latency.get((group, part, STUDENT))
            if student is not None or teacher is not None:
                ratio = round(teacher / student, 2) if teacher and student else None
                table.append([group, part, teacher, student, ratio])
    bf16 = [g for g in groups if g.startswith("bf16")]
    student_ms = {g: latency[(g, "pipeline", STUDENT)] for g in bf16 if (g, "pipeline", STUDENT) in latency}
    speedups = {g: round(latency[(g, "pipeline", TEACHER)] / ms, 2) for g, ms in student_ms.items()
                if (g, "pipeline", TEACHER) in latency}
    throughput = {r["group"]: r["images_per_s"] for r in rows if "images_per_s" in r and r["group"] in bf16}
    best_ms = min(student_ms.values(), default=None)
    best_speedup = max(speedups.values(), default=None)
    best_throughput = max(throughput.values(), default=None)
    scale = " (smoke: tiny models, not the paper's)" if smoke else ""
    aims = [
        _aim(f"TinySR 512 px, batch 1, bf16, best of eager/compiled (ms){scale}", best_ms,
             f"<= {PAPER_AIMS['latency_ms']:g}", None if best_ms is None else best_ms <= PAPER_AIMS["latency_ms"]),
        _aim(f"TSD-SR / TinySR whole call, bf16, same group{scale}", best_speedup, f">= {PAPER_AIMS['speedup']:g}",
             None if best_speedup is None else best_speedup >= PAPER_AIMS["speedup"]),
        _aim(f"TinySR batch throughput, bf16 (images/s){scale}", best_throughput,
             f">= {PAPER_AIMS['images_per_s']:g}",
             None if best_throughput is None else best_throughput >= PAPER_AIMS["images_per_s"]),
    ]
    summary = "; ".join(
        [f"TinySR {g}: {ms:.2f} ms ({speedups.get(g, 'n/a')}x TSD-SR)" for g, ms in student_ms.items()]
        + [f"{g} batch: {value:.0f} img/s" for g, value in throughput.items()]
        + [f"compile {model}: {seconds:.0f} s" for model, seconds in compile_s.items()]
    )
    header = ["group", "part", "TSD-SR (ms)", "TinySR (ms)", "speed-up"]
    return {"tables": [_table("Latency (median, interleaved)", header, table)], "aims": aims, "summary": summary}


def step_paper(settings: Settings, record: StepRecord) -> None:
    import torch

    from benchmarks import efficiency
    from benchmarks.efficiency import STUDENT, TEACHER
    from tinysr_diffusers.devices import compile_pipeline

    device = _device(settings)
    _describe_device(record, device)
    scale = paper_scale(settings)
    batch = 2 if settings.smoke else 32
    models = [STUDENT, TEACHER]  # the student first: its compiled figures come before the teacher's compilation
    record.update(scale=asdict(scale), batch=batch, rows=[], compile_s={})
    record.progress(f"building TSD-SR and TinySR ({scale.name}, fp32, random weights) on {device}")
    with torch.device(device):  # straight onto the GPU: no 8 GiB copy from the CPU
        source = efficiency.ModelSource(scale, models)

    for dtype_name in ("fp16", "bf16"):
        record.progress(f"eager {dtype_name}: {scale.warmup} warm-up + {scale.repeats} interleaved rounds")
        pipelines = source.build(models)
        efficiency._place(pipelines, device, efficiency.DTYPES[dtype_name], compiled=False)
        record["rows"] += measure_paper(pipelines, scale, device, dtype_name, False, batch)
        del pipelines
        _free(device)
        record.update(paper_findings(record["rows"], record["compile_s"], settings.smoke))
        record.save()

    # --smoke: compile_pipeline is called, but the compiled modules run eagerly (no code generation on 2 cores).
    stance = torch.compiler.set_stance("force_eager") if settings.smoke else contextlib.nullcontext()
    record["compile"] = {"dtype": "bf16", "mode": settings.compile_mode, "force_eager": settings.smoke}
    pipelines = source.build(models)
    efficiency._place(pipelines, device, torch.bfloat16, compiled=False)
    compiled: dict = {}
    with stance:
        for model in models:
            record.progress(f"compile_pipeline({model}, bf16) and its first calls")
            compiled[model] = compile_pipeline(pipelines[model], mode=settings.compile_mode)
            first_calls = [case.fn for case in paper_cases(compiled, scale, device, torch.bfloat16, batch)
                           if case.model == model]
            first_ms = sum(runs[0] for runs in time_calls(first_calls, device, 0, 1))
            record["compile_s"][model] = round(first_ms / 1e3, 1)
            record.progress(f"bf16 + compile: {', '.join(compiled)} interleaved")
            rows = [row for row in record["rows"] if not row["compiled"]]
            record["rows"] = rows + measure_paper(compiled, scale, device, "bf16", True, batch)
            record.update(paper_findings(record["rows"], record["compile_s"], settings.smoke))
            record.save()
    torch.compiler.reset()


# ------------------------------------------------------------------------------------------------ 2. default model
def step_default_model(settings: Settings, record: StepRecord) -> None:
    import torch

    from tests.tiny_pipelines import photo
    from tinysr_diffusers import TinySRPipeline
    from tinysr_diffusers.devices import auto_dtype, optimize_for_cpu

    device = _device(settings)
    _describe_device(record, device)
    sizes, tile, overlap = ((64, 128), 8, 2) if settings.smoke else ((512, 1024, 2048, 4096), 64, 8)

    def load(dtype: "torch.dtype") -> TinySRPipeline:
        pipe = optimize_for_cpu(TinySRPipeline.from_pretrained(dtype=dtype).to(device))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    dtype = auto_dtype(device)
    pipe = load(dtype)
    record.update(dtype=str(dtype), output_type="pil", rows=[])
    for size in sizes:
        image = photo("astronaut", (size // 4, size // 4))
        repeats = 1 if settings.smoke else (10 if size <= 1024 else 3)
        for tile_size in ("auto", tile):
            record.progress(f"{size} px, tile_size={tile_size!r}: {repeats} run(s)")
            row = {"output_px": size, "tile_size": tile_size}

            def call(image=image, tile_size=tile_size):
                return pipe(image, tile_size=tile_size, tile_overlap=overlap, output_type="pil").images[0]

            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    output = call()  # warm-up
                    if output.size != (size, size):
                        raise CheckFailed(f"output {output.size}, expected {(size, size)}")
                    runs = time_calls([call], device, 0, repeats)[0]
                    row.update(latency_ms=round(statistics.median(runs), 2), runs_ms=[round(v, 2) for v in runs],
                               peak_extra_mib=peak_extra_mib(call, device))
                row["warnings"] = sorted({str(warning.message) for warning in caught})
            except Exception as error:  # noqa: BLE001 - recorded per case; the step fails after the others ran
                row["error"] = one_line(error)
            record["rows"].append(row)
            record.save()

    record.progress("bf16 against strict float32 (PSNR)")
    reference, bf16 = load(torch.float32), pipe if dtype == torch.bfloat16 else load(torch.bfloat16)
    record["psnr"] = []
    for size in sizes[:2]:
        image = photo("coffee", (size // 4, size // 4))
        with strict_float32():
            expected = reference(image, tile_size=tile, tile_overlap=overlap, output_type="np").images[0]
        actual = bf16(image, tile_size=tile, tile_overlap=overlap, output_type="np").images[0]
        record["psnr"].append({"output_px": size, "tile_size": tile, "psnr_db": psnr(actual, expected),
                               "max_abs": round(float(abs(actual - expected).max()), 4)})
    rows = record["rows"]
    record["tables"] = [
        _table(f"Latency and peak memory ({record['dtype']}, PIL output)",
               ["output (px)", "tile_size", "latency (ms)", "peak extra (MiB)", "note"],
               [[r["output_px"], r["tile_size"], r.get("latency_ms"), r.get("peak_extra_mib"),
                 r.get("error") or "; ".join(r["warnings"])] for r in rows]),
        _table("bf16 against strict float32", ["output (px)", "tile_size", "PSNR (dB)", "max abs"],
               [[p["output_px"], p["tile_size"], p["psnr_db"], p["max_abs"]] for p in record["psnr"]]),
    ]  # fmt: skip
    timed = [r for r in rows if "latency_ms" in r]
    record["summary"] = "; ".join(f"{r['output_px']} px {r['tile_size']}: {r['latency_ms']:.0f} ms" for r in timed)
    failed = [f"{r['output_px']} px tile_size={r['tile_size']!r}: {r['error']}" for r in rows if "error" in r]
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(rows)} cases failed, first: {failed[0]}")


# ---------------------------------------------------------------------------------------------------- 3. CLI, demo
def step_cli_demo(settings: Settings, record: StepRecord) -> None:
    import argparse

    import PIL.Image

    from tests.tiny_pipelines import photo
    from tinysr_diffusers.demo import configure_parser, upscale_file
    from tinysr_diffusers.loading import load_pipeline_from_args

    device = _device(settings)
    _describe_device(record, device)
    photos, upscaled = Path(settings.work_dir) / "photos", Path(settings.work_dir) / "upscaled"
    photos.mkdir(parents=True, exist_ok=True)
    side = 24 if settings.smoke else 256
    sizes = {}
    for name in ("astronaut", "camera", "chelsea", "coffee", "rocket"):  # camera: greyscale
        image = photo(name)
        image.thumbnail((side, side))
        image.save(photos / f"{name}.png")
        sizes[name] = image.size

    # the module of the `tinysr` console script, which is not installed on the GPU machine
    command = [sys.executable, "-m", "tinysr_diffusers.cli", "upscale", str(photos), "-o", str(upscaled),
               "--device", str(device), "--verbose", "--overwrite"]
    record.progress(f"tinysr upscale --device {device} on {len(sizes)} photos")
    start = time.perf_counter()
    returncode, output = run_command(command, settings.time_left())
    record["upscale"] = {"command": shlex.join(["tinysr", *command[3:]]), "returncode": returncode,
                         "wall_s": round(time.perf_counter() - start, 2), "photos": len(sizes)}
    record.save()
    if returncode != 0:
        raise CheckFailed(f"tinysr upscale exited with {returncode}: {_last_line(output)}")
    for name, (width, height) in sizes.items():
        with PIL.Image.open(upscaled / f"{name}.png") as result:
            if result.size != (4 * width, 4 * height):
                raise CheckFailed(f"tinysr upscale wrote {name}.png at {result.size}, not 4x {width}x{height}")

    record.progress(f"tinysr demo --device {device}: two requests")
    args = configure_parser(argparse.ArgumentParser()).parse_args(["--device", str(device)])
    pipe = load_pipeline_from_args(args)  # as `demo.launch` loads it
    pipe.set_progress_bar_config(disable=True)
    seconds = []
    for _ in range(2):  # the first request pays for the model's first call
        result = upscale_file(pipe, photos / "chelsea.png")  # what the app's button runs
        if result["output"].size != tuple(4 * side for side in sizes["chelsea"]):
            raise CheckFailed(f"the demo answered {result['output'].size} for a {sizes['chelsea']} input")
        seconds.append(round(result["seconds"], 3))
    record["demo"] = {"device": str(pipe._execution_device), "dtype": str(pipe.transformer.dtype),
                      "request_s": seconds}
    record["summary"] = (f"upscale: {len(sizes)} photos in {record['upscale']['wall_s']:.1f} s (load included); "
                         f"demo on {record['demo']['device']} ({record['demo']['dtype']}): "
                         f"{seconds[0]:.3f} s, then {seconds[1]:.3f} s")


# ---------------------------------------------------------------------------------------------------- 4. OOM fallback
OOM_WARNING = re.compile(r"retrying with tile_size=(\d+), tile_overlap=(\d+), tile_batch_size=(\d+)")


def _reserved_peak_mib(call: Callable[[], object]) -> float:
    """How far the caching allocator's reserve grows during `call` (what a memory fraction limits), in MiB."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_reserved() - before) / 2**20


@contextlib.contextmanager
def _allocation_limit(limit_bytes: float, device: "torch.device"):
    """The caching allocator may reserve at most `limit_bytes` on `device` (a real limit: larger allocations raise
    CUDA's out-of-memory error); lifted afterwards."""
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(limit_bytes / total, device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


@contextlib.contextmanager
def _simulated_limit(pipe, max_side: int):
    """A CPU stand-in for an allocation limit (--smoke): the transformer raises CUDA's out-of-memory error for
    latent tiles larger than `max_side`, as tests/test_pipelines.py does."""
    import torch

    predict = pipe.predict_velocity

    def predict_velocity(latents, transformer=None):
        if max(latents.shape[-2:]) > max_side:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated: no CUDA here)")
        return predict(latents, transformer)

    pipe.predict_velocity = predict_velocity
    try:
        yield
    finally:
        del pipe.predict_velocity


def oom_fallback(pipe, image) -> dict:
    """Upscale `image` with `tile_size="auto"` (the whole image as one tile on CUDA) under an allocation limit halfway
    between what the whole image and a 64-tile need, then again unconstrained with the tiles the fallback settled on.

    Returns the limit, the fallback's warnings and settings, and the largest difference of the two outputs (float
    in [0, 1]). On the CPU the limit is simulated (`_simulated_limit`), from a whole-image tile."""
    import numpy as np
    import torch

    device = pipe._execution_device
    call = {"output_type": "np", "tile_overlap": 8}
    whole = pipe._latent_side(image.size[::-1])
    result: dict = {"latent_side": whole}
    if device.type == "cuda":
        start = "auto"
        pipe(image, tile_size=start, **call)  # the one-time allocations (cuBLAS, cuDNN) are not the image's
        whole_mib = _reserved_peak_mib(lambda: pipe(image, tile_size=start, **call))
        tile_mib = _reserved_peak_mib(lambda: pipe(image, tile_size=64, tile_batch_size=1, **call))
        if whole_mib < 1.5 * tile_mib:
            raise CheckFailed(f"the whole image needs {whole_mib:.0f} MiB and a 64-tile {tile_mib:.0f} MiB: too "
                              "close to set a limit between them; use a larger image")
        torch.cuda.empty_cache()
        limit = torch.cuda.memory_reserved() + (whole_mib + tile_mib) / 2 * 2**20
        result.update(whole_image_mib=round(whole_mib, 1), tile_64_mib=round(tile_mib, 1),
                      limit_mib=round(limit / 2**20, 1), limit="set_per_process_memory_fraction")
        limited = _allocation_limit(limit, device)
    else:
        start = whole
        result.update(limit=f"simulated: latent tiles above {whole // 2} raise out-of-memory")
        limited = _simulated_limit(pipe, whole // 2)
    with limited, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = pipe(image, tile_size=start, **call).images
    messages = [str(w.message) for w in caught if "Out of memory with" in str(w.message)]
    result["warnings"] = messages
    if not messages:
        return result
    tile_size, tile_overlap, tile_batch_size = map(int, OOM_WARNING.search(messages[-1]).groups())
    result["settled_on"] = {"tile_size": tile_size, "tile_overlap": tile_overlap, "tile_batch_size": tile_batch_size}
    expected = pipe(image, output_type="np", tile_size=tile_size, tile_overlap=tile_overlap,
                    tile_batch_size=tile_batch_size).images
    result["max_abs_diff"] = float(np.abs(output - expected).max())
    return result


def step_oom(settings: Settings, record: StepRecord) -> None:
    from tests.tiny_pipelines import photo
    from tinysr_diffusers import TinySRPipeline
    from tinysr_diffusers.devices import auto_dtype

    device = _device(settings)
    _describe_device(record, device)
    pipe = TinySRPipeline.from_pretrained(dtype=auto_dtype(device)).to(device)
    pipe.set_progress_bar_config(disable=True)
    side = 64 if settings.smoke else 256  # 1024 px out: a whole-image tile is the transformer's largest (128)
    record.progress(f"tile_size='auto' on a {side} px photo under a limit")
    result = oom_fallback(pipe, photo("chelsea", (side, side)))
    record.update(input_px=side, dtype=str(pipe.transformer.dtype), **result)
    found = bool(result["warnings"]) and result["settled_on"]["tile_size"] < result["latent_side"]
    equal = found and result["max_abs_diff"] <= 1e-2
    record["aims"] = [_aim("the out-of-memory fallback finds a tile that fits", result.get("max_abs_diff"),
                           "output within 1e-2 of an unconstrained run", equal)]
    if not found:
        raise CheckFailed(f"no out-of-memory fallback under the limit ({result['limit']}): warnings "
                          f"{result['warnings']}")
    record["summary"] = (f"{len(result['warnings'])} warning(s), settled on {result['settled_on']}; "
                         f"max abs diff to an unconstrained run {result['max_abs_diff']:.2e}")
    if not equal:
        raise CheckFailed(f"the fallback's output differs from an unconstrained run by {result['max_abs_diff']:.3g}")


# ------------------------------------------------------------------------------------------------------ 5. training
TRAIN_SETTINGS = {  # what tests/test_training.py's tiny runs add per stage (`config_for` does the rest)
    "teacher": ["lora_rank=0", "lpips_weight=0.1", "decode_crop=4", "decode_samples=1"],
    "vae_encoder": [],
    "vae_decoder": ["lpips_weight=1", "gan_weight=0.1"],
    "prune": ["prune.keep=2", "prune.block_size=2"],
    "latent": [],
    "pixel": ["lpips_weight=1", "gan_weight=0.1"],
}


def train_worker(work_dir: str, stages: Sequence[str], results_path: str, smoke: bool) -> int:
    """What `accelerate launch` runs for the training step: each stage of the tests' tiny models for a few steps,
    then resumed from its latest checkpoint for more; `results_path` (JSON) is rewritten after every stage."""
    import math

    from accelerate.state import AcceleratorState

    from tests.test_training import config_for, make_assets
    from training.distill import train

    root = Path(work_dir)
    root.mkdir(parents=True, exist_ok=True)
    assets = make_assets(root)  # a saved tiny teacher, photos (one corrupt) and a tiny student VAE
    steps = 1 if smoke else 3
    results = []
    for stage in stages:
        entry: dict = {"stage": stage}
        start = time.perf_counter()
        common = [*TRAIN_SETTINGS[stage], "hr_size=64", "checkpointing_steps=1"]
        try:
            first = train(config_for(assets, stage, root / "runs" / stage, *common, f"max_steps={steps}"))
            resumed = train(config_for(assets, stage, root / "runs" / stage, *common, f"max_steps={2 * steps}",
                                       "resume_from_checkpoint=latest"))
            state = AcceleratorState()
            losses = first.get("losses", []) + resumed.get("losses", [])
            entry.update(steps=first["step"], resumed_to=resumed["step"], losses=losses, device=str(state.device),
                         mixed_precision=state.mixed_precision, distributed_type=state.distributed_type.value,
                         exported=os.path.isdir(resumed["export"]))
            if resumed["step"] != 2 * steps or not all(map(math.isfinite, losses)) or not entry["exported"]:
                raise CheckFailed(f"resumed to step {resumed['step']} (expected {2 * steps}), losses {losses}, "
                                  f"export {'written' if entry['exported'] else 'missing'}")
        except Exception as error:  # noqa: BLE001 - recorded; the next stage still runs
            traceback.print_exc()
            entry["error"] = one_line(error)
        entry["seconds"] = round(time.perf_counter() - start, 1)
        results.append(entry)
        write_json(results_path, results)
    return 0 if all("error" not in entry for entry in results) else 1


def step_training(settings: Settings, record: StepRecord) -> None:
    folder = Path(settings.work_dir) / "training"
    device_type = settings.device.split(":")[0]
    # FSDP goes through torchrun (accelerate's multi-GPU launcher), with --smoke too, where accelerate then runs one
    # undistributed CPU process; on the GPU it must run as FSDP.
    launches = {
        "bf16": (["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend",
                  "no", *(["--cpu"] if device_type == "cpu" else [])], TRAIN_STAGES, "NO"),
        "fsdp": (["--config_file", "training/accelerate_configs/fsdp.yaml", "--num_processes", "1"], ("latent",),
                 "NO" if device_type == "cpu" else "FSDP"),
    }  # fmt: skip
    record["launches"] = {}
    failures, rows, resumed_in_bf16 = [], [], 0
    for name, (options, stages, distributed) in launches.items():
        results_path = folder / f"{name}.json"
        command = [sys.executable, "-m", "accelerate.commands.launch", *options, "-m", MODULE, "--train-worker",
                   "--work-dir", str(folder / name), "--stages", ",".join(stages), "--results", str(results_path),
                   *(["--smoke"] if settings.smoke else [])]  # fmt: skip
        record.progress(f"accelerate launch ({name}): {', '.join(stages)}")
        returncode, output = run_command(command, settings.time_left())
        results = json.loads(results_path.read_text()) if results_path.is_file() else []
        record["launches"][name] = {"command": shlex.join(["accelerate", "launch", *command[3:]]),
                                    "returncode": returncode, "stages": results}
        record.save()
        for entry in results:
            ran = [entry.get("mixed_precision"), str(entry.get("device")).split(":")[0], entry.get("distributed_type")]
            if "error" in entry:
                failures.append(f"{name} {entry['stage']}: {entry['error']}")
            elif ran != ["bf16", device_type, distributed]:
                failures.append(f"{name} {entry['stage']}: ran as {ran}, not {['bf16', device_type, distributed]}")
            else:
                resumed_in_bf16 += name == "bf16"
            rows.append([name, entry["stage"], *ran, f"{entry.get('steps')} -> {entry.get('resumed_to')}",
                         entry["seconds"], entry.get("error", "ok")])
        if returncode != 0 and len(results) < len(stages):
            failures.append(f"{name}: accelerate launch exited with {returncode}: {_last_line(output)}")
    header = ["launch", "stage", "precision", "device", "distributed", "steps -> resumed", "s", "result"]
    record["tables"] = [_table("Training stages (tiny models)", header, rows)]
    record["aims"] = [_aim("every training stage runs under bf16 and resumes", resumed_in_bf16,
                           f"{len(TRAIN_STAGES)} stages", resumed_in_bf16 == len(TRAIN_STAGES))]
    record["summary"] = f"{len(rows)} stage runs, {len(failures)} problem(s)"
    if failures:
        raise CheckFailed("; ".join(failures[:3]))


# -------------------------------------------------------------------------------------------------------- 6. pytest
def step_pytest(settings: Settings, record: StepRecord) -> None:
    from xml.etree import ElementTree

    marked = re.compile(r"pytest\.mark\.cuda\b")
    files = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "tests").glob("test_*.py"))
             if marked.search(path.read_text(encoding="utf-8"))]
    if not files:
        raise CheckFailed("no test file carries the `cuda` marker")
    junit = Path(settings.work_dir) / "pytest.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", f"--junitxml={junit}", *files]
    record.progress(f"pytest -m cuda {' '.join(files)}")
    returncode, output = run_command(command, settings.time_left())
    record["pytest"] = {"command": shlex.join(["pytest", *command[3:4], "-m", "cuda", *files]),
                        "returncode": returncode}
    if not junit.is_file():
        raise CheckFailed(f"pytest exited with {returncode} and wrote no report: {_last_line(output)}")
    report = ElementTree.parse(junit).getroot()
    counts = {key: sum(int(suite.get(key, 0)) for suite in report.iter("testsuite"))
              for key in ("tests", "failures", "errors", "skipped")}
    problems = [f"{case.get('name')}: {' '.join((problem.get('message') or '').split())[:200]}"
                for case in report.iter("testcase") for problem in [*case.findall("failure"), *case.findall("error")]]
    record["pytest"].update(counts, problems=problems)
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    record["summary"] = f"{passed} passed, {counts['skipped']} skipped, {len(problems)} failed or errors"
    if returncode != 0:
        raise CheckFailed(f"pytest -m cuda exited with {returncode}: {'; '.join(problems[:3]) or _last_line(output)}")


STEP_FUNCTIONS: dict[str, Callable[[Settings, StepRecord], None]] = {
    "paper": step_paper,
    "default_model": step_default_model,
    "cli_demo": step_cli_demo,
    "oom": step_oom,
    "training": step_training,
    "pytest": step_pytest,
}


# ---------------------------------------------------------------------------------------------------------- the check
def child_main(name: str, settings: Settings) -> int:
    """Run one step in this process (the check starts it in a session of its own); its record is saved whatever
    happens, with the error on one line."""
    record = StepRecord(os.path.join(settings.work_dir, "steps", f"{name}.json"))
    try:
        STEP_FUNCTIONS[name](settings, record)
        record["status"] = "ok"
    except Exception as error:  # noqa: BLE001 - the step's result is its record
        traceback.print_exc()
        record.update(status="failed", error=one_line(error))
    record.save()
    return 0 if record["status"] == "ok" else 1


def run_child(command: Sequence[str], time_box_s: float, log_path: str) -> tuple[Optional[int], float]:
    """Run one step's process in a session of its own, its output appended to the log; returns its exit code (None
    when its time box ran out) and its seconds. Whatever it started is ended with it, so that nothing left over
    holds the GPU during the next step."""
    start = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n===== {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=ROOT, env=_child_env(), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode: Optional[int] = process.wait(timeout=time_box_s)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:  # also on SIGTERM or Ctrl-C of the check
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return returncode, time.perf_counter() - start


def _log_tail(path: str, size: int = 4096) -> str:
    with open(path, "rb") as log:
        log.seek(max(os.path.getsize(path) - size, 0))
        return log.read().decode("utf-8", "replace")


class Report:
    """`device_check.json` and `device_check.md` in `out`, rewritten atomically whenever a step ends."""

    def __init__(self, out: str, header: dict, steps: Sequence[Step]):
        os.makedirs(out, exist_ok=True)
        self.out, self.started = out, time.time()
        self.log_path = os.path.join(out, LOG_NAME)
        self.data = {**header, "elapsed_s": 0.0,
                     "steps": [{"name": step.name, "title": step.title, "status": "pending"} for step in steps]}

    def entry(self, name: str) -> dict:
        return next(entry for entry in self.data["steps"] if entry["name"] == name)

    def finish(self, step: Step, record_path: str, returncode: Optional[int], seconds: float, box: float) -> dict:
        """The step's entry from its record, or from how its process ended when it left none."""
        record = json.loads(Path(record_path).read_text()) if os.path.isfile(record_path) else {}
        status, error = record.pop("status", None), record.pop("error", None)
        progress = record.pop("progress", None)
        if returncode is None:
            status, error = "failed", f"its time box of {box:.0f} s ran out" + (f" during: {progress}" if progress
                                                                                 else "")
        elif status is None:
            status, error = "failed", f"exited with {returncode} and no result: {_last_line(_log_tail(self.log_path))}"
        entry = self.entry(step.name)
        entry.update(status=status, error=error, seconds=round(seconds, 1), time_box_s=round(box),
                     summary=record.pop("summary", None), aims=record.pop("aims", []),
                     tables=record.pop("tables", []), results=record)
        if record.get("device_name") and self.data["environment"].get("device_name") is None:
            self.data["environment"]["device_name"] = record["device_name"]
        return entry

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.time() - self.started, 1)
        write_json(os.path.join(self.out, JSON_NAME), self.data)
        atomic_write_text(os.path.join(self.out, MARKDOWN_NAME), to_markdown(self.data))


def run_check(steps: Sequence[Step], selected: Sequence[str], report: Report, work_dir: str, budget_s: float,
              time_boxes: dict[str, float], command: Callable[[Step, float], list[str]]) -> None:
    """Run the `selected` steps in order, each as `command(step, deadline)` under its time box (cut to what is left
    of `budget_s`), saving the report after each; a step whose time no longer fits is skipped."""
    end = time.time() + budget_s
    report.save()
    for step in steps:
        entry = report.entry(step.name)
        left = end - time.time()
        if step.name not in selected:
            entry.update(status="skipped", error="not in --steps")
        elif left < MIN_STEP_S:
            entry.update(status="skipped", error=f"the global budget of {budget_s:.0f} s is spent ({left:.0f} s left)")
        else:
            box = min(time_boxes[step.name], left)
            entry["status"] = "running"
            report.save()
            returncode, seconds = run_child(command(step, time.time() + box), box, report.log_path)
            record_path = os.path.join(work_dir, "steps", f"{step.name}.json")
            report.finish(step, record_path, returncode, seconds, box)
        report.save()
        print(f"[device_check] {step.name}: {entry['status']}"
              + (f" ({entry['seconds']} s)" if "seconds" in entry else "")
              + f" - {entry.get('error') or entry.get('summary') or ''}", flush=True)


def _escape(value) -> str:
    return _cell(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(data: dict) -> str:
    """The short report: one row a step, the issue's aims, then the steps' own tables."""
    from benchmarks.reporting import environment_markdown, markdown_table

    env = data["environment"]
    lines = [f"# TinySR device check: {env.get('device_name') or data['device']}", "",
             f"Command: `{data['command']}`", "", f"Machine: {environment_markdown(env)}", ""]
    if data["smoke"]:
        lines += ["**Smoke run** on the CPU at tiny sizes: it shows that every step runs, not the GPU's figures.", ""]
    lines += [(f"Global budget {data['budget_s']:.0f} s, elapsed {data['elapsed_s']:.0f} s. Details: {JSON_NAME}, "
               f"every step's output: {LOG_NAME}."), ""]
    lines.append(markdown_table(
        ["step", "status", "time (s)", "result"],
        [[entry["name"], entry["status"], _escape(entry.get("seconds")),
          _escape(entry.get("error") or entry.get("summary") or "")] for entry in data["steps"]],
        align="llrl"))  # fmt: skip
    aims = [aim for entry in data["steps"] for aim in entry.get("aims") or []]
    if aims:
        met = {True: "yes", False: "**no**", None: "n/a"}
        lines += ["## Aims (issue 26)", "", markdown_table(
            ["aim", "value", "target", "met"],
            [[_escape(aim["aim"]), _escape(aim["value"]), aim["target"], met[aim["met"]]] for aim in aims],
            align="lrll")]  # fmt: skip
    for entry in data["steps"]:
        for table in entry.get("tables") or []:
            rows = [[_escape(cell) for cell in row] for row in table["rows"]]
            align = _align(rows, len(table["header"]))
            lines += [f"## {entry['name']}: {table['title']}", "", markdown_table(table["header"], rows, align)]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT"), help="Folder for the results (default: $OUT).")
    parser.add_argument("--smoke", action="store_true", help="Every step on the CPU at tiny sizes (a dry run).")
    parser.add_argument("--steps", default=",".join(step.name for step in STEPS),
                        help="Comma-separated steps to run (default: all): " + ", ".join(s.name for s in STEPS))
    parser.add_argument("--budget-s", type=float, default=None, help="Global time budget in seconds (default: "
                        f"{DEFAULT_BUDGET_S['gpu']:g}, {DEFAULT_BUDGET_S['smoke']:g} with --smoke); a step that no "
                        "longer fits is skipped.")
    parser.add_argument("--device", default=None, help="Torch device (default: cuda, cpu with --smoke).")
    parser.add_argument("--repeats", type=int, default=None, help="Timed runs of the paper step (default: 30, 2 "
                        "with --smoke; the median is reported).")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode of the paper step (default: "
                        "torch's; e.g. reduce-overhead or max-autotune).")
    parser.add_argument("--work-dir", default=None, help="Folder for the steps' files (default: a temporary one, "
                        "deleted afterwards).")
    internal = argparse.SUPPRESS  # how the check starts its own processes
    parser.add_argument("--child", choices=list(STEP_FUNCTIONS), help=internal)
    parser.add_argument("--deadline", type=float, help=internal)
    parser.add_argument("--train-worker", action="store_true", help=internal)
    parser.add_argument("--stages", help=internal)
    parser.add_argument("--results", help=internal)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.train_worker:
        return train_worker(args.work_dir, args.stages.split(","), args.results, args.smoke)
    device = args.device or ("cpu" if args.smoke else "cuda")
    repeats = args.repeats if args.repeats is not None else (2 if args.smoke else 30)
    if repeats < 1:
        parser.error(f"--repeats must be at least 1, got {repeats}")
    if args.child:
        settings = Settings(device, args.smoke, args.work_dir, args.deadline, repeats, args.compile_mode)
        return child_main(args.child, settings)

    if not args.out:
        parser.error("--out DIR is required where $OUT is not set")
    selected = [name for name in args.steps.split(",") if name]
    unknown = sorted(set(selected) - set(STEP_FUNCTIONS))
    if unknown or not selected:
        parser.error(f"--steps: unknown {unknown}; choose from {', '.join(STEP_FUNCTIONS)}")
    budget_s = args.budget_s or DEFAULT_BUDGET_S["smoke" if args.smoke else "gpu"]
    if args.smoke:  # tiny models on a shared CPU: one thread each is many times faster than several that spin
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    work_dir = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="tinysr-device-check-"))

    from benchmarks.reporting import command_line, environment

    env = {**environment("cpu"), "device": device, "device_name": None}  # the steps name the GPU: no CUDA here
    header = {"command": command_line(MODULE, argv), "smoke": args.smoke, "device": device, "budget_s": budget_s,
              "environment": env}
    report = Report(args.out, header, STEPS)
    time_boxes = {step.name: SMOKE_TIME_BOX_S if args.smoke else step.time_box_s for step in STEPS}
    options = ["--work-dir", work_dir, "--device", device, "--repeats", str(repeats),
               *(["--compile-mode", args.compile_mode] if args.compile_mode else []),
               *(["--smoke"] if args.smoke else [])]  # fmt: skip

    def command(step: Step, deadline: float) -> list[str]:
        return [sys.executable, "-m", MODULE, "--child", step.name, "--deadline", str(deadline), *options]

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # a step's process is ended too
    try:
        run_check(STEPS, selected, report, work_dir, budget_s, time_boxes, command)
    finally:
        if not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(to_markdown(report.data))
    return 0 if all(report.entry(name)["status"] == "ok" for name in selected) else 1


if __name__ == "__main__":
    raise SystemExit(main())
