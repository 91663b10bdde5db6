"""Which colour fix the shipped model uses by default, chosen on training photos (never the held-out ones).

    python -m training.recipes.colour_fix [--output-dir runs/mini]

The trained teacher super-resolves centre crops (384 px HR) of every other training photo, degraded with the recipe's
Real-ESRGAN settings under seed 7 (not the held-out seed), with each colour fix; prints PSNR-Y per photo and the means.
"""

import argparse
from pathlib import Path

import numpy as np


FIXES = ("adain", "wavelet", None)
CROP = 384
SEED = 7


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.recipes.colour_fix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/mini", help="The recipe's output folder (needs data, teacher).")
    args = parser.parse_args(argv)

    import PIL.Image
    import torch

    from tinysr_diffusers import TSDSRPipeline
    from tinysr_diffusers.image_processing import bicubic_upscale
    from tinysr_diffusers.evaluation.metrics import create_metric
    from training.recipes.mini import heldout_lr, load_recipe

    out, recipe = Path(args.output_dir), load_recipe()
    teacher = TSDSRPipeline.from_pretrained(out / "teacher")
    teacher.set_progress_bar_config(disable=True)
    psnr = create_metric("psnr", allow_download=False)
    rows = []
    for index, path in enumerate(sorted((out / "data" / "train").glob("*.png"))[::2]):
        with PIL.Image.open(path) as image:
            hr = image.convert("RGB")
        left, top = (hr.width - CROP) // 2, (hr.height - CROP) // 2
        hr = hr.crop((left, top, left + CROP, top + CROP))
        lr = torch.from_numpy(heldout_lr(hr, recipe["degradation"], SEED, index) / np.float32(255)).permute(2, 0, 1)[None]
        reference = torch.from_numpy(np.asarray(hr, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        with torch.no_grad():
            outputs = [bicubic_upscale(lr, 4)] + [teacher(lr, output_type="pt", color_fix=fix).images for fix in FIXES]
            rows.append([float(psnr(output.clamp(0, 1), reference)) for output in outputs])
        print(f"{path.stem:28s} " + " ".join(f"{value:6.2f}" for value in rows[-1]))
    names = ["bicubic", *(str(fix).lower() for fix in FIXES)]
    print("mean PSNR-Y: " + ", ".join(f"{name} {value:.2f}" for name, value in zip(names, np.mean(rows, axis=0))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
