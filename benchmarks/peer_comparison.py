"""TinySR beside Real-ESRGAN x4plus, the upscaler users already have, at three levels of degradation.

    python -m benchmarks.peer_comparison --hr HR_DIR [--model NAME=PATH ...] [--output-dir DIR] [--repeats 5]

Each held-out HR photo (PNG in `--hr`, cropped to a multiple of 4) gets an LR version per level
(`tinysr_diffusers.training_utils.degradation_levels`: clean bicubic, mild = blur 1.2 / noise 4 / JPEG 75, Real-ESRGAN
second order; seeded per photo and level), then every method upscales it: bicubic, Real-ESRGAN x4plus (the torch port
of the released weights, equal to ncnn's output within one 8-bit level), TAEF2's reconstruction of the HR (the
latent-space ceiling; the same at every level) and each `--model NAME=PATH` (a pipeline folder, an ONNX export or
`default`: the shipped model), loaded and run as `tinysr upscale` runs them. Scores: PSNR-Y, SSIM-Y, LPIPS, DISTS,
NIQE per level and their mean over the levels. Latency: the first `--model` and Real-ESRGAN (ncnn, as the released
tool runs it, and the torch port) at a 512x512 output, interleaved, median of `--repeats`, with the CPU named.

Every image written, and each method's scores at each level, are kept under `--output-dir` and reused when they
exist (scores: while their images are unchanged), so an interrupted or extended run resumes. Writes results.json
and results.md there.
"""

import argparse
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from tinysr_diffusers.evaluation.profiling import cpu_model
from tinysr_diffusers.evaluation.scoring import crop_to_multiple, load_image, save_image, score
from tinysr_diffusers.training_utils.degradation_levels import LEVELS, degrade

from .quality import list_images
from .reporting import command_line


METRICS = ["psnr", "ssim", "lpips", "dists", "niqe"]
HEADERS = {"psnr": ("PSNR-Y ↑", ".2f"), "ssim": ("SSIM-Y ↑", ".4f"), "lpips": ("LPIPS ↓", ".3f"),
           "dists": ("DISTS ↓", ".3f"), "niqe": ("NIQE ↓", ".2f")}
LATENCY_SIDE = 128  # LR side: a 512x512 output
TAEF2 = Path(__file__).resolve().parents[1] / "assets" / "taef2"
MODULE = "benchmarks.peer_comparison"


def level_seed(seed: int, name: str, level: str) -> int:
    return zlib.crc32(f"{seed}/{level}/{name}".encode("utf-8"))


def make_lr(hr_files: dict[str, Path], folder: Path, seed: int) -> dict[str, dict[str, Path]]:
    """LR photos per level: `folder/lr/<level>/<name>.png` (kept if they exist)."""
    files = {level: {} for level in LEVELS}
    for level in LEVELS:
        for name, path in hr_files.items():
            target = folder / "lr" / level / f"{name}.png"
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                generator = torch.Generator().manual_seed(level_seed(seed, name, level))
                save_image(degrade(crop_to_multiple(load_image(path), 4), level, generator), target)
            files[level][name] = target
    return files


