"""The `tinysr` command line.

    tinysr upscale INPUT... --model PATH_OR_REPO -o OUT_DIR [--overwrite | --skip-existing]
    tinysr convert tinysr --transformer DIR --vae DIR --lora FILE --pool-embeds FILE -o OUT
    tinysr convert tsdsr --sd3 DIR --transformer-lora FILE --vae-lora FILE --prompt-embeds FILE --pool-embeds FILE
        -o OUT
    tinysr demo [--model PATH_OR_REPO] [--host 127.0.0.1] [--port 7860] [--share]

Subcommands register themselves in `main` through an `add_<name>_parser(subparsers)` function. torch, diffusers and
the pipelines are imported only when a subcommand runs, so `--help` and argument errors come at once.
"""

import argparse
import io
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import PIL.Image
import PIL.ImageOps

from .demo import add_demo_parser  # standard library only: gradio and torch load when `tinysr demo` runs


if TYPE_CHECKING:
    import torch


OUTPUT_FORMATS = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}
DTYPES = ("float32", "float16", "bfloat16")  # torch dtype names
# Raw modes of more than 8 bits per sample (I;16B, RGB;16B, RGBA;16L, ...; not BMP's packed 5-6-5 BGR;16).
SIXTEEN_BIT_RAWMODE = re.compile(r"I;16|;16[A-Z]")
# The ICC colour space of each PIL mode that a profile can describe.
MODE_SPACES = {
    "1": "GRAY",
    "L": "GRAY",
    "LA": "GRAY",
    "I;16": "GRAY",
    "I;16B": "GRAY",
    "I;16L": "GRAY",
    "RGB": "RGB",
    "RGBA": "RGB",
    "RGBX": "RGB",
    "P": "RGB",
    "PA": "RGB",
    "CMYK": "CMYK",
}


@dataclass
class Job:
    """One input file and where its output goes."""

    source: Path
    target: Path


def _default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _resolve_dtype(name: str, device: str) -> "torch.dtype":
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _output_dir_problem(out_dir: Path) -> Optional[str]:
    """Why no output can be written into `out_dir` (created here), found before a model is loaded; None if none."""
    if out_dir.exists() and not out_dir.is_dir():
        return "is a file, not a folder"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as error:
        return f"cannot write there: {error.strerror or error}" + (f" ({error.filename})" if error.filename else "")
    return None


def _collect_jobs(
    inputs: Sequence[str], out_dir: Path, extension: str, recursive: bool, existing: str
) -> tuple[list[Job], int, list[str]]:
    """Map every input file to its output path; returns (jobs, number of inputs skipped because their output exists,
    errors for inputs that cannot be processed).

    An output folder inside an input folder is no input (a rerun would upscale the earlier outputs again); an existing
    output is an error unless `existing` is "overwrite" or "skip".
    """
    jobs, errors = [], []
    out = out_dir.resolve()
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            holds_out = path.resolve() in out.parents
            files = sorted(path.rglob("*") if recursive else path.iterdir())
            for file in files:
                relative = file.relative_to(path)
                if holds_out and out in file.resolve().parents:
                    continue
                if file.is_file() and not any(part.startswith(".") for part in relative.parts):
                    jobs.append(Job(file, out_dir / relative.with_suffix(extension)))
        elif path.is_file():
            jobs.append(Job(path, out_dir / (path.stem + extension)))
        else:
            errors.append(f"{name}: no such file or folder")

    sources = {job.source.resolve() for job in jobs}
    claimed: dict[Path, Path] = {}
    kept, skipped = [], 0
    for job in jobs:
        target = job.target.resolve()
        if target in sources:
            errors.append(f"{job.source}: its output {job.target} would overwrite an input; choose another -o")
        elif target in claimed:
            errors.append(f"{job.source}: its output {job.target} is also the output of {claimed[target]}")
        else:
            claimed[target] = job.source
            if not os.path.lexists(job.target) or existing == "overwrite":
                kept.append(job)
            elif existing == "skip":
                skipped += 1
            else:
                errors.append(
                    f"{job.source}: its output {job.target} already exists; pass --overwrite to replace it or "
                    "--skip-existing to keep it"
                )
    return kept, skipped, errors


