"""Export a TinySR pipeline to ONNX: `tinysr export onnx PIPELINE -o DIR`.

The folder (its layout: `pipelines/onnx_folder.py`) holds the tiny VAE's encoder and decoder and the transformer,
each with dynamic batch, height and width (the dynamo exporter of `torch.onnx`; with --int8 the transformer's linear
layers are int8), plus `onnx_pipeline.json` with what the recipe needs besides the graphs. [`OnnxTinySRPipeline`]
runs it with onnxruntime or OpenVINO, with the same `__call__` and tiling as the torch pipeline; `tinysr upscale
--model DIR` takes it too. The command (its options and messages) is in `cli.py`.

Only the standard library is imported here: torch, diffusers and onnx load when an export runs.
"""

import contextlib
import json
import os
import tempfile
from typing import TYPE_CHECKING, Iterator

from .pipelines.onnx_folder import CONFIG_NAME, MODEL_FILE


if TYPE_CHECKING:
    import torch

    from .pipelines import OneStepSRPipeline


def export_onnx(pipe: "OneStepSRPipeline", output_dir: str, int8: bool = False) -> str:
    """Write the encoder, decoder and transformer of `pipe` (a `TinySRPipeline` with a tiny VAE) to `output_dir`.

    The graphs are exported in float32 on the CPU (from copies where `pipe` is in another dtype or device, so `pipe`
    is left as it is). With `int8`, the transformer's linear layers get int8 weights and dynamically quantised
    activations (onnxruntime's `quantize_dynamic`); the VAE stays float32. Returns `output_dir`.
    """
    import torch
    from diffusers import AutoencoderTiny

    from .models import TinySRAutoencoder
    from .pipelines import TinySRPipeline

    if not isinstance(pipe, TinySRPipeline) or not isinstance(pipe.vae, (TinySRAutoencoder, AutoencoderTiny)):
        raise TypeError(
            "ONNX export needs a TinySRPipeline with a tiny VAE (TinySRAutoencoder or AutoencoderTiny), got a "
            f"{type(pipe).__name__} with a {type(getattr(pipe, 'vae', None)).__name__}."
        )
    factor, patch = pipe.vae_scale_factor, pipe.patch_size
    channels = pipe.transformer.config.in_channels
    max_patches = pipe.transformer.config.pos_embed_max_size  # the position-embedding grid bounds the latent size
    dim = torch.export.Dim
    batch, height, width = dim("batch", min=1, max=4096), dim("height", min=1), dim("width", min=1)
    patches_h, patches_w = dim("patches_h", min=1, max=max_patches), dim("patches_w", min=1, max=max_patches)
    transformer = _float32_cpu(pipe.transformer)
    graphs = {  # module, example input (batch 2: an example batch of 1 would fix it), its dynamic height and width
        "vae_encoder": (pipe.vae.encoder, (2, 3, 2 * factor, 2 * factor), factor * height, factor * width),
        "vae_decoder": (pipe.vae.decoder, (2, channels, 2, 2), height, width),
        "transformer": (
            _velocity_graph(transformer), (2, channels, 2 * patch, 2 * patch), patch * patches_h, patch * patches_w
        ),
    }
    for name, (module, shape, sample_height, sample_width) in graphs.items():
        path = os.path.join(output_dir, name, MODEL_FILE)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        crop = _exportable_pos_embed(transformer.pos_embed) if name == "transformer" else contextlib.nullcontext()
        with tempfile.TemporaryDirectory() as scratch, crop:
            exported = os.path.join(scratch, MODEL_FILE) if name == "transformer" and int8 else path
            torch.onnx.export(
                _float32_cpu(module),
                (torch.zeros(shape),),
                exported,
                input_names=["sample"],
                output_names=["output"],
                dynamic_shapes=({0: batch, 2: sample_height, 3: sample_width},),
                dynamo=True,
                external_data=True,
            )
            if exported != path:
                _quantize_linears(exported, path)
    config = {
        "_class_name": "OnnxTinySRPipeline",
        "source_class_name": type(pipe).__name__,
        "scaling_factor": pipe.vae.config.scaling_factor,
        "latent_shift": pipe.latent_shift,
        "vae_scale_factor": factor,
        "patch_size": patch,
        "max_latent_size": max_patches * patch,
        "color_fix": pipe.default_color_fix,  # what a call's color_fix="default" resolves to
        "int8": int8,
        "exported_with_torch": torch.__version__,
    }
    with open(os.path.join(output_dir, CONFIG_NAME), "w") as file:
        json.dump(config, file, indent=2)
    return output_dir


def _velocity_graph(transformer: "torch.nn.Module") -> "torch.nn.Module":
    """The transformer as a tensor -> tensor module (the exporter cannot return its output dataclass)."""
    import torch

    class Velocity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = transformer

        def forward(self, latents: torch.Tensor) -> torch.Tensor:
            return self.transformer(latents, return_dict=False)[0]

    return Velocity().eval()


@contextlib.contextmanager
def _exportable_pos_embed(patch_embed: "torch.nn.Module") -> Iterator[None]:
    """Export SD3's position-embedding crop right for odd patch counts.

    torch.onnx (torch 2.14) writes the crop offset `(M - h) // 2` as `M // 2 + (-h) // 2` with ONNX's integer `Div`,
    which truncates where Python floors: one row off for odd `h`. The same offset as `M // 2 - (h + 1 - M % 2) // 2`
    divides only non-negative numbers. The size checks are left to the exported height and width bounds.
    """
    size = patch_embed.pos_embed_max_size

    def cropped_pos_embed(height: int, width: int) -> "torch.Tensor":
        height, width = height // patch_embed.patch_size, width // patch_embed.patch_size
        top = size // 2 - (height + 1 - size % 2) // 2
        left = size // 2 - (width + 1 - size % 2) // 2
        grid = patch_embed.pos_embed.reshape(1, size, size, -1)[:, top : top + height, left : left + width, :]
        return grid.reshape(1, -1, grid.shape[-1])

    patch_embed.cropped_pos_embed = cropped_pos_embed
    try:
        yield
    finally:
        del patch_embed.cropped_pos_embed


def _float32_cpu(module: "torch.nn.Module") -> "torch.nn.Module":
    import copy

    import torch

    parameter = next(module.parameters())
    if parameter.dtype != torch.float32 or parameter.device.type != "cpu":
        module = copy.deepcopy(module).to(device="cpu", dtype=torch.float32)
    return module.eval()


def _quantize_linears(source: str, target: str) -> None:
    """int8 weights (per output channel) and dynamically quantised activations for the linear layers (MatMul and
    Gemm with a constant weight; the attention's activation-by-activation products stay float32).

    Weights use 7 of the 8 bits (`reduce_range`): onnxruntime's uint8 x int8 kernels on x86 CPUs without VNNI (AVX2,
    AVX-512 without VNNI) add pairs of products in 16 bits, which saturates with full-range weights (measured on a
    2-core AVX2 AMD EPYC: mean error 0.040 of the float32 output with full range). An exported folder may run on
    any CPU, so the range is reduced everywhere."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        source,
        target,
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=True,
        reduce_range=True,
        weight_type=QuantType.QInt8,
        use_external_data_format=True,
    )
