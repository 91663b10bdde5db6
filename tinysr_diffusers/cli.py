"""The `tinysr` command line.

    tinysr upscale INPUT... [--model PATH_OR_REPO_OR_ONNX_DIR] -o OUT_DIR [--overwrite | --skip-existing]
    tinysr convert tinysr --transformer DIR --vae DIR --lora FILE --pool-embeds FILE -o OUT
    tinysr convert tsdsr --sd3 DIR --transformer-lora FILE --vae-lora FILE --prompt-embeds FILE --pool-embeds FILE
        -o OUT
    tinysr demo [--model PATH_OR_REPO] [--host 127.0.0.1] [--port 7860] [--share]
    tinysr export onnx PIPELINE -o DIR [--int8]

Subcommands register themselves in `main` through an `add_<name>_parser(subparsers)` function. torch, diffusers and
the pipelines are imported only when a subcommand runs, so `--help` and argument errors come at once.
"""

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import PIL.Image

from .demo import add_demo_parser  # standard library only: gradio and torch load when `tinysr demo` runs
from .image_io import DEEP_FORMATS, OUTPUT_FORMATS, read_image, write_image  # numpy and PIL only at import
from .loading import ModelLoadError, add_model_arguments, check_model_arguments, load_pipeline_from_args, one_line
from .tiling import MIN_TILE_SIZE, TileSettings  # torch loads when tiles are made


if TYPE_CHECKING:
    import torch


MAX_OUTPUT_PIXELS = 16384 * 16384  # the largest output the streamed pipeline's memory was measured at (issue 15)


@dataclass
class Job:
    """One input file and where its output goes."""

    source: Path
    target: Path
    deep: bool = False  # write 16 bits per sample (the input has more than 8)


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


def _input_folder_problem(inputs: Sequence[str], out_dir: Path) -> Optional[str]:
    """Why `out_dir` cannot take the outputs of these inputs: it is one of the input folders (outputs would mix with
    the inputs, and every rerun would read them back as inputs)."""
    for name in inputs:
        if Path(name).is_dir() and Path(name).resolve() == out_dir.resolve():
            return f"is the input folder {name}: outputs would mix with the inputs; choose another folder"
    return None


def _image_size(image: Union[PIL.Image.Image, np.ndarray]) -> tuple[int, int]:
    return image.size if isinstance(image, PIL.Image.Image) else (image.shape[1], image.shape[0])


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

    unique: dict[Path, Job] = {}
    for job in jobs:  # a file named twice (or inside a folder also named) is one input
        unique.setdefault(job.source.resolve(), job)
    jobs = list(unique.values())
    sources = set(unique)
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


