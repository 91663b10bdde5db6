"""Which CPU settings pay for a real pipeline: dtype (fp32 / bf16) x VAE memory layout (contiguous / channels_last),
each with its latency and its output's PSNR against the fp32 contiguous output (the quality kept).

    python -m benchmarks.cpu_settings [--model PATH] [--photo skimage:astronaut] [--repeats 5]
                                      [--output benchmarks/results/cpu_settings.md]

The model defaults to the package's default model (`tinysr_diffusers.DEFAULT_MODEL`) and the photo to a held-out
photo of the mini recipe with its seeded degradation, so every install can rerun it. Settings run interleaved,
repetition after repetition, so a noisy machine slows them alike; latency is the median. This is what `--dtype auto`
and the CLI's CPU layout are chosen from (`tinysr_diffusers.devices`).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.reporting import cpu_model
from tinysr_diffusers.utils import atomic_write_text, write_json


SETTINGS = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))  # (dtype, channels_last VAE)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def load(model: str, dtype: str, channels_last: bool):
    from tinysr_diffusers import TinySRPipeline

    pipe = TinySRPipeline.from_pretrained(model, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    if channels_last:
        pipe.vae.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None) -> None:
    import tinysr_diffusers
    from training.recipes.mini import heldout_pair

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=tinysr_diffusers.DEFAULT_MODEL)
    parser.add_argument("--photo", default="skimage:astronaut", help="A held-out photo of the mini recipe.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default="benchmarks/results/cpu_settings.md")
    args = parser.parse_args(argv)

    _, lr = heldout_pair(args.photo)
    pipes = {setting: load(args.model, *setting) for setting in SETTINGS}
    outputs, times = {}, {setting: [] for setting in SETTINGS}
    with torch.no_grad():
        for setting, pipe in pipes.items():  # warm-up, and the outputs compared
            outputs[setting] = pipe(lr, output_type="np").images[0]
        for _ in range(args.repeats):
            for setting, pipe in pipes.items():
                start = time.perf_counter()
                pipe(lr, output_type="np")
                times[setting].append(time.perf_counter() - start)
    reference = outputs[SETTINGS[0]]
    rows = [
        {"dtype": setting[0], "channels_last_vae": setting[1], "latency_s": statistics.median(times[setting]),
         "psnr_vs_fp32_db": psnr(outputs[setting], reference)}
        for setting in SETTINGS
    ]
    model_name = "tinysr_diffusers.DEFAULT_MODEL" if args.model == tinysr_diffusers.DEFAULT_MODEL else args.model
    command = "python -m benchmarks.cpu_settings " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (f"# CPU settings of a real pipeline\n\nCommand: `{command}`\n\n{cpu_model()}, {torch.get_num_threads()} "
              f"threads, torch {torch.__version__}; model `{model_name}`, held-out photo {args.photo} "
              f"({lr.width}x{lr.height} -> {4 * lr.width}x{4 * lr.height}), median of {args.repeats} interleaved "
              "runs.\n")
    table = ["| dtype | VAE layout | latency (s) | PSNR vs fp32 (dB) |", "|---|---|---|---|"]
    for row in rows:
        layout = "channels_last" if row["channels_last_vae"] else "contiguous"
        table.append(f"| {row['dtype']} | {layout} | {row['latency_s']:.3f} | {row['psnr_vs_fp32_db']:.1f} |")
    text = header + "\n" + "\n".join(table) + "\n"
    atomic_write_text(args.output, text)
    record = {"command": command, "cpu": cpu_model(), "threads": torch.get_num_threads(), "rows": rows}
    write_json(Path(args.output).with_suffix(".json"), record)
    print(text)


if __name__ == "__main__":
    main()
