"""`tinysr demo`: a Gradio app to try a TinySR (or TSD-SR) pipeline in a browser.

    tinysr demo [--model PATH_OR_REPO] [--host 127.0.0.1] [--port 7860] [--share] [--max-pixels N]

Upload an image (or pick a bundled example photo), choose the output scale, colour fix and tile size, press the
button; the result is shown as a before/after slider (bicubic vs TinySR at the same size), with the full-resolution
PNG to download, the input and output sizes and the wall time. One job runs at a time (a queue with concurrency 1);
inputs above `--max-pixels` and files that are not readable images get a clear message. `spaces/tinysr/app.py`
starts the same app on a Hugging Face Space.

gradio is optional (`pip install "tinysr-diffusers[demo]"`): it, torch and the pipelines are imported only when the
app is built, so `tinysr --help` does not import them.
"""

import argparse
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
import warnings
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from .tiling import TileSettings  # torch loads when tiles are made
from .loading import (  # standard library only at import
    ModelLoadError,
    add_model_arguments,
    check_model_arguments,
    load_pipeline_from_args,
    one_line,
)


EXAMPLES_DIR = Path(__file__).with_name("demo_examples")
DEFAULT_MAX_PIXELS = 512 * 512  # input pixels of work (`padded_work`); the 4x output has 16 times as many
# The pipeline pads the 4x upscale to multiples of 16 output pixels and runs tiles of latent rows, so a thin image
# costs more per pixel: a side below 8 input pixels is counted as 8.
WORK_MIN_SIDE = 8
OUTSCALE_RANGE = (1.0, 4.0)
TILE_SIZES = (0, 32, 48, 64, 96, 128)  # latent pixels (x8 = output pixels of a tile); 0: no tiling
COLOR_FIXES = ("default", "adain", "wavelet", "none")  # default: the model's own
RESULT_MAX_AGE_S = 3600  # downloadable PNGs older than this are deleted at the next run
INSTALL_HINT = 'pip install "tinysr-diffusers[demo]"'


class DemoInputError(ValueError):
    """An input the demo refuses, with the message shown to the user."""


# ----------------------------------------------------------------------------------------------------- the work
def super_resolve(pipe, image, outscale: float, **call_kwargs):
    """Super-resolve `image` by `outscale` with the pipeline's `outscale=` (Real-ESRGAN's `--outscale`): its 4x, then
    a Lanczos resample to round(outscale * side) pixels (halves to even), at least 1."""
    return pipe(image, outscale=outscale, **call_kwargs).images[0]


TILES_DESC = "Super-resolving tiles"


class _GradioBar:
    """The part of tqdm's interface a pipeline's hand-advanced bar uses (`total`, `update`, `refresh`, `close`),
    shown in a `gr.Progress` (whose own `tqdm` only wraps iterables)."""

    def __init__(self, progress: Callable, total: int):
        self.progress, self.total, self.n = progress, total, 0
        self.refresh()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.refresh()

    def refresh(self) -> None:
        self.progress(self.n / max(self.total, 1), desc=TILES_DESC)

    def close(self) -> None:
        self.refresh()


@contextmanager
def _tile_progress(pipe, progress: Optional[Callable]) -> Iterator[None]:
    """Report the pipeline's tile batches to a `gr.Progress` (the pipeline wraps them in `self.progress_bar`)."""
    if progress is None:
        yield
        return

    def progress_bar(iterable=None, total=None):
        if iterable is None:  # the one bar of a streamed call's passes (`tiling.PassesProgress`), advanced by hand
            return _GradioBar(progress, total)
        return progress.tqdm(iterable, total=total, desc=TILES_DESC, unit="tile batch")

    pipe.progress_bar = progress_bar  # the instance attribute shadows DiffusionPipeline.progress_bar
    try:
        yield
    finally:
        del pipe.progress_bar


def _probe_size(path: Path) -> tuple[int, int]:
    """The image's size from its header, before anything is decoded."""
    import PIL.Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)  # the pixel limit below says it better
        try:
            with PIL.Image.open(path) as image:
                return image.size
        except PIL.Image.DecompressionBombError as error:
            raise DemoInputError(f"This image is too large for the demo ({one_line(error)}).") from error
        except Exception as error:  # noqa: BLE001 - not an image, empty, unknown format
            raise DemoInputError(_unreadable(path, error)) from error


def _unreadable(path: Path, error: BaseException) -> str:
    reason = one_line(error).replace(str(path), path.name)  # not the server's upload folder
    return f"Cannot read this file as an image ({reason}). Upload a PNG, JPEG, WebP, TIFF or BMP photo."