def methods(models: dict[str, str]) -> dict[str, Callable]:
    """Each method as `fn(lr, hr) -> sr`, tensors (1, 3, H, W) in [0, 1]."""
    from tinysr_diffusers import TinySRAutoencoder
    from tinysr_diffusers.evaluation.realesrgan import RRDBNet, postprocess, preprocess
    from tinysr_diffusers.hub.conversion import convert_taef2
    from tinysr_diffusers.image_processing import bicubic_upscale
    from tinysr_diffusers.loading import load_pipeline

    from training.recipes.evaluate import reconstruct

    realesrgan = RRDBNet.from_ncnn().to(memory_format=torch.channels_last)
    taef2: TinySRAutoencoder = convert_taef2(TAEF2 / "taef2_encoder.pth", TAEF2 / "taef2_decoder.pth").eval()

    def run_realesrgan(lr, hr):
        pixels = (lr[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        output = realesrgan(torch.from_numpy(preprocess(pixels))[None].contiguous(memory_format=torch.channels_last))
        return torch.from_numpy(postprocess(output[0].numpy()).astype(np.float32) / 255).permute(2, 0, 1)[None]

    table = {
        "bicubic": lambda lr, hr: bicubic_upscale(lr, 4).clamp(0, 1),
        "realesrgan": run_realesrgan,
        "taef2": lambda lr, hr: reconstruct(taef2, hr).clamp(0, 1),
    }
    for name, path in models.items():
        pipe = load_pipeline(None if path == "default" else path, device="cpu", dtype="float32")
        pipe.set_progress_bar_config(disable=True)
        table[name] = lambda lr, hr, pipe=pipe: pipe(lr, output_type="pt").images
    return table


def upscale_all(table: dict, lr_files: dict, hr_files: dict, folder: Path) -> dict:
    """`folder/sr/<level>/<method>/<name>.png` for every level, method and photo (kept if they exist)."""
    files = {level: {method: {} for method in table} for level in LEVELS}
    with torch.no_grad():
        for level in LEVELS:
            for name in hr_files:
                lr = hr = None
                for method, fn in table.items():
                    target = folder / "sr" / level / method / f"{name}.png"
                    files[level][method][name] = target
                    if method == "taef2" and level != LEVELS[0]:  # level-independent: one copy
                        files[level][method][name] = folder / "sr" / LEVELS[0] / method / f"{name}.png"
                        continue
                    if target.exists():
                        continue
                    if lr is None:
                        lr = load_image(lr_files[level][name])
                        hr = crop_to_multiple(load_image(hr_files[name]), 4)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    torch.manual_seed(0)
                    save_image(fn(lr, hr), target)
    return files


def latency(model: str, lr: torch.Tensor, repeats: int) -> dict:
    """Seconds per 512x512 output: `model` as `tinysr upscale` runs it, Real-ESRGAN in ncnn and in torch;
    interleaved so that machine noise hits all alike."""
    from tinysr_diffusers.evaluation.realesrgan import NcnnRealESRGAN, RRDBNet
    from tinysr_diffusers.loading import load_pipeline

    pipe = load_pipeline(None if model == "default" else model)
    pipe.set_progress_bar_config(disable=True)
    pixels = (lr[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    torch_port = RRDBNet.from_ncnn().to(memory_format=torch.channels_last)
    ncnn = NcnnRealESRGAN(num_threads=torch.get_num_threads())
    runs = {
        "tinysr": lambda: pipe(lr, output_type="pt"),
        "realesrgan_ncnn": lambda: ncnn.upscale(pixels),
        "realesrgan_torch": lambda: torch_port.upscale(pixels),
    }
    times = {name: [] for name in runs}
    with torch.no_grad():
        for name, run in runs.items():
            run()  # warm-up
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def scores(sr_files: dict[str, Path], hr_files: dict[str, Path], cache: Path, metrics: list[str]) -> dict[str, float]:
    """The mean `metrics` of `sr_files` against the HR, kept in `cache` with the images' modification times: scoring is
    most of a run's time, and an interrupted or extended run (one more `--model` or metric) scores only what is
    missing."""
    import json

    from tinysr_diffusers.utils import write_json

    stamps = {name: path.stat().st_mtime_ns for name, path in sorted(sr_files.items())}
    kept = json.loads(cache.read_text()) if cache.exists() else {"images": stamps, "metrics": {}}
    known = kept["metrics"] if kept["images"] == stamps else {}
    missing = [name for name in metrics if name not in known]
    if missing:
        status, _ = score(sr_files, hr_files, missing, torch.device("cpu"), allow_download=False, crop_hr_to=4)
        known = {**known, **{name: status[name].get("value") for name in missing}}
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, {"images": stamps, "metrics": known})
    return {name: known[name] for name in metrics}


def aims(results: dict, new: str, teacher: Optional[str]) -> list[tuple[str, str, str, bool]]:
    """The default-model issue's aims against the figures (mild level and the mean over the levels)."""
    rows = []
    for scope in ("mild", "mean"):
        q = results["quality"][scope]
        peer, ours, bicubic = q["realesrgan"], q[new], q["bicubic"]
        rows.append((f"LPIPS vs Real-ESRGAN ({scope})", "<= +0.03", f"{ours['lpips'] - peer['lpips']:+.3f}",
                     ours["lpips"] <= peer["lpips"] + 0.03))
        rows.append((f"PSNR-Y vs Real-ESRGAN ({scope})", ">= -0.3 dB", f"{ours['psnr'] - peer['psnr']:+.2f} dB",
                     ours["psnr"] >= peer["psnr"] - 0.3))
        rows.append((f"LPIPS vs bicubic ({scope})", "below", f"{ours['lpips'] - bicubic['lpips']:+.3f}",
                     ours["lpips"] < bicubic["lpips"]))
    for level in LEVELS:
        q = results["quality"][level]
        rows.append((f"LPIPS below bicubic ({level})", "below", f"{q[new]['lpips'] - q['bicubic']['lpips']:+.3f}",
                     q[new]["lpips"] < q["bicubic"]["lpips"]))
    clean = results["quality"]["clean"]
    rows.append(("PSNR-Y vs bicubic (clean)", ">= -0.5 dB", f"{clean[new]['psnr'] - clean['bicubic']['psnr']:+.2f} dB",
                 clean[new]["psnr"] >= clean["bicubic"]["psnr"] - 0.5))
    if "latency_s" in results:
        speed = results["latency_s"]["realesrgan_ncnn"] / results["latency_s"]["tinysr"]
        rows.append(("speed vs Real-ESRGAN (ncnn)", ">= 5x", f"{speed:.1f}x", speed >= 5))
    if teacher:
        mean = results["quality"]["mean"]
        rows.append(("PSNR-Y vs teacher (mean)", ">= -0.3 dB", f"{mean[new]['psnr'] - mean[teacher]['psnr']:+.2f} dB",
                     mean[new]["psnr"] >= mean[teacher]["psnr"] - 0.3))
        rows.append(("LPIPS vs teacher (mean)", "<= +0.02", f"{mean[new]['lpips'] - mean[teacher]['lpips']:+.3f}",
                     mean[new]["lpips"] <= mean[teacher]["lpips"] + 0.02))
    return rows


def to_markdown(results: dict) -> str:
    lines = [f"Command: `{results['command']}`", "", f"CPU: {results['cpu']}, {results['threads']} threads; "
             f"{len(results['photos'])} held-out photos: {', '.join(results['photos'])}.", ""]
    for scope in (*LEVELS, "mean"):
        metrics = [name for name in METRICS if name in next(iter(results["quality"][scope].values()))]
        lines += [f"### {scope}", "", "| Method | " + " | ".join(HEADERS[name][0] for name in metrics) + " |",
                  "|---" * (len(metrics) + 1) + "|"]
        for method, m in results["quality"][scope].items():
            lines.append(f"| {method} | " + " | ".join(f"{m[name]:{HEADERS[name][1]}}" for name in metrics) + " |")
        lines.append("")
    if "latency_s" in results:
        lines += ["Seconds per 512x512 output (median, interleaved): " + ", ".join(
            f"{name} {seconds:.2f} s" for name, seconds in results["latency_s"].items()) + ".", ""]
    if results.get("aims"):
        lines += ["| Aim | Target | Measured | |", "|---|---|---|---|"]
        lines += [f"| {n} | {t} | {v} | {'met' if ok else '**missed**'} |" for n, t, v, ok in results["aims"]]
        lines.append("")
    return "\n".join(lines)


def detailed_crop(hr: torch.Tensor, size: int) -> tuple[int, int]:
    """Top-left of the `size` square (on a 4-pixel grid) with the most gradient energy: where upscalers differ."""
    grey = hr[0].mean(0)
    energy = (grey[1:, :-1] - grey[:-1, :-1]).abs() + (grey[:-1, 1:] - grey[:-1, :-1]).abs()
    pooled = torch.nn.functional.avg_pool2d(energy[None, None], size, stride=4)[0, 0]
    row, column = divmod(int(pooled.argmax()), pooled.shape[1])
    return 4 * row, 4 * column


def figure(files: dict, lr_files: dict, hr_files: dict, level: str, new: str, photos: list[str], path: Path,
           size: int = 128) -> None:
    """Rows of crops per photo at `level`: LR (nearest) | bicubic | Real-ESRGAN x4plus | `new` | HR (a JPEG)."""
    import PIL.Image
    import PIL.ImageDraw

    columns = [("LR (nearest)", None), ("bicubic", "bicubic"), ("Real-ESRGAN x4plus", "realesrgan"),
               (f"TinySR ({new})", new), ("HR", None)]
    canvas = PIL.Image.new("RGB", (size * len(columns), 20 + size * len(photos)), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    for index, (label, _) in enumerate(columns):
        draw.text((index * size + 4, 4), label, fill="black")
    for row, name in enumerate(photos):
        hr = crop_to_multiple(load_image(hr_files[name]), 4)
        top, left = detailed_crop(hr, size)
        lr = load_image(lr_files[level][name])
        lr_up = torch.nn.functional.interpolate(lr, scale_factor=4, mode="nearest")
        for index, (_, method) in enumerate(columns):
            image = hr if index == len(columns) - 1 else lr_up if method is None else load_image(
                files[level][method][name])
            pixels = image[0, :, top:top + size, left:left + size].permute(1, 2, 0).numpy()
            canvas.paste(PIL.Image.fromarray((pixels * 255).round().astype(np.uint8)), (index * size, 20 + row * size))
    from tinysr_diffusers.utils import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        canvas.save(temporary, format="JPEG", quality=90)


def main(argv: Optional[list[str]] = None) -> int:
    from tinysr_diffusers.utils import atomic_write_text, write_json

    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hr", required=True, type=Path, help="Folder of held-out HR photos (PNG).")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="A model to compare (PATH: pipeline folder, ONNX export or 'default'); repeatable.")
    parser.add_argument("--new", default=None, help="The --model NAME the aims are computed for (default: first).")
    parser.add_argument("--teacher", default=None, help="The --model NAME of its teacher (for the teacher aims).")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/peer_comparison"))
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--repeats", type=int, default=5, help="Latency repeats (0: no latency).")
    parser.add_argument("--figure", type=Path, default=None,
                        help="Also write crops (LR | bicubic | Real-ESRGAN | the new model | HR) at the mild level.")
    parser.add_argument("--figure-photos", type=lambda text: text.split(","), default=None,
                        help="Comma-separated photo names for --figure (default: the first three).")
    parser.add_argument("--metrics", type=lambda text: text.split(","), default=METRICS,
                        help=f"Comma-separated subset of {','.join(METRICS)} (default: all; DISTS and NIQE take most "
                        "of the CPU time).")
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.model):
        parser.error("--model takes NAME=PATH")
    if not {"psnr", "lpips"} <= set(args.metrics) <= set(METRICS):
        parser.error(f"--metrics: a subset of {','.join(METRICS)} with psnr and lpips (the aims), got "
                     f"{','.join(args.metrics)}")
    models = dict(item.split("=", 1) for item in args.model)
    hr_files = list_images(args.hr)
    folder = args.output_dir
    lr_files = make_lr(hr_files, folder, args.seed)
    table = methods(models)
    files = upscale_all(table, lr_files, hr_files, folder)
    results = {"command": command_line(MODULE, sys.argv[1:] if argv is None else argv), "cpu": cpu_model(), "threads": torch.get_num_threads(),
               "photos": list(hr_files), "quality": {}}
    for level in LEVELS:
        results["quality"][level] = {method: scores(files[level][method], hr_files, folder / "scores" / level /
                                                    f"{method}.json", args.metrics) for method in table}
    results["quality"]["mean"] = {
        method: {name: float(np.mean([results["quality"][level][method][name] for level in LEVELS]))
                 for name in args.metrics} for method in table}
    if args.repeats and models:
        lr = load_image(lr_files["mild"][next(iter(hr_files))])[..., :LATENCY_SIDE, :LATENCY_SIDE]
        results["latency_s"] = latency(next(iter(models.values())), lr, args.repeats)
    if models:
        results["aims"] = aims(results, args.new or next(iter(models)), args.teacher)
    if args.figure and models:
        figure(files, lr_files, hr_files, "mild", args.new or next(iter(models)),
               args.figure_photos or list(hr_files)[:3], args.figure)
    write_json(folder / "results.json", results)
    atomic_write_text(folder / "results.md", to_markdown(results))
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
