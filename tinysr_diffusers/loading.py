"""One way to load a pipeline for a command: `--model` and the options that go with it, shared by `tinysr upscale`,
`tinysr demo` and the benchmarks, so that they all accept the same folders (a pipeline folder or Hub repo, an ONNX
export, or the default model) and refuse the same things the same way.

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args()
    check_model_arguments(parser, args)   # usage errors before anything heavy is imported
    pipe = load_pipeline_from_args(args)  # ModelLoadError: one line

Only the standard library is imported here until a pipeline is loaded, so `--help` and usage errors come at once.
"""

import argparse
import os
from typing import TYPE_CHECKING, Optional

from .devices import DTYPE_HELP
from .pipelines.onnx_folder import CONFIG_NAME as ONNX_CONFIG_NAME
from .pipelines.onnx_folder import RUNTIMES


if TYPE_CHECKING:
    import torch

    from .pipelines import OneStepSRPipeline

DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")  # "auto": devices.auto_dtype; the others torch's names
TRUST_HELP = "Allow a model folder whose code is not TinySR's own shims (only for code you have read)."


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message is one line."""


def one_line(error: BaseException) -> str:
    """An exception as `Type: message` on one line (what a command prints instead of a traceback)."""
    message = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {message}"


def add_model_arguments(parser: argparse.ArgumentParser, *, compile_option: bool = True) -> None:
    """--model, --runtime, --dtype, --device, --trust-remote-code (and --compile unless `compile_option` is False)."""
    parser.add_argument("--model", default=None, help="Pipeline folder or Hub repo id (saved by save_pretrained), "
                        "or a folder written by `tinysr export onnx`; default: the model shipped with the package "
                        "(tinysr_diffusers.DEFAULT_MODEL).")
    parser.add_argument("--runtime", choices=RUNTIMES, default=None, help="The runtime of an ONNX --model (default: "
                        "onnxruntime; openvino was faster on an AVX2 CPU, benchmarks/cpu_settings.py).")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="auto", help=DTYPE_HELP)
    parser.add_argument("--device", default=None, help="Torch device (default: cuda, then mps, then cpu).")
    if compile_option:
        parser.add_argument("--compile", action="store_true", help="torch.compile the transformer and the VAE "
                            "(opt-in: the first call compiles, about 80 s on 2 CPU threads, and no steady-state gain "
                            "was measured on an AVX2 CPU; benchmarks/cpu_settings.py).")
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)


def is_onnx_export(model: Optional[str]) -> bool:
    """Whether `model` is a folder written by `tinysr export onnx` (run by `OnnxTinySRPipeline`, not torch)."""
    return model is not None and os.path.isfile(os.path.join(model, ONNX_CONFIG_NAME))


def check_model_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors of the model options (`parser.error`: one line, exit 2) before anything loads."""
    onnx = is_onnx_export(args.model)
    if args.runtime and not onnx:
        parser.error(f"--runtime {args.runtime} runs an ONNX export: a --model folder from `tinysr export onnx`")
    torch_options = args.device not in (None, "cpu") or args.dtype not in ("auto", "float32")
    if onnx and (torch_options or getattr(args, "compile", False) or args.trust_remote_code):
        parser.error("an ONNX export runs in float32 on the CPU: leave out --device, --dtype, --compile and "
                     "--trust-remote-code")


def default_device() -> str:
    """cuda, then mps, then cpu."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(name: str, device: str) -> "torch.dtype":
    """A `DTYPE_NAMES` entry as a torch dtype for `device`."""
    import torch

    from .devices import auto_dtype

    return auto_dtype(device) if name == "auto" else getattr(torch, name)


def load_pipeline(
    model: Optional[str] = None,
    *,
    device: Optional[str] = None,
    dtype: str = "auto",
    runtime: Optional[str] = None,
    trust_remote_code: bool = False,
    compile: bool = False,
) -> "OneStepSRPipeline":
    """The pipeline of `model` ready to run: an ONNX export with `runtime`, else a pipeline folder or Hub repo (the
    default model when `model` is None) on `device` in `dtype`, its VAE in channels_last on the CPU, compiled if
    asked. Raises `ModelLoadError` with one line saying what could not be loaded and why."""
    from .devices import compile_pipeline, optimize_for_cpu

    try:
        if is_onnx_export(model):
            from .pipelines import OnnxTinySRPipeline

            return OnnxTinySRPipeline.from_pretrained(model, runtime=runtime or RUNTIMES[0])
        device = device or default_device()
        torch_dtype = resolve_dtype(dtype, device)  # inside: a bad --device is one line too
        if model is None:
            from .pipelines import TinySRPipeline

            pipe = TinySRPipeline.from_pretrained(dtype=torch_dtype)
        else:
            from .pipelines import OneStepSRPipeline

            pipe = OneStepSRPipeline.from_pretrained(model, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        pipe = optimize_for_cpu(pipe.to(device))
        return compile_pipeline(pipe) if compile else pipe
    except Exception as error:  # noqa: BLE001 - a bad model is one clear line, not a traceback
        if model is None:
            import tinysr_diffusers

            default = getattr(tinysr_diffusers, "DEFAULT_MODEL", None)
            where = f" ({os.fspath(default)})" if default else " (none shipped: tinysr_diffusers.DEFAULT_MODEL)"
            raise ModelLoadError(
                f"cannot load the default model{where}: {one_line(error)}; pass --model PATH_OR_REPO"
            ) from error
        raise ModelLoadError(f"cannot load --model {model}: {one_line(error)}") from error


def load_pipeline_from_args(args: argparse.Namespace) -> "OneStepSRPipeline":
    """`load_pipeline` with the options `add_model_arguments` parsed."""
    return load_pipeline(args.model, device=args.device, dtype=args.dtype, runtime=args.runtime,
                         trust_remote_code=args.trust_remote_code, compile=getattr(args, "compile", False))