def _describe(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _pixels(count: int) -> str:
    return f"{count / 1e6:.2f} MP" if count >= 100_000 else f"{count:,} pixels"


def padded_work(size: tuple[int, int]) -> int:
    """The input pixels a run costs about as much as: each side counted as at least `WORK_MIN_SIDE`. A thin image
    pays for the model's padding (a 1x100000 input took as long as 7 times its pixels, issue 27)."""
    return math.prod(max(WORK_MIN_SIDE, side) for side in size)


def check_size(size: tuple[int, int], max_pixels: int) -> None:
    """Refuse an input whose padded work (`padded_work`) is above `max_pixels`, saying how to get under the limit."""
    width, height = size
    work = padded_work(size)
    if work > max_pixels:
        side = math.isqrt(max_pixels)
        padded = f"; padded for the model it costs as much as {_pixels(work)}" if work > width * height else ""
        raise DemoInputError(
            f"This image is {_describe(size)} ({_pixels(width * height)}{padded}), above this demo's limit of "
            f"{_pixels(max_pixels)} (e.g. {side}x{side}); crop or downscale it, or run `tinysr upscale` on it "
            "(no limit)."
        )


def check_settings(outscale: Any, color_fix: Any, tile_size: Any) -> tuple[float, Optional[str], Optional[int]]:
    """The UI's settings as pipeline arguments (as they come from the browser or an API client: checked here)."""
    low, high = OUTSCALE_RANGE
    try:
        outscale = float(outscale)
    except (TypeError, ValueError):
        outscale = math.nan
    if not low <= outscale <= high:  # NaN fails too
        raise DemoInputError(f"The output scale must be between {low:g} and {high:g}.")
    if color_fix not in COLOR_FIXES:
        raise DemoInputError(f"The colour fix must be one of {', '.join(COLOR_FIXES)}.")
    try:
        tile_size = int(tile_size)
    except (TypeError, ValueError):
        tile_size = -1
    if tile_size not in TILE_SIZES:
        raise DemoInputError(f"The tile size must be one of {', '.join(map(str, TILE_SIZES))} (0: no tiling).")
    return outscale, None if color_fix == "none" else color_fix, tile_size or None


def upscale_file(
    pipe,
    path: Path,
    *,
    outscale: float = 4.0,
    color_fix: str = "default",
    tile_size: int = TileSettings().size,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    seed: int = 0,
    progress: Optional[Callable] = None,
) -> dict:
    """Read, check and super-resolve one image file as the app does; returns the input (as the pipeline sees it),
    its bicubic and TinySR upscales at the output size, the notes about the file and the wall time of the run.
    Raises `DemoInputError` with the message for the user for a file or setting that the demo refuses."""
    import PIL.Image
    import torch

    from .image_io import read_image
    from .image_processing import to_pil, to_tensors

    outscale, color_fix, tile_size = check_settings(outscale, color_fix, tile_size)
    check_size(_probe_size(path), max_pixels)
    if progress is not None:
        progress(0.0, desc="Reading the image")
    try:
        image, notes = read_image(path)
        low_res = to_pil(to_tensors(image)[0])  # 8-bit L, RGB or RGBA: what the model sees
    except Exception as error:  # noqa: BLE001 - truncated, corrupt, NaN, empty
        raise DemoInputError(_unreadable(path, error)) from error
    check_size(low_res.size, max_pixels)

    start = time.perf_counter()
    with _tile_progress(pipe, progress):
        output = super_resolve(
            pipe,
            low_res,
            outscale,
            color_fix=color_fix,
            tile_size=tile_size,
            tile_overlap=TileSettings().overlap,
            generator=torch.Generator(device="cpu").manual_seed(seed),
        )
    seconds = time.perf_counter() - start
    bicubic = low_res.resize(output.size, PIL.Image.Resampling.BICUBIC)
    return {"input": low_res, "bicubic": bicubic, "output": output, "notes": notes, "seconds": seconds}


# ------------------------------------------------------------------------------------------------------ the app
def example_files(folder: Optional[os.PathLike] = None) -> list[Path]:
    """The example photos offered under the input (PNG/JPEG files of `folder`, default: the bundled ones)."""
    folder = Path(folder) if folder is not None else EXAMPLES_DIR
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))


def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(name).stem).strip("_")[:64] or "image"


def _remove_old_results(folder: Path, max_age_s: float) -> None:
    now = time.time()
    for entry in folder.iterdir():
        try:
            if now - entry.stat().st_mtime > max_age_s:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def _device_name(pipe) -> str:
    try:
        return str(pipe._execution_device)
    except Exception:  # noqa: BLE001 - only for the info line
        return "?"


