"""Image quality of super-resolved images with the paper's metrics, through pyiqa.

    python -m benchmarks.quality --sr SR_DIR --hr HR_DIR           # all metrics
    python -m benchmarks.quality --sr SR_DIR                       # no-reference metrics only
    python -m benchmarks.quality --model PIPELINE --lr LR_DIR [--hr HR_DIR]   # upscale LR images, then score
    python -m benchmarks.quality --model PIPELINE --hr HR_DIR [--seed 0]      # make LR images from the HR ones
                                                                              # (Real-ESRGAN degradation), then as above

`--model` loads as `tinysr upscale --model` does: a folder or repo whose only code is TinySR's own shims, or any
pipeline with `--trust-remote-code` (which runs the folder's code: only for code you have read).

Metrics (`--metrics`, default all): PSNR and SSIM on the Y channel, LPIPS, DISTS, FID (SR folder vs HR folder), NIQE,
MUSIQ, MANIQA, CLIPIQA, TOPIQ, Q-Align. SR and HR images are paired by file name without extension and must have the
same size. A metric whose weights cannot be had is listed as unavailable with the reason; LPIPS, DISTS and NIQE use
local weights and never download (see `tinysr_diffusers.evaluation.metrics`). `--no-download` keeps the other metrics to
pyiqa's cache.

Each run writes quality.md, quality.json and quality.csv (per image and mean) to `--output-dir`, with the command,
the machine and the package versions. pyiqa is licensed PolyForm-Noncommercial-1.0.0 (no commercial use).
"""

import argparse
import json
import math
import sys
import time
import zlib
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from tinysr_diffusers.training_utils.degradations import DegradationConfig, RealESRGANDegradation
from tinysr_diffusers.evaluation.metrics import PAPER_METRICS
from tinysr_diffusers.evaluation.scoring import crop_to_multiple, load_image, save_image, score
from tinysr_diffusers.utils import atomic_write_text

from .reporting import command_line, default_run_name, environment, environment_markdown, markdown_table, write_csv


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MODULE = "benchmarks.quality"


def list_images(folder: Path) -> dict[str, Path]:
    """Images of `folder` by file name without extension (sorted)."""
    if not folder.is_dir():
        raise SystemExit(f"error: {folder} is not a folder.")
    images = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            if path.stem in images:
                clash = f"{images[path.stem].name}, {path.name}"
                raise SystemExit(f"error: {folder} has two images named {path.stem!r} ({clash}).")
            images[path.stem] = path
    if not images:
        raise SystemExit(f"error: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}.")
    return images


def image_seed(seed: int, name: str) -> int:
    """A per-image seed that depends on the run seed and the file name only (not on the other files). 32 bits: torch's
    CPU generator ignores higher ones."""
    return zlib.crc32(f"{seed}/{name}".encode("utf-8"))


