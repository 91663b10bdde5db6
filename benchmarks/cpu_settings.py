"""Which CPU settings pay for a real pipeline: dtype (fp32 / bf16) x VAE memory layout (contiguous / channels_last),
`torch.compile` (`tinysr_diffusers.devices.compile_pipeline`) on top of channels_last in both dtypes, and the ONNX
export (`tinysr export onnx`) run by `OnnxTinySRPipeline` on onnxruntime (fp32, and int8 transformer weights) and on
OpenVINO (where the onnx and openvino extras are installed), each with its latency and its output's PSNR against
the torch fp32 contiguous output (the quality kept).

    python -m benchmarks.cpu_settings [--model PATH] [--photo skimage:astronaut] [--repeats 5] [--dtypes fp32 bf16]
                                      [--no-compile] [--no-onnx] [--inductor-cache DIR] [--output FILE.md]

The model defaults to the package's default model (`tinysr_diffusers.DEFAULT_MODEL`) and the photo to a held-out
photo of the mini recipe with its seeded degradation, so every install can rerun it. Settings run interleaved,
repetition after repetition, so a noisy machine slows them alike; latency is the median. The first call of each
setting (its warm-up) is reported apart: for the compiled settings it holds the compile, which the steady-state
latency does not. Compiles start cold, in a fresh inductor cache, unless `--inductor-cache` names one to reuse. This
is what `--dtype auto` and the CLI's CPU layout are chosen from (`tinysr_diffusers.devices`).
"""

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tinysr_diffusers.evaluation.profiling import cpu_model
from tinysr_diffusers.utils import atomic_write_text, write_json