def build_demo(
    pipe,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    examples: Optional[Sequence[os.PathLike]] = None,
    tile_size: int = TileSettings().size,
    seed: int = 0,
    title: str = "TinySR",
):
    """The Blocks app around `pipe` (a loaded `OneStepSRPipeline`); queue: one job at a time.

    `examples`: image files offered under the input (default: the bundled photos; `[]` for none). Launch it with
    `demo.launch(**launch_kwargs(...))` (or `launch(args)`) so the theme and file access are those of `tinysr demo`.
    """
    import gradio as gr

    if tile_size not in TILE_SIZES:
        raise ValueError(f"tile_size must be one of {TILE_SIZES}, got {tile_size!r}")
    examples = example_files() if examples is None else [Path(path) for path in examples]
    factor = getattr(pipe, "vae_scale_factor", 8)  # output pixels per latent pixel
    results = Path(tempfile.mkdtemp(prefix="tinysr-demo-"))

    def run(image, outscale, color_fix, tile, progress=gr.Progress()):  # noqa: B008 - how gradio injects it
        # preprocess=False: `image` is the uploaded file's record ({"path": ..., "orig_name": ...}), opened only here
        # so that a bad file gets the same clear message in the browser and through the API.
        if not image or not image.get("path"):
            raise gr.Error("Upload an image first (or pick an example below it).", print_exception=False)
        path = Path(image["path"])
        try:
            result = upscale_file(pipe, path, outscale=outscale, color_fix=color_fix, tile_size=tile,
                                  max_pixels=max_pixels, seed=seed, progress=progress)
        except DemoInputError as error:
            raise gr.Error(str(error), print_exception=False) from None  # the user's input: no traceback
        _remove_old_results(results, RESULT_MAX_AGE_S)
        folder = results / uuid.uuid4().hex
        folder.mkdir()
        scale = float(outscale)
        target = folder / f"{_safe_stem(image.get('orig_name') or path.name)}_tinysr_x{scale:g}.png"
        result["output"].save(target, format="PNG")
        info = (
            f"**Input** {_describe(result['input'].size)} px → **output** {_describe(result['output'].size)} px "
            f"(x{scale:g}) · {type(pipe).__name__} in {result['seconds']:.2f} s on {_device_name(pipe)}"
        )
        if result["notes"]:
            info += "\n\n" + "\n".join(f"- note: {note}" for note in result["notes"])
        return (result["bicubic"], result["output"]), str(target), info

    intro = (
        f"Inputs up to {_pixels(max_pixels)}; larger images run tile by tile (tile size). "
        "The slider compares bicubic interpolation (left) with the super-resolved result (right) at the output size."
    )
    with gr.Blocks(title=f"{title} super-resolution", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.Markdown(f"# {title}: one-step 4x super-resolution\n{intro}")
        with gr.Row():
            with gr.Column(scale=1):
                image_input = gr.Image(
                    type="filepath",
                    label="Low-resolution image",
                    sources=["upload", "clipboard"],
                    elem_id="tinysr-input",
                )
                outscale = gr.Slider(
                    *OUTSCALE_RANGE,
                    value=4.0,
                    step=0.1,
                    label="Output scale",
                    info="TinySR upscales 4x; other scales resample its output with Lanczos (Real-ESRGAN's --outscale).",
                    elem_id="tinysr-outscale",
                )
                color_fix = gr.Radio(
                    list(COLOR_FIXES),
                    value="default",
                    label="Colour fix",
                    info="Match the input's colours: adain (channel statistics), wavelet (low frequencies) or none.",
                )
                tile = gr.Dropdown(
                    [("off (whole image at once)", 0)]
                    + [(f"{size} ({size * factor} px output tiles)", size) for size in TILE_SIZES[1:]],
                    value=tile_size,
                    label="Tile size",
                    info="Smaller tiles: less memory, more time.",
                )
                button = gr.Button("Upscale", variant="primary", elem_id="tinysr-run")
                if examples:
                    gr.Examples(
                        [[str(path)] for path in examples],
                        inputs=[image_input],
                        label="Example photos (public domain / CC0, from scikit-image)",
                    )
            with gr.Column(scale=2):
                slider = gr.ImageSlider(
                    label="Bicubic | TinySR",
                    type="pil",
                    format="png",
                    interactive=False,
                    elem_id="tinysr-slider",
                )
                download = gr.File(label="Full-resolution PNG", interactive=False, elem_id="tinysr-download")
                info = gr.Markdown(label="Sizes and time", elem_id="tinysr-info")
        button.click(
            run,
            inputs=[image_input, outscale, color_fix, tile],
            outputs=[slider, download, info],
            api_name="upscale",
            preprocess=False,
            concurrency_limit=1,
            concurrency_id="pipeline",
        )
    demo.queue(default_concurrency_limit=1, max_size=32)
    weakref.finalize(demo, shutil.rmtree, results, ignore_errors=True)
    demo.tinysr_examples = examples
    return demo


def launch_kwargs(demo, host: Optional[str] = None, port: Optional[int] = None, share: bool = False) -> dict:
    """The arguments of `demo.launch` that `tinysr demo` uses: local fonts (no request leaves the page), the example
    folder readable, errors shown."""
    import gradio as gr

    system_fonts = ["ui-sans-serif", "system-ui", "sans-serif"]
    theme = gr.themes.Default(font=system_fonts, font_mono=["ui-monospace", "monospace"])
    folders = sorted({str(Path(path).resolve().parent) for path in getattr(demo, "tinysr_examples", [])})
    return {
        "server_name": host,
        "server_port": port,
        "share": share,
        "theme": theme,
        "allowed_paths": folders,
        "show_error": True,
        "footer_links": ["api", "settings"],
    }


# --------------------------------------------------------------------------------------------- model and launch
def _require_gradio() -> None:
    try:
        import gradio  # noqa: F401
    except ImportError as error:
        raise ModelLoadError(f"`tinysr demo` needs gradio ({one_line(error)}): {INSTALL_HINT}") from error


def launch(args: argparse.Namespace, *, block: bool = True):
    """Load the model of `args` (parsed by `add_demo_parser`), build the app and serve it; returns the app, when the
    server stops (`block=True`, Ctrl-C) or at once with the server running (`block=False`: close it with
    `demo.close()`). Raises `ModelLoadError` (one line) if gradio or the model is missing."""
    _require_gradio()
    pipe = load_pipeline_from_args(args)
    pipe.set_progress_bar_config(disable=True)
    examples = None if args.examples is None else example_files(args.examples)
    demo = build_demo(pipe, max_pixels=args.max_pixels, examples=examples, tile_size=args.tile_size, seed=args.seed)
    if block and threading.current_thread() is threading.main_thread():
        # SIGTERM (how a Space or a supervisor stops the app) closes it as Ctrl-C does, so the result files go too.
        signal.signal(signal.SIGTERM, _interrupt)
    demo.launch(
        prevent_thread_lock=not block,
        quiet=not block,
        **launch_kwargs(demo, host=args.host, port=args.port, share=args.share),
    )
    return demo


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _command(args: argparse.Namespace) -> int:
    try:
        launch(args)
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0-65535), got {text}")
    return value