def _read_image(path: Path) -> tuple[PIL.Image.Image, list[str]]:
    """Open and fully decode an image (so truncated files fail here), applying its EXIF orientation and converting
    it to sRGB; returns it and warnings (PIL's, and what the 8-bit, one-frame output cannot keep)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with PIL.Image.open(path) as image:
            bits = _bits_per_sample(image)  # before load(), which drops the tiles
            frames = getattr(image, "n_frames", 1)
            image.load()
            image = PIL.ImageOps.exif_transpose(image)
    notes = [" ".join(str(warning.message).split()) for warning in caught]
    if frames > 1:
        notes.append(f"it has {frames} frames (animated or multi-page): only the first is upscaled")
    if bits > 8:
        notes.append(f"{bits}-bit input: the output is 8-bit")
    return _to_srgb(image, notes), notes


def _bits_per_sample(image: PIL.Image.Image) -> int:
    """Bits per sample of the file: PIL decodes 16-bit RGB(A) to 8 bits, which only the raw mode of its tiles shows."""
    if any(SIXTEEN_BIT_RAWMODE.search(str(rawmode)) for rawmode in [image.mode, *(tile[3] for tile in image.tile)]):
        return 16
    return 32 if image.mode in ("I", "F") else 8


def _to_srgb(image: PIL.Image.Image, notes: list[str]) -> PIL.Image.Image:
    """Convert an image with an embedded ICC profile to sRGB, the space the model works in and untagged outputs are
    read in (greyscale stays greyscale, alpha is kept); a profile that cannot be used is reported in `notes` and
    ignored. Outputs carry no profile: copying the input's would tag them with a colour space they are not in."""
    from PIL import ImageCms

    icc = image.info.get("icc_profile")
    if not icc:
        return image
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space.strip()
        if MODE_SPACES.get(image.mode) != space:
            raise ValueError(f"a {space} profile for {image.mode} pixels")
        alpha = None
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            alpha = image.convert("RGBA").getchannel("A")
        colour = image
        if image.mode in ("1", "LA", "P", "PA", "RGBA", "RGBX"):
            colour = image.convert("L" if space == "GRAY" else "RGB")
        converted = ImageCms.profileToProfile(colour, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (OSError, ValueError, ImageCms.PyCMSError) as error:
        notes.append(f"ignoring its ICC profile ({_one_line(error)}); its colours are taken as sRGB")
        return image
    if space == "GRAY":
        converted = converted.convert("L")
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


def _write_atomically(image: PIL.Image.Image, target: Path, image_format: str) -> None:
    """Write through a temporary file beside `target` (ordinary permissions), so no partial output is ever left."""
    from .utils import atomic_path

    if image_format == "JPEG" and image.mode in ("RGBA", "LA"):
        image = image.convert("RGB")
    with atomic_path(target) as temporary:
        image.save(temporary, format=image_format)


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {message}"


def upscale(args: argparse.Namespace) -> int:
    """Run `tinysr upscale`; returns the exit code (1 if any input failed)."""
    import torch
    from tqdm.auto import tqdm

    from .pipelines import OneStepSRPipeline

    extension = "." + args.format
    out_dir = Path(args.output_dir)
    problem = _output_dir_problem(out_dir)
    if problem:
        print(f"error: -o {out_dir}: {problem}", file=sys.stderr)
        return 2
    jobs, skipped, errors = _collect_jobs(args.inputs, out_dir, extension, args.recursive, args.existing)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    total = len(jobs) + skipped + len(errors)

    def summary(written: int, failed: int) -> int:
        print(
            f"Upscaled {written} of {total} input(s) into {out_dir}; {skipped} skipped (output exists), "
            f"{failed} failed."
        )
        return 1 if failed else 0

    if not jobs:
        if total:
            return summary(0, len(errors))
        print("error: no input files", file=sys.stderr)
        return 1

    device = args.device or _default_device()
    dtype = _resolve_dtype(args.dtype, device)
    try:
        pipe = OneStepSRPipeline.from_pretrained(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
        pipe = pipe.to(device)
    except Exception as error:  # noqa: BLE001 - a bad --model is one clear line, not a traceback
        print(f"error: cannot load --model {args.model}: {_one_line(error)}", file=sys.stderr)
        return 2
    pipe.set_progress_bar_config(disable=True)
    call_kwargs = {
        "color_fix": None if args.color_fix == "none" else args.color_fix,
        "tile_size": args.tile_size if args.tile_size > 0 else None,
        "tile_overlap": args.tile_overlap,
        "generator": torch.Generator(device="cpu").manual_seed(args.seed),
    }

    failed = len(errors)
    written = 0
    progress = tqdm(total=len(jobs), desc="Upscaling", unit="image")

    def report(job: Job, error: BaseException) -> None:
        nonlocal failed
        failed += 1
        progress.write(f"error: {job.source}: {_one_line(error)}", file=sys.stderr)

    def run(batch: list[tuple[Job, PIL.Image.Image]]) -> None:
        nonlocal written
        try:
            outputs = pipe([image for _, image in batch], **call_kwargs).images
        except Exception as error:  # noqa: BLE001 - isolate the failing image, keep going
            if len(batch) > 1:
                for item in batch:
                    run([item])
                return
            report(batch[0][0], error)
            progress.update(1)
            return
        for (job, _), output in zip(batch, outputs):
            try:
                _write_atomically(output, job.target, OUTPUT_FORMATS[args.format])
                written += 1
            except Exception as error:  # noqa: BLE001
                report(job, error)
            progress.update(1)

    batch: list[tuple[Job, PIL.Image.Image]] = []
    for job in jobs:
        try:
            image, notes = _read_image(job.source)
        except Exception as error:  # noqa: BLE001 - unreadable, truncated, empty, not an image
            report(job, error)
            progress.update(1)
            continue
        for note in notes:
            progress.write(f"warning: {job.source}: {note}", file=sys.stderr)
        batch.append((job, image))
        if len(batch) == args.batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    progress.close()
    return summary(written, failed)


def add_upscale_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "upscale",
        help="4x super-resolve images with a TinySR or TSD-SR pipeline.",
        description="4x super-resolve image files and folders with a TinySR or TSD-SR pipeline folder or Hub repo. "
        "Outputs go to OUT_DIR under the input's name; inputs are never overwritten, nor are existing outputs "
        "unless --overwrite; each output is written atomically. Inputs with an ICC profile are converted to sRGB. "
        "Files that cannot be read are reported and skipped; the exit code is 1 if any input failed.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="Image files and folders of images.")
    parser.add_argument("--model", required=True, help="Pipeline folder or Hub repo id (saved by save_pretrained).")
    parser.add_argument("-o", "--output-dir", required=True, help="Folder for the upscaled images (created).")
    parser.add_argument(
        "--tile-size", type=int, default=64, help="Latent tile size (64 = 512 output pixels); 0 disables tiling."
    )
    parser.add_argument("--tile-overlap", type=int, default=8, help="Latent tile overlap in latent pixels.")
    parser.add_argument("--color-fix", choices=["adain", "wavelet", "none"], default="adain")
    parser.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16/float16 on CUDA, else float32."
    )
    parser.add_argument("--device", default=None, help="Torch device (default: cuda, then mps, then cpu).")
    parser.add_argument("--batch-size", type=int, default=1, help="Images per pipeline call.")
    parser.add_argument("--format", choices=sorted(OUTPUT_FORMATS), default="png", help="Output file format.")
    parser.add_argument(
        "--recursive", action="store_true", help="Descend into sub-folders (layout kept; OUT_DIR itself excluded)."
    )
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument(
        "--overwrite",
        dest="existing",
        action="store_const",
        const="overwrite",
        default="refuse",
        help="Replace outputs that already exist in OUT_DIR (default: report them as failed and keep them).",
    )
    existing.add_argument(
        "--skip-existing",
        dest="existing",
        action="store_const",
        const="skip",
        help="Skip inputs whose output already exists, e.g. to resume an interrupted run.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the VAE posterior sample (AutoencoderKL).")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Allow a model folder whose code is not TinySR's own shims (only for code you have read).",
    )
    parser.set_defaults(func=upscale)