# (runtime, dtype, channels_last VAE, torch.compile); the ONNX runtimes' dtype is the transformer weights'
SETTINGS = (
    ("torch", "fp32", False, False),
    ("torch", "fp32", True, False),
    ("torch", "bf16", False, False),
    ("torch", "bf16", True, False),
)
COMPILED_SETTINGS = (("torch", "fp32", True, True), ("torch", "bf16", True, True))
ONNX_SETTINGS = (("onnxruntime", "fp32", False, False), ("onnxruntime", "int8", False, False))
OPENVINO_SETTINGS = (("openvino", "fp32", False, False),)  # measured where openvino is installed


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def load(model: str, runtime: str, dtype: str, channels_last: bool, compiled: bool, exports: dict):
    """The pipeline of one setting; ONNX settings run the export in `exports` (folder per dtype)."""
    from tinysr_diffusers import TinySRPipeline
    from tinysr_diffusers.devices import compile_pipeline, optimize_for_cpu
    from tinysr_diffusers.pipelines.pipeline_onnx_tinysr import OnnxTinySRPipeline

    if runtime != "torch":
        pipe = OnnxTinySRPipeline.from_pretrained(exports[dtype], runtime=runtime, num_threads=torch.get_num_threads())
        pipe.set_progress_bar_config(disable=True)
        return pipe
    pipe = TinySRPipeline.from_pretrained(model, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    if channels_last:
        optimize_for_cpu(pipe)
    if compiled:
        compile_pipeline(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def export_onnx_folders(model: str, root: str) -> dict:
    """`tinysr export onnx` of `model` into folders under `root`: fp32 and int8 transformer weights."""
    from tinysr_diffusers import TinySRPipeline
    from tinysr_diffusers.onnx_export import export_onnx

    pipe = TinySRPipeline.from_pretrained(model, dtype=torch.float32)
    return {dtype: export_onnx(pipe, os.path.join(root, dtype), int8=dtype == "int8") for dtype in ("fp32", "int8")}


def main(argv=None) -> None:
    import tinysr_diffusers
    from training.recipes.mini import heldout_pair

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=tinysr_diffusers.DEFAULT_MODEL)
    parser.add_argument("--photo", default="skimage:astronaut", help="A held-out photo of the mini recipe.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
        help="The torch dtypes measured (fp32 contiguous, the reference, always runs; the ONNX settings always run).",
    )  # fmt: skip
    parser.add_argument("--no-compile", action="store_true", help="Leave out the torch.compile settings.")
    parser.add_argument("--no-onnx", action="store_true", help="Leave out the ONNX settings (onnxruntime, OpenVINO).")
    parser.add_argument("--inductor-cache", help="An inductor cache folder to reuse (default: a fresh one).")
    parser.add_argument("--output", default="benchmarks/results/cpu_settings.md")
    args = parser.parse_args(argv)

    settings = SETTINGS if args.no_compile else SETTINGS + COMPILED_SETTINGS
    settings = SETTINGS[:1] + tuple(setting for setting in settings[1:] if setting[1] in args.dtypes)
    if not args.no_onnx and all(map(importlib.util.find_spec, ("onnx", "onnxscript", "onnxruntime"))):  # onnx extra
        settings += ONNX_SETTINGS + (OPENVINO_SETTINGS if importlib.util.find_spec("openvino") else ())
    cache = args.inductor_cache
    if not args.no_compile:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache or tempfile.mkdtemp(prefix="cpu_settings_inductor_")
    _, lr = heldout_pair(args.photo)
    outputs, first_call, times = {}, {}, {setting: [] for setting in settings}
    with tempfile.TemporaryDirectory(prefix="cpu_settings_onnx_") as scratch, torch.no_grad():
        onnx = any(setting[0] != "torch" for setting in settings)
        exports = export_onnx_folders(args.model, scratch) if onnx else {}
        pipes = {setting: load(args.model, *setting, exports) for setting in settings}
        for setting, pipe in pipes.items():  # warm-up (and compile), and the outputs compared
            start = time.perf_counter()
            outputs[setting] = pipe(lr, output_type="np").images[0]
            first_call[setting] = time.perf_counter() - start
        for _ in range(args.repeats):
            for setting, pipe in pipes.items():
                start = time.perf_counter()
                pipe(lr, output_type="np")
                times[setting].append(time.perf_counter() - start)
    reference = outputs[SETTINGS[0]]
    rows = [
        {"runtime": setting[0], "dtype": setting[1], "channels_last_vae": setting[2], "compile": setting[3],
         "latency_s": statistics.median(times[setting]), "first_call_s": first_call[setting],
         "psnr_vs_fp32_db": psnr(outputs[setting], reference)}
        for setting in settings
    ]  # fmt: skip
    model_name = "tinysr_diffusers.DEFAULT_MODEL" if args.model == tinysr_diffusers.DEFAULT_MODEL else args.model
    command = "python -m benchmarks.cpu_settings " + " ".join(sys.argv[1:] if argv is None else argv)
    compiled = "" if args.no_compile else (
        " torch.compile: `tinysr_diffusers.devices.compile_pipeline` (inductor, default mode; "
        f"{'a reused' if cache else 'a fresh'} inductor cache); its compile is the first call, not the latency."
    )
    header = (f"# CPU settings of a real pipeline\n\nCommand: `{command}`\n\n{cpu_model()}, {torch.get_num_threads()} "
              f"threads, torch {torch.__version__}; model `{model_name}`, held-out photo {args.photo} "
              f"({lr.width}x{lr.height} -> {4 * lr.width}x{4 * lr.height}), median of {args.repeats} interleaved "
              f"runs.{compiled}\n")
    table = ["| runtime | dtype | VAE layout | compile | latency (s) | first call (s) | PSNR vs fp32 (dB) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        layout = "channels_last" if row["channels_last_vae"] else ("contiguous" if row["runtime"] == "torch" else "")
        table.append(f"| {row['runtime']} | {row['dtype']} | {layout} | {'yes' if row['compile'] else 'no'} "
                     f"| {row['latency_s']:.3f} "
                     f"| {row['first_call_s']:.1f} | {row['psnr_vs_fp32_db']:.1f} |")
    text = header + "\n" + "\n".join(table) + "\n"
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, text)
    record = {"command": command, "cpu": cpu_model(), "threads": torch.get_num_threads(), "rows": rows}
    write_json(Path(args.output).with_suffix(".json"), record)
    print(text)


if __name__ == "__main__":
    main()
