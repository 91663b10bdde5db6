"""The README's main job (`make run`): upscale a real held-out photo with the shipped default model.

    python -m benchmarks.showcase [--photo astronaut|coffee|chelsea] [--output-dir outputs/showcase]

The photo (scikit-image, public domain) is one the default model never saw in training; its LR version is made with
the mini recipe's seeded Real-ESRGAN degradation, exactly as in the recipe's evaluation. Writes the 4x result and a
comparison strip (LR nearest | bicubic | TinySR | HR), and prints PSNR-Y and LPIPS of TinySR and bicubic against the
HR photo, and the run time.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

PHOTOS = ("astronaut", "coffee", "chelsea")


def tensor(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def to_pil(image: torch.Tensor) -> PIL.Image.Image:
    return PIL.Image.fromarray((image[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def strip(panels: list[tuple[str, PIL.Image.Image]]) -> PIL.Image.Image:
    """Labelled panels side by side, all at the HR size."""
    width, height = panels[0][1].size
    canvas = PIL.Image.new("RGB", (width * len(panels), height + 24), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    for index, (label, image) in enumerate(panels):
        canvas.paste(image, (index * width, 24))
        draw.text((index * width + 6, 5), label, fill="black")
    return canvas


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.showcase", description=__doc__.split("\n\n")[0])
    parser.add_argument("--photo", choices=PHOTOS, default="astronaut")
    parser.add_argument("--output-dir", default="outputs/showcase")
    args = parser.parse_args(argv)

    from tinysr_diffusers import DEFAULT_MODEL, TinySRPipeline
    from tinysr_diffusers.image_processing import bicubic_upscale
    from tinysr_diffusers.evaluation.metrics import create_metric
    from tinysr_diffusers.utils import atomic_path
    from training.recipes.mini import heldout_pair

    hr, lr = heldout_pair(f"skimage:{args.photo}")

    load_start = time.perf_counter()
    pipe = TinySRPipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    load_seconds = time.perf_counter() - load_start
    start = time.perf_counter()
    result = pipe(lr).images[0]
    seconds = time.perf_counter() - start
    bicubic = to_pil(bicubic_upscale(tensor(lr), 4))  # torch's bicubic, as the pipelines and the recipe use

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, image in ((f"{args.photo}_lr.png", lr), (f"{args.photo}_tinysr.png", result),
                        (f"{args.photo}_strip.png", strip([("LR (nearest)", lr.resize(hr.size, PIL.Image.Resampling.NEAREST)),
                                                           ("bicubic", bicubic), ("TinySR (default model)", result),
                                                           ("HR", hr)]))):
        with atomic_path(out / name) as path:
            image.save(path, format="PNG")

    psnr, lpips = create_metric("psnr", allow_download=False), create_metric("lpips", allow_download=False)
    with torch.no_grad():
        scores = {name: (float(psnr(tensor(image), tensor(hr))), float(lpips(tensor(image), tensor(hr))))
                  for name, image in (("bicubic", bicubic), ("TinySR", result))}
    print(f"{args.photo}: {lr.width}x{lr.height} -> {result.width}x{result.height} with {DEFAULT_MODEL}")
    for name, (p, l) in scores.items():
        print(f"  {name:8s} PSNR-Y {p:6.2f} dB   LPIPS {l:.4f}")
    gain = scores["TinySR"][0] - scores["bicubic"][0]
    print(f"  TinySR vs bicubic: {gain:+.2f} dB PSNR-Y, LPIPS {scores['TinySR'][1] / scores['bicubic'][1] - 1:+.1%}")
    print(f"  upscaling took {seconds:.2f} s on the CPU (model load {load_seconds:.2f} s)")
    print(f"  wrote {out / f'{args.photo}_tinysr.png'} and the comparison strip {out / f'{args.photo}_strip.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