def _tile_size(value: str) -> "int | str":
    """--tile-size: a number of latent pixels or "auto"."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {value!r}") from None


def upscale(args: argparse.Namespace) -> int:
    """Run `tinysr upscale`; returns the exit code (1 if any input failed)."""
    import torch
    from tqdm.auto import tqdm

    extension = "." + args.format
    out_dir = Path(args.output_dir)
    problem = _output_dir_problem(out_dir) or _input_folder_problem(args.inputs, out_dir)
    if problem:
        print(f"error: -o {out_dir}: {problem}", file=sys.stderr)
        return 2
    jobs, skipped, errors = _collect_jobs(args.inputs, out_dir, extension, args.recursive, args.existing)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    total = len(jobs) + skipped + len(errors)
    times: list[tuple[Job, float]] = []  # seconds per written image (a batch's time shared by its images)

    def summary(written: int, failed: int) -> int:
        print(
            f"Upscaled {written} of {total} input(s) into {out_dir}; {skipped} skipped (output exists), "
            f"{failed} failed."
        )
        if times:
            slowest, seconds = max(times, key=lambda item: item[1])
            mean = sum(seconds for _, seconds in times) / len(times)
            print(f"Time per image: mean {mean:.2f} s, slowest {seconds:.2f} s ({slowest.source}).")
        return 1 if failed else 0

    if not jobs:
        if total:
            return summary(0, len(errors))
        print("error: no input files", file=sys.stderr)
        return 1

    try:
        pipe = load_pipeline_from_args(args)
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # The pipeline's bar over tile batches, under the bar over files; it appears only for images of several tiles.
    pipe.set_progress_bar_config(desc="Tiles", unit="batch", position=1, leave=False)
    call_kwargs = {
        "color_fix": None if args.color_fix == "none" else args.color_fix,
        "tile_size": args.tile_size or None,  # 0: no tiling
        "tile_overlap": args.tile_overlap,
        "outscale": args.outscale,
        "generator": torch.Generator(device="cpu").manual_seed(args.seed),
    }

    failed = len(errors)
    written = 0
    progress = tqdm(total=len(jobs), desc="Upscaling", unit="image", position=0)

    def report(job: Job, error: BaseException) -> None:
        nonlocal failed
        failed += 1
        progress.write(f"error: {job.source}: {one_line(error)}", file=sys.stderr)

    def run(batch: list[tuple[Job, Union[PIL.Image.Image, np.ndarray]]]) -> None:
        nonlocal written, skipped
        start = time.perf_counter()
        try:
            # PIL and uint16 outputs keep the streamed pipeline's memory at its least (no full-size float image).
            output_type = "uint16" if any(job.deep for job, _ in batch) else "pil"
            outputs = pipe([image for _, image in batch], output_type=output_type, **call_kwargs).images
        except Exception as error:  # noqa: BLE001 - isolate the failing image, keep going
            if len(batch) > 1:
                for item in batch:
                    run([item])
                return
            report(batch[0][0], error)
            progress.update(1)
            return
        seconds = (time.perf_counter() - start) / len(batch)
        for (job, _), output in zip(batch, outputs):
            try:
                write_image(output, job.target, OUTPUT_FORMATS[args.format], job.deep,
                            overwrite=args.existing == "overwrite")
                written += 1
                times.append((job, seconds))
                if args.verbose:
                    depth = "16-bit" if job.deep else "8-bit"
                    progress.write(f"{job.source} -> {job.target} ({depth}, {seconds:.2f} s)")
            except FileExistsError:  # another run wrote it since the check: keep that one
                if args.existing == "skip":
                    skipped += 1
                else:
                    report(job, FileExistsError(f"its output {job.target} exists (written meanwhile by another run); "
                                                "pass --overwrite to replace it or --skip-existing to keep it"))
            except Exception as error:  # noqa: BLE001
                report(job, error)
            progress.update(1)

    batch: list[tuple[Job, Union[PIL.Image.Image, np.ndarray]]] = []
    try:
        for job in jobs:
            try:
                image, notes = read_image(job.source, deep=args.format in DEEP_FORMATS, alpha=args.format != "jpg")
                job.deep = isinstance(image, np.ndarray)
                _check_output_size(_image_size(image), args.outscale, args.max_output_pixels)
            except Exception as error:  # noqa: BLE001 - unreadable, truncated, empty, not an image, too large
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
    except KeyboardInterrupt:  # what was written stays (each file atomic); say so, as the shell expects: 128 + SIGINT
        progress.close()
        print(f"Interrupted: {len(jobs) - progress.n} input(s) not processed.", file=sys.stderr)
        summary(written, failed)
        return 130
    progress.close()
    return summary(written, failed)


def _check_output_size(size: tuple[int, int], outscale: Optional[float], limit: int) -> None:
    """Refuse an output of more than `limit` pixels before anything runs, giving the size it would have had."""
    from .image_processing import outscale_size  # the pipeline's own rule (torch is loaded by now)

    height, width = outscale_size(size[1], size[0], 4 if outscale is None else outscale)
    if width * height > limit:
        raise ValueError(
            f"the output would be {width}x{height} ({width * height / 1e6:,.0f} megapixels), above "
            f"--max-output-pixels {limit:,}; lower --outscale or raise the limit"
        )


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
    add_model_arguments(parser)
    parser.add_argument("-o", "--output-dir", required=True, help="Folder for the upscaled images (created).")
    parser.add_argument(
        "--tile-size",
        type=_tile_size,
        default=TileSettings().size,
        help=f"Latent tile size ({TileSettings().size} = {8 * TileSettings().size} output pixels); 0 disables "
        "tiling; auto: the largest that fits on CUDA (halved after an out-of-memory error), else the default.",
    )
    parser.add_argument("--tile-overlap", type=int, default=TileSettings().overlap,
                        help="Latent tile overlap in latent pixels.")
    parser.add_argument("--color-fix", choices=["default", "adain", "wavelet", "none"], default="default",
                        help="default: the model's own (saved with it; adain for the releases).")
    parser.add_argument("--batch-size", type=int, default=1, help="Images per pipeline call.")
    parser.add_argument(
        "--outscale",
        type=float,
        default=None,
        metavar="F",
        help="Output size as F times the input (any F > 0, e.g. 2 or 3.5): super-resolve 4x, then resample with "
        "Lanczos to round(F * size), as Real-ESRGAN's --outscale (default: 4x).",
    )
    parser.add_argument(
        "--max-output-pixels",
        type=int,
        default=MAX_OUTPUT_PIXELS,
        metavar="N",
        help=f"Refuse an input whose output would have more pixels than N (default {MAX_OUTPUT_PIXELS:,} = "
        "16384x16384, where memory was measured to stay flat: docs/pipelines-and-streaming.md).",
    )
    parser.add_argument(
        "--format",
        choices=sorted(OUTPUT_FORMATS),
        default="png",
        help="Output file format. png and tiff keep 16 bits per sample for 16-bit inputs; 8-bit stays 8-bit.",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="List each written file with its bit depth and time."
    )
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
    parser.set_defaults(func=upscale)


CONVERT_DTYPES = ("float32", "float16", "bfloat16")  # torch dtype names


def convert(args: argparse.Namespace) -> int:
    """Run `tinysr convert tinysr|tsdsr`: build the pipeline, save it into a temporary folder beside OUT, rename."""
    import torch

    from .hub.conversion import ConversionError, convert_tinysr, convert_tsdsr
    from .utils import atomic_directory

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        print(f"error: {output} already exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    print(f"[1/2] Converting the {args.release} release (LoRA merged) ...", file=sys.stderr)
    try:
        if args.release == "tinysr":
            pipe = convert_tinysr(args.transformer, args.vae, args.lora, args.pool_embeds, dtype=dtype)
        else:
            pipe = convert_tsdsr(
                args.sd3, args.transformer_lora, args.vae_lora, args.prompt_embeds, args.pool_embeds, dtype=dtype
            )
    except (ConversionError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
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


def export(args: argparse.Namespace) -> int:
    """Run `tinysr export onnx`: load the pipeline, export into a temporary folder beside DIR, rename it."""
    import torch

    from .onnx_export import export_onnx
    from .pipelines import OneStepSRPipeline
    from .utils import atomic_directory

    try:
        pipe = OneStepSRPipeline.from_pretrained(
            args.pipeline, dtype=torch.float32, trust_remote_code=args.trust_remote_code
        )
        with atomic_directory(args.output_dir, overwrite=args.overwrite) as folder:
            export_onnx(pipe, folder, int8=args.int8)
    except (OSError, TypeError, ValueError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    print(
        f"Exported {type(pipe).__name__} to {args.output_dir}; run it with `tinysr upscale --model "
        f"{args.output_dir}` or OnnxTinySRPipeline.from_pretrained."
    )
    return 0


def add_export_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="Export a pipeline for other runtimes (ONNX).",
        description="Export a TinySR pipeline folder or Hub repo for deployment without PyTorch.",
    )
    formats = parser.add_subparsers(dest="format", required=True)
    onnx = formats.add_parser(
        "onnx",
        help="The tiny VAE's encoder and decoder and the transformer as ONNX graphs (dynamic height and width).",
        description="Write DIR/vae_encoder, DIR/vae_decoder and DIR/transformer (model.onnx each, float32, dynamic "
        "batch, height and width) and DIR/onnx_pipeline.json; `tinysr upscale --model DIR` and "
        "OnnxTinySRPipeline.from_pretrained(DIR) run them with onnxruntime or OpenVINO. Needs the onnx extra (pip "
        "install 'tinysr-diffusers[onnx]'; OpenVINO: the openvino extra).",
    )
    onnx.add_argument("pipeline", metavar="PIPELINE", help="TinySR pipeline folder or Hub repo id.")
    onnx.add_argument("-o", "--output-dir", required=True, help="Folder to create (written atomically).")
    onnx.add_argument(
        "--int8", action="store_true", help="Quantise the transformer's linear layers to int8 (dynamic; opt-in)."
    )
    onnx.add_argument("--overwrite", action="store_true", help="Replace DIR if it exists.")
    onnx.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Allow a pipeline folder whose code is not TinySR's own shims (only for code you have read).",
    )
    onnx.set_defaults(func=export)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tinysr", description="TinySR: one-step 4x image super-resolution.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_upscale_parser(subparsers)
    add_convert_parser(subparsers)
    add_demo_parser(subparsers)
    add_export_parser(subparsers)
    args = parser.parse_args(argv)
    if args.command == "upscale":
        if args.batch_size < 1:
            parser.error("--batch-size must be at least 1")
        if args.outscale is not None and not (math.isfinite(args.outscale) and args.outscale > 0):
            parser.error(f"--outscale must be a number > 0, got {args.outscale:g}")
        if args.max_output_pixels < 1:
            parser.error(f"--max-output-pixels must be at least 1, got {args.max_output_pixels}")
        tile = MIN_TILE_SIZE if args.tile_size == "auto" else args.tile_size  # auto tiles are at least this
        if tile < 0 or args.tile_overlap < 0 or (tile and args.tile_overlap >= tile):
            parser.error("need --tile-size >= 0 (0: no tiling) and 0 <= --tile-overlap < --tile-size")
    if args.command in ("upscale", "demo"):
        check_model_arguments(parser, args)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C while a model loads: no traceback (upscale reports its own progress)
        print("Interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
