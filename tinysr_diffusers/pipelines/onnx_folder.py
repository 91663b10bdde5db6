"""The folder that `tinysr export onnx` writes and [`OnnxTinySRPipeline`] runs: its names and its settings file.

    DIR/vae_encoder/model.onnx  images in [-1, 1] (B, 3, 8h, 8w) -> unscaled latents (B, C, h, w)
    DIR/vae_decoder/model.onnx  unscaled latents (B, C, h, w) -> images in [-1, 1] (B, 3, 8h, 8w), not clamped
    DIR/transformer/model.onnx  scaled latents (B, C, h, w) -> velocity
    DIR/onnx_pipeline.json      what the recipe needs besides the graphs (`SETTINGS`)

Only the standard library: the command line reads these names before torch loads.
"""

import math
import os
import warnings
from typing import Any, Callable, Union

from ..utils import read_json_object


CONFIG_NAME = "onnx_pipeline.json"
MODEL_FILE = "model.onnx"
COMPONENTS = ("vae_encoder", "vae_decoder", "transformer")
RUNTIMES = ("onnxruntime", "openvino")  # what `OnnxTinySRPipeline` runs an export with
# The colour fix of exports written before the export kept the pipeline's own: the one key that may be missing.
LEGACY_COLOR_FIX = "adain"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_color_fix(value: Any) -> bool:
    from ..color_fix import COLOR_FIX_METHODS  # torch: read when an export loads, not when the command line starts

    return isinstance(value, (str, type(None))) and value in COLOR_FIX_METHODS


# Each setting the pipeline runs with: (the check, what the value must be).
SETTINGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "scaling_factor": (lambda value: _is_number(value) and value != 0, "a finite number other than 0"),
    "latent_shift": (_is_number, "a finite number"),
    "vae_scale_factor": (_is_positive_integer, "a positive integer"),
    "patch_size": (_is_positive_integer, "a positive integer"),
    "max_latent_size": (_is_positive_integer, "a positive integer"),
    "color_fix": (_is_color_fix, 'a colour fix: "adain", "wavelet" or null'),
}


def read_settings(folder: Union[str, os.PathLike]) -> dict[str, Any]:
    """The `SETTINGS` of an export in `folder`, each present and valid, else one `ValueError` naming the file and key.

    A setting the recipe would use with a wrong type or value (a string, 0, NaN) fails here, at load, rather than as
    a wrong or black image later. Only `color_fix` may be missing (exports from before it was kept): AdaIN, with a
    warning.
    """
    path = os.path.join(os.fspath(folder), CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}: write it with `tinysr export onnx`.")
    config = read_json_object(path)
    for name, (valid, expected) in SETTINGS.items():
        if name in config and not valid(config[name]):
            raise ValueError(f"{path}: `{name}` must be {expected}, got {config[name]!r}.")
        if name not in config and name != "color_fix":
            raise ValueError(f"{path} lacks `{name}` ({expected}): export the pipeline again (`tinysr export onnx`).")
    if "color_fix" not in config:
        warnings.warn(
            f"{folder} was exported before exports kept the pipeline's colour fix: calls default to AdaIN; export it "
            "again to keep the source pipeline's own (the default model's is wavelet).",
            stacklevel=3,
        )
    return {"color_fix": LEGACY_COLOR_FIX, **{name: config[name] for name in SETTINGS if name in config}}