def make_lr_images(
    hr_files: dict[str, Path], lr_dir: Path, degradation: RealESRGANDegradation, seed: int, device: torch.device
) -> dict[str, Path]:
    """Degrade each HR image (cropped to a multiple of the scale) and save the LR image as `lr_dir/NAME.png`."""
    scale = degradation.config.scale
    lr_files = {}
    for name, path in tqdm(hr_files.items(), desc="degrading HR images", unit="image"):
        hr = crop_to_multiple(load_image(path), scale).to(device)
        generator = torch.Generator(device="cpu").manual_seed(image_seed(seed, name))
        lr_files[name] = lr_dir / f"{name}.png"
        save_image(degradation(hr, generator=generator), lr_files[name])
    return lr_files


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    """A pipeline folder, Hub repo or ONNX export, loaded by the loader `tinysr upscale --model` uses (so what the CLI
    refuses is refused here too): only TinySR's own shims may be code in it, unless `trust_remote_code`."""
    from tinysr_diffusers.loading import ModelLoadError
    from tinysr_diffusers.loading import load_pipeline as load

    try:
        pipe = load(model, device=str(device), dtype=str(dtype).removeprefix("torch."),
                    trust_remote_code=trust_remote_code)
    except ModelLoadError as error:
        raise SystemExit(f"error: {error}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, lr_files: dict[str, Path], sr_dir: Path, seed: int) -> dict[str, Path]:
    """Upscale each LR image with `pipe`, saving `sr_dir/NAME.png`."""
    from diffusers.utils import load_image as load_pil

    sr_files = {}
    for name, path in tqdm(lr_files.items(), desc="upscaling", unit="image"):
        torch.manual_seed(image_seed(seed, name))  # pipelines that sample (e.g. a VAE posterior) stay reproducible
        sr_files[name] = sr_dir / f"{name}.png"
        save_image(pipe(load_pil(str(path)), output_type="pil").images[0], sr_files[name])
    return sr_files


def _number(value: Optional[float], digits: int = 4) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def _json_safe(value):
    """Non-finite floats (PSNR of identical images is inf) as strings: JSON has no inf/nan."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def to_markdown(report: dict) -> str:
    metrics, images = report["metrics"], report["images"]
    lines = [
        "# Image quality",
        "",
        f"`{report['command']}`",
        "",
        f"{len(images)} images; {environment_markdown(report['environment'])}.",
        "Metrics by pyiqa (PolyForm-Noncommercial-1.0.0).",
        "",
    ]
    rows = []
    for name, entry in metrics.items():
        note = "" if entry["status"] == "ok" else f"{entry['status']}: {entry['reason']}".replace("|", "/")
        arrow = "lower" if entry["lower_better"] else "higher"
        rows.append((name, entry["description"], _number(entry.get("value")), arrow, note))
    lines.append(markdown_table(("metric", "what", "mean", "better", "note"), rows, "llrcl"))
    shown = [name for name, entry in metrics.items() if entry["status"] == "ok" and entry["kind"] != "distribution"]
    if shown and images:
        lines += ["", "Per image:", ""]
        rows = [[row["image"], *(_number(row["scores"].get(name)) for name in shown)] for row in images]
        lines.append(markdown_table(("image", *shown), rows))
    return "\n".join(lines)


def csv_rows(report: dict) -> tuple[list[str], list[list[object]]]:
    """One row per image and a `mean` row; every requested metric has a column (empty where it has no value)."""
    names = list(report["metrics"])
    rows = [[row["image"], *(row["scores"].get(name, "") for name in names)] for row in report["images"]]
    rows.append(["mean", *(report["metrics"][name].get("value", "") for name in names)])
    return ["image", *names], rows


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sr", type=Path, help="Folder of SR images to score (with --model: where to write them).")
    parser.add_argument("--hr", type=Path, help="Folder of HR reference images (paired with SR images by name).")
    parser.add_argument("--lr", type=Path, help="With --model: folder of LR images to upscale.")
    parser.add_argument("--model", help="Pipeline folder or Hub repo id to upscale with before scoring.")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="With --model: allow a pipeline whose code is not TinySR's own shims (runs that code).")
    parser.add_argument("--metrics", default="all", help=f"Comma-separated subset of: {', '.join(PAPER_METRICS)}.")
    parser.add_argument("--output-dir", type=Path, help="Where the reports go (default: results/quality/<time>).")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available).")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="Pipeline dtype for --model.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the degradation and the pipeline (default 0).")
    parser.add_argument("--degradation", type=Path,
                        help="JSON or YAML file of DegradationConfig fields overriding Real-ESRGAN's defaults.")
    parser.add_argument("--no-download", action="store_true",
                        help="Never download metric weights (metrics missing from pyiqa's cache are unavailable).")
    args = parser.parse_args(argv)
    if args.model is None and args.sr is None:
        parser.error("give --sr (images to score) or --model (a pipeline to run first).")
    if args.model is None and (args.lr is not None or args.degradation is not None or args.trust_remote_code):
        parser.error("--lr, --degradation and --trust-remote-code only apply with --model.")
    if args.model is not None and args.lr is None and args.hr is None:
        parser.error("--model needs --lr (LR images) or --hr (HR images to degrade into LR images).")
    requested = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if requested == ["all"]:
        requested = list(PAPER_METRICS)
    unknown = [m for m in requested if m not in PAPER_METRICS]
    if unknown or not requested:
        parser.error(f"unknown metrics {unknown}; choose from {', '.join(PAPER_METRICS)}.")
    args.metrics = list(dict.fromkeys(requested))
    return args


def load_degradation_config(path: Optional[Path]) -> DegradationConfig:
    if path is None:
        return DegradationConfig()
    import yaml

    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    try:
        text = path.read_text(encoding="utf-8")
        values = (yaml.safe_load(text) or {}) if is_yaml else json.loads(text)
    except (UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as error:
        raise SystemExit(f"error: {path} is not valid {'YAML' if is_yaml else 'JSON'}: {' '.join(str(error).split())}")
    try:
        return DegradationConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"error: {path}: {error}")


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    output_dir = args.output_dir or Path("results") / "quality" / default_run_name()
    output_dir.mkdir(parents=True, exist_ok=True)
    hr_files = list_images(args.hr) if args.hr is not None else None
    inputs = {"sr": str(args.sr) if args.sr else None, "hr": str(args.hr) if args.hr else None, "model": args.model}
    crop_hr_to = 1

    if args.model is not None:
        sr_dir = args.sr or output_dir / "sr"
        if sr_dir.is_dir() and any(path.suffix.lower() in IMAGE_SUFFIXES for path in sr_dir.iterdir()):
            raise SystemExit(f"error: {sr_dir} already holds images; give an empty or new --sr folder for --model.")
        # The inputs are checked and the model loaded before any image is made: a refused model stops at once.
        lr_files = list_images(args.lr) if args.lr is not None else None
        config = load_degradation_config(args.degradation) if args.lr is None else None
        pipe = load_pipeline(args.model, device, getattr(torch, args.dtype), args.trust_remote_code)
        sr_dir.mkdir(parents=True, exist_ok=True)
        if args.lr is not None:
            inputs["lr"] = str(args.lr)
        else:
            lr_dir = output_dir / "lr"
            lr_dir.mkdir(exist_ok=True)
            lr_files = make_lr_images(hr_files, lr_dir, RealESRGANDegradation(config), args.seed, device)
            crop_hr_to = config.scale
            inputs.update(lr=str(lr_dir), degradation=config.to_dict())
        inputs.update(sr=str(sr_dir), seed=args.seed, dtype=args.dtype)
        sr_files = run_pipeline(pipe, lr_files, sr_dir, args.seed)
    else:
        sr_files = list_images(args.sr)

    try:
        status, per_image = score(sr_files, hr_files, args.metrics, device, not args.no_download, crop_hr_to)
    except ValueError as error:  # SR and HR images that do not pair up
        raise SystemExit(f"error: {error}") from None
    report = {
        "command": command_line(MODULE, argv),
        "environment": environment(device),
        "inputs": inputs,
        "metrics": status,
        "images": per_image,
        "elapsed_s": round(time.perf_counter() - started, 2),
    }
    markdown = to_markdown(report)
    atomic_write_text(str(output_dir / "quality.md"), markdown)
    json_text = json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n"
    atomic_write_text(str(output_dir / "quality.json"), json_text)
    write_csv(str(output_dir / "quality.csv"), *csv_rows(report))
    sys.stdout.write(markdown)
    print(f"\nWrote quality.md, quality.json and quality.csv to {output_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