# The help of `tinysr demo` and of `python -m tinysr_diffusers.demo`, the same command.
DESCRIPTION = (
    "Serve a Gradio app that super-resolves uploaded images with the default model or --model: a before/after slider "
    "(bicubic vs TinySR), the full-resolution PNG, sizes and run time. Needs the demo extra "
    f"({INSTALL_HINT})."
)


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of `tinysr demo` to `parser`."""
    add_model_arguments(parser, compile_option=False)  # as `tinysr upscale`: pipeline folders, Hub repos, ONNX
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="Address to serve on (default: $GRADIO_SERVER_NAME or 127.0.0.1; 0.0.0.0 for every interface).",
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        help="Port (default: $GRADIO_SERVER_PORT or 7860).",
    )
    parser.add_argument("--share", action="store_true", help="Also open a public gradio.live link.")
    parser.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=DEFAULT_MAX_PIXELS,
        help=f"Largest input accepted, in pixels (default {DEFAULT_MAX_PIXELS} = 512x512); larger ones get a message.",
    )
    parser.add_argument(
        "--tile-size",
        type=int,
        choices=TILE_SIZES,
        default=TileSettings().size,
        help="Initial latent tile size of the UI (64 = 512 output pixels; 0: no tiling).",
    )
    parser.add_argument("--examples", default=None, help="Folder of example photos (default: the bundled ones).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the VAE posterior sample (AutoencoderKL).")
    parser.set_defaults(func=_command)
    return parser


def add_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="Try a pipeline in the browser: a Gradio app with a before/after slider.", description=DESCRIPTION
    )
    configure_parser(parser)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m tinysr_diffusers.demo [options]` (and the Space's app.py): `tinysr demo` without the subcommand."""
    parser = argparse.ArgumentParser(prog="tinysr demo", description=DESCRIPTION)
    args = configure_parser(parser).parse_args(argv)
    check_model_arguments(parser, args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
