"""Peak memory of one TinySR pipeline call, tiled vs untiled, as the image grows.

Run: `python -m benchmarks.tiling_memory` (CPU; each measurement in a fresh process). The model has the paper's
tiny-VAE configuration (64 channels, separable encoder) and a 2-layer, 2x64-wide transformer with random weights:
memory depends on the architecture, not on the weights. Peak memory is the process's peak resident set
size during the call (Linux `VmHWM`, reset just before it) minus the resident size before it, so it counts every
activation. No timings: on a shared CPU they say more about the neighbours than about tiling.
"""

import argparse
import json
import subprocess
import sys

from benchmarks.memory import reset_rss_peak, status_mib


LOW_RES_SIDES = (128, 256, 384)  # outputs 512, 1024, 1536 pixels square
TILE_SIZE, TILE_OVERLAP = 64, 8  # the release's latent tiles (512 px)


def measure(side: int, tiled: bool) -> dict:
    import numpy as np
    import torch

    from tinysr_diffusers import TinySRAutoencoder, TinySRPipeline, TinySRTransformer2DModel

    torch.manual_seed(0)
    transformer = TinySRTransformer2DModel(num_layers=2, attention_head_dim=64, num_attention_heads=2)
    pipe = TinySRPipeline(transformer=transformer.eval(), vae=TinySRAutoencoder().eval())
    pipe.set_progress_bar_config(disable=True)
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    tile_size = TILE_SIZE if tiled else None
    pipe(image[:16, :16], tile_size=tile_size, output_type="np")  # warm-up: allocator and kernels

    reset_rss_peak()
    before = status_mib("VmRSS")
    output = pipe(image, tile_size=tile_size, tile_overlap=TILE_OVERLAP, output_type="np").images
    peak = status_mib("VmHWM")
    return {
        "output": f"{output.shape[2]}x{output.shape[1]}",
        "tiled": tiled,
        "peak_extra_mib": round(peak - before),
        "output_mib": round(output.nbytes / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "TILED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(int(args.worker[0]), args.worker[1] == "1")))
        return

    print("| output | tiling | peak extra memory (MiB) | output array (MiB) |\n|---|---|---:|---:|")
    for side in LOW_RES_SIDES:
        for tiled in (False, True):
            command = [sys.executable, "-m", "benchmarks.tiling_memory", "--worker", str(side), str(int(tiled))]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            tiling = f"latent {TILE_SIZE}/{TILE_OVERLAP} + VAE" if tiled else "none"
            print(
                f"| {result['output']} | {tiling} | {result['peak_extra_mib']} | {result['output_mib']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
