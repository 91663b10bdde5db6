"""Peak memory and latency of one TinySR pipeline call as the output grows: streamed vs the tiled pipeline before it.

Run: `python -m benchmarks.tiling_memory [--sides 1024 2048 4096 8192 16384] [--output-type uint16] [--vae narrow]`
(output sides in pixels; each measurement in a fresh process; `uint16` measures the 16-bit path of `tinysr
upscale`; `--device cuda` measures on a GPU). The model has a 2-layer, 2x64-wide transformer with random weights
(memory depends on the architecture, not on the weights) and the paper's tiny-VAE configuration (64 channels,
separable encoder), or with `--vae narrow` the same VAE 8 channels wide: its fixed activations are smaller and it
runs many times faster, while what grows with the image (the output, the blending bands) is the same, so it reaches
16K outputs in minutes.
Peak memory on the CPU is the process's peak resident set size during the call (Linux `VmHWM`, reset just before it,
after freed memory is handed back) minus the resident size before it, so it counts every activation and the output;
on CUDA it is the peak of allocated GPU memory above what the call started with (`benchmarks.memory.PeakMemory`;
the output is kept in CPU memory, while the low-resolution input and the latents, about 1 B per output pixel, stay
on the GPU when streamed, and every full-size float tensor when not).
"Tiled" is the same call with streaming switched off (every full-resolution float tensor of the old pipeline); it
runs only up to `--tiled-max` pixels. Latency is one call's wall time: on a shared CPU it is an upper bound.
Writes `tiling_memory.md`, `tiling_memory.json` and `tiling_memory.png` into `--out`.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


SIDES = (1024, 2048, 4096, 8192, 16384)  # output sides; the low-resolution input is a quarter
OUTPUT_BYTES = {"pil": 1, "uint16": 2}  # bytes per sample of each measured output type (RGB outputs)
TILE_SIZE, TILE_OVERLAP = 64, 8  # the release's latent tiles (512 px)
VAES = {  # TinySRAutoencoder overrides
    "paper": {},
    "narrow": {"encoder_block_out_channels": (8,) * 4, "decoder_block_out_channels": (8,) * 4},
}


def measure(side: int, streamed: bool, output_type: str = "pil", vae: str = "paper", device: str = "cpu") -> dict:
    import numpy as np
    import torch

    from benchmarks.memory import PeakMemory
    from tinysr_diffusers import TinySRAutoencoder, TinySRPipeline, TinySRTransformer2DModel

    torch.manual_seed(0)
    transformer = TinySRTransformer2DModel(num_layers=2, attention_head_dim=64, num_attention_heads=2)
    pipe = TinySRPipeline(transformer=transformer.eval(), vae=TinySRAutoencoder(**VAES[vae]).eval()).to(device)
    pipe.set_progress_bar_config(disable=True)
    if not streamed:  # the tiled pipeline before streaming: the decoded image joined into one full-size band
        decode_bands = pipe.decode_bands

        def one_band(*args, **options):
            yield 0, torch.cat([rows for _, rows in decode_bands(*args, **options)], dim=-2)

        pipe.decode_bands = one_band
    low_res = side // 4
    image = np.random.default_rng(0).integers(0, 256, (low_res, low_res, 3), dtype=np.uint8)
    pipe(image[:80, :80], tile_size=8, tile_overlap=2)  # warm-up of both paths' kernels, a few tiles

    peak = PeakMemory(device)
    peak.start()
    start = time.perf_counter()
    output = pipe(image, output_type=output_type, tile_size=TILE_SIZE, tile_overlap=TILE_OVERLAP).images[0]
    seconds = time.perf_counter() - start
    extra_mib = peak.stop()
    pixels = output.size[0] * output.size[1] if output_type == "pil" else output.shape[0] * output.shape[1]
    return {
        "side": side,
        "streamed": streamed,
        "output_type": output_type,
        "vae": vae,
        "device": device,
        "peak_extra_mib": round(extra_mib, 1),
        "seconds": round(seconds, 2),
        "output_mib": round(pixels * 3 * OUTPUT_BYTES[output_type] / 2**20, 1),
    }


def _worker(side: int, streamed: bool, output_type: str, vae: str, device: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.tiling_memory", "--worker", str(side), str(int(streamed))]
    command += ["--output-type", output_type, "--vae", vae, "--device", device]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout)


def _bytes_per_pixel(results: list[dict], streamed: bool) -> str:
    """Growth of the peak per added output pixel between the smallest and largest size measured."""
    rows = sorted((r for r in results if r["streamed"] == streamed), key=lambda r: r["side"])
    if len(rows) < 2:
        return "n/a"
    first, last = rows[0], rows[-1]
    growth = (last["peak_extra_mib"] - first["peak_extra_mib"]) * 2**20 / (last["side"] ** 2 - first["side"] ** 2)
    return f"{growth:.1f}"


def _plot(results: list[dict], path: Path, output_type: str, vae: str, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, latency) = plt.subplots(1, 2, figsize=(10, 4))
    for streamed, label in ((True, "streamed"), (False, "tiled (before)")):
        rows = sorted((r for r in results if r["streamed"] == streamed), key=lambda r: r["side"])
        if rows:
            sides = [r["side"] for r in rows]
            memory.plot(sides, [r["peak_extra_mib"] for r in rows], "o-", label=label)
            latency.plot(sides, [r["seconds"] for r in rows], "o-", label=label)
    rows = sorted({r["side"]: r for r in results}.values(), key=lambda r: r["side"])
    label = f"{_sample_type(output_type)} output alone"
    memory.plot([r["side"] for r in rows], [r["output_mib"] for r in rows], "k--", label=label)
    for axis, ylabel in ((memory, "peak extra memory (MiB)"), (latency, "latency (s)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("output side (px)")
        axis.set_ylabel(ylabel)
        axis.legend()
        axis.grid(True, which="both", alpha=0.3)
    figure.suptitle(f"TinySR pipeline, tiny random model ({vae} VAE), {device.upper()}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _sample_type(output_type: str) -> str:
    return "uint8" if output_type == "pil" else "uint16"


def main(argv=None) -> None:
    from tinysr_diffusers.evaluation.profiling import cpu_model
    from tinysr_diffusers.utils import atomic_write_text, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "STREAMED"), help=argparse.SUPPRESS)
    parser.add_argument("--sides", type=int, nargs="+", default=list(SIDES), help="Output sides in pixels.")
    parser.add_argument("--tiled-max", type=int, default=4096, help="Largest side also run without streaming.")
    parser.add_argument("--out", default="benchmarks/results/tiling_memory", help="Folder for the results.")
    parser.add_argument("--note", default="", help="A line about the machine, written under the table.")
    parser.add_argument(
        "--output-type",
        choices=sorted(OUTPUT_BYTES),
        default="pil",
        help="The pipeline's output: pil (8-bit, the CLI's 8-bit path) or uint16 (its 16-bit PNG/TIFF path).",
    )
    parser.add_argument(
        "--vae", choices=sorted(VAES), default="paper", help="paper: the paper's tiny VAE; narrow: 8 channels wide."
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu: peak RSS; cuda: max allocated.")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(int(args.worker[0]), args.worker[1] == "1", args.output_type, args.vae, args.device)))
        return

    results = []
    for side in args.sides:
        for streamed in (True, False):
            if streamed or side <= args.tiled_max:
                results.append(_worker(side, streamed, args.output_type, args.vae, args.device))
                print(json.dumps(results[-1]), flush=True)

    sample = _sample_type(args.output_type)
    option = "" if args.output_type == "pil" else f" --output-type {args.output_type}"
    option += "" if args.vae == "paper" else f" --vae {args.vae}"
    option += "" if args.device == "cpu" else f" --device {args.device}"
    described = "PIL" if args.output_type == "pil" else "uint16"
    gpu = ""
    if args.device == "cuda":
        import torch

        gpu = f"; GPU: {torch.cuda.get_device_name()}"
    lines = [
        f"| output | pipeline | peak extra memory (MiB) | {sample} output (MiB) | latency (s) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results:
        pipeline = "streamed" if r["streamed"] else "tiled (before)"
        lines.append(
            f"| {r['side']}x{r['side']} | {pipeline} | {r['peak_extra_mib']} | {r['output_mib']} | {r['seconds']} |"
        )
    lines += [
        "",
        f"Growth per added output pixel: streamed {_bytes_per_pixel(results, True)} B, "
        f"tiled (before) {_bytes_per_pixel(results, False)} B (the {sample} output alone: "
        f"{3 * OUTPUT_BYTES[args.output_type]} B).",
        "",
        f"Command: `python -m benchmarks.tiling_memory --sides {' '.join(map(str, args.sides))} "
        f"--tiled-max {args.tiled_max}{option}`; latent tiles {TILE_SIZE}/{TILE_OVERLAP}, {described} output, "
        f"{args.vae} VAE, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}; CPU: {cpu_model()}{gpu}.",
    ]
    if args.note:
        lines += ["", args.note]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tiling_memory.md", "\n".join(lines) + "\n")
    write_json(out / "tiling_memory.json", results)
    _plot(results, out / "tiling_memory.png", args.output_type, args.vae, args.device)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