CONVERT_DTYPES = ("float32", "float16", "bfloat16")  # torch dtype names


def convert(args: argparse.Namespace) -> int:
    """Run `tinysr convert tinysr|tsdsr`: build the pipeline, save it into a temporary folder beside OUT, rename."""
    import torch

    from .conversion import ConversionError, convert_tinysr, convert_tsdsr
    from .utils import atomic_directory

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        print(f"error: {output} already exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    print(f"[1/2] Converting the {args.release} release (LoRA merged) ...", file=sys.stderr)
    try:
        if args.release == "tinysr":
            pipe = convert_tinysr(args.transformer, args.vae, args.lora, args.pool_embeds, torch_dtype=dtype)
        else:
            pipe = convert_tsdsr(
                args.sd3, args.transformer_lora, args.vae_lora, args.prompt_embeds, args.pool_embeds, torch_dtype=dtype
            )
    except (ConversionError, OSError) as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 1
    print(f"[2/2] Saving {type(pipe).__name__} ({args.dtype}) to {output} ...", file=sys.stderr)
    with atomic_directory(str(output), overwrite=args.overwrite) as folder:
        pipe.save_pretrained(folder)
    print(
        f"Saved {type(pipe).__name__} to {output}; load it with DiffusionPipeline.from_pretrained(..., "
        "trust_remote_code=True) or `tinysr upscale --model`."
    )
    return 0


def add_convert_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="Convert the authors' released TinySR or TSD-SR checkpoints into a pipeline folder.",
        description="Assemble the pieces of a release into one pipeline folder (LoRAs merged). OUT is written into a "
        "temporary folder beside it and renamed when complete; an existing OUT is kept unless --overwrite.",
    )
    releases = parser.add_subparsers(dest="release", required=True)
    tinysr = releases.add_parser("tinysr", help="TinySR: pruned transformer + tiny VAE + LoRA + pooled embedding.")
    tinysr.add_argument(
        "--transformer", required=True, help="Pruned transformer folder (prune-12-merge-tinysr/transformer)."
    )
    tinysr.add_argument("--vae", required=True, help="Tiny VAE folder (vae/separable).")
    tinysr.add_argument("--lora", required=True, help="Student LoRA file (tinysr/transformer.safetensors).")
    tinysr.add_argument("--pool-embeds", required=True, help="Pooled prompt embedding (pool_embeds.pt).")
    tsdsr = releases.add_parser("tsdsr", help="TSD-SR: SD3-medium folder + transformer and VAE LoRAs + embeddings.")
    tsdsr.add_argument("--sd3", required=True, help="SD3-medium diffusers folder (transformer/ and vae/ are used).")
    tsdsr.add_argument(
        "--transformer-lora", required=True, help="Transformer LoRA file (tsdsr/transformer.safetensors)."
    )
    tsdsr.add_argument("--vae-lora", required=True, help="VAE encoder LoRA file (tsdsr/vae.safetensors).")
    tsdsr.add_argument("--prompt-embeds", required=True, help="Prompt embeddings (prompt_embeds.pt, 333x4096).")
    tsdsr.add_argument("--pool-embeds", required=True, help="Pooled prompt embedding (pool_embeds.pt, 2048).")
    for release in (tinysr, tsdsr):
        release.add_argument("-o", "--output", required=True, help="Pipeline folder to create.")
        release.add_argument(
            "--dtype", choices=sorted(CONVERT_DTYPES), default="float32", help="Dtype of the saved weights."
        )
        release.add_argument("--overwrite", action="store_true", help="Replace OUT if it exists.")
        release.set_defaults(func=convert)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tinysr", description="TinySR: one-step 4x image super-resolution.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_upscale_parser(subparsers)
    add_convert_parser(subparsers)
    add_demo_parser(subparsers)
    args = parser.parse_args(argv)
    if args.command == "upscale":
        if args.batch_size < 1:
            parser.error("--batch-size must be at least 1")
        if args.tile_size < 0 or args.tile_overlap < 0 or (args.tile_size and args.tile_overlap >= args.tile_size):
            parser.error("need --tile-size >= 0 (0: no tiling) and 0 <= --tile-overlap < --tile-size")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
