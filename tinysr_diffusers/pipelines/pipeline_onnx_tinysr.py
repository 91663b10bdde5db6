"""TinySR on onnxruntime or OpenVINO: the folder `tinysr export onnx` writes, run through the torch pipeline's recipe.

Only the models differ from [`TinySRPipeline`]: `predict_velocity` runs the exported transformer, and the exported
encoder and decoder are called as a diffusers VAE is ([`OnnxAutoencoder`]), so pre-processing, latent and VAE tiling
(same geometry, same blending, streamed), the step and the colour fix are the base class's code. The runtime is
imported when a folder is loaded, not with the package.
"""

import importlib
import os
from typing import Optional, Sequence, Union

import torch
from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput
from diffusers.models.autoencoders.vae import DecoderOutput

from ..color_fix import check_color_fix
from .onnx_folder import MODEL_FILE, RUNTIMES, read_settings
from .pipeline_one_step_sr import OneStepSRPipeline


class OnnxModel:
    """An onnxruntime session called like the module it was exported from: one float32 tensor in, one out."""

    dtype = torch.float32  # what the base pipeline casts inputs to

    def __init__(self, path: str, providers: Optional[Sequence[str]] = None, session_options=None):
        onnxruntime = _import_runtime("onnxruntime", "onnx")
        self.path = path
        self.session = onnxruntime.InferenceSession(
            path, sess_options=session_options, providers=list(providers or ["CPUExecutionProvider"])
        )
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, sample: torch.Tensor) -> torch.Tensor:
        inputs = {self.input_name: sample.detach().to("cpu", torch.float32).contiguous().numpy()}
        return torch.from_numpy(self.session.run(None, inputs)[0]).to(sample.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, providers={self.session.get_providers()})"


class OpenVinoModel:
    """The same ONNX graph compiled by OpenVINO for the CPU (dynamic height and width, latency-tuned): on CPUs
    without native bf16 its convolutions are faster than onnxruntime's (`benchmarks/cpu_settings.py`)."""

    dtype = torch.float32

    def __init__(self, path: str, num_threads: Optional[int] = None, core=None):
        """`core`: an `openvino.Core` to share between a pipeline's three models (default: a new one)."""
        core = core or _import_runtime("openvino", "openvino").Core()
        self.path = path
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if num_threads:
            config["INFERENCE_NUM_THREADS"] = str(num_threads)
        self.compiled = core.compile_model(path, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, sample: torch.Tensor) -> torch.Tensor:
        output = self.request.infer([sample.detach().to("cpu", torch.float32).contiguous().numpy()])[0]
        return torch.from_numpy(output).to(sample.device)  # `infer` returns a copy of the request's buffer

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"


ExportedModel = Union[OnnxModel, OpenVinoModel]


def _import_runtime(name: str, extra: str):
    """Import a runtime, or say which extra installs it."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(f"{name} is not installed: pip install 'tinysr-diffusers[{extra}]'") from error


class OnnxAutoencoder:
    """The tiny VAE's exported encoder and decoder, called as a diffusers VAE (images in [-1, 1] <-> unscaled
    latents); the pipeline tiles it."""

    dtype = torch.float32
    use_tiling = False  # no tiling of its own

    def __init__(self, encoder: ExportedModel, decoder: ExportedModel):
        self.encoder = encoder
        self.decoder = decoder

    def encode(self, sample: torch.Tensor) -> AutoencoderTinyOutput:
        return AutoencoderTinyOutput(latents=self.encoder(sample))

    def decode(self, latents: torch.Tensor) -> DecoderOutput:
        return DecoderOutput(sample=self.decoder(latents))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(encoder={self.encoder!r}, decoder={self.decoder!r})"


def _setting(name: str) -> property:
    """A read-only property of the pipeline that returns the setting `name` of its config (`onnx_folder.SETTINGS`)."""
    return property(lambda pipe: pipe.config[name])


class OnnxTinySRPipeline(OneStepSRPipeline):
    r"""
    TinySR exported to ONNX (`tinysr export onnx`), run with onnxruntime or OpenVINO: the same `__call__` as
    [`TinySRPipeline`] (tiling included) and the same outputs up to float rounding, without PyTorch models.

    Parameters:
        transformer ([`OnnxModel`] or [`OpenVinoModel`]): The exported transformer (scaled latents -> velocity).
        vae ([`OnnxAutoencoder`]): The exported tiny VAE encoder and decoder.
        scaling_factor (`float`): Latent scale of the VAE.
        latent_shift (`float`): Latent shift the source pipeline applied (0 for the releases).
        vae_scale_factor (`int`): Pixels per latent pixel (8).
        patch_size (`int`): Patch size of the transformer.
        max_latent_size (`int`): Largest latent side the transformer accepts (its position-embedding grid).
        color_fix (`str`, *optional*): The colour fix a call uses unless it names one: the source pipeline's.

    Example:
        ```py
        >>> from tinysr_diffusers.pipelines.pipeline_onnx_tinysr import OnnxTinySRPipeline
        >>> pipe = OnnxTinySRPipeline.from_pretrained("tinysr-onnx")  # written by `tinysr export onnx`
        >>> image = pipe(low_res_image).images[0]
        >>> pipe = OnnxTinySRPipeline.from_pretrained("tinysr-onnx", runtime="openvino")  # the openvino extra
        ```
    """

    def __init__(
        self,
        transformer: ExportedModel,
        vae: OnnxAutoencoder,
        *,
        scaling_factor: float = 1.5305,
        latent_shift: float = 0.0,
        vae_scale_factor: int = 8,
        patch_size: int = 2,
        max_latent_size: int = 384,
        color_fix: Optional[str] = "adain",
    ):
        super().__init__()
        check_color_fix(color_fix)
        self.register_modules(transformer=transformer, vae=vae)
        self.register_to_config(
            scaling_factor=scaling_factor,
            latent_shift=latent_shift,
            vae_scale_factor=vae_scale_factor,
            patch_size=patch_size,
            max_latent_size=max_latent_size,
            color_fix=color_fix,
        )

    # What the base class reads from the torch models' configs, an export reads from its settings.
    vae_scale_factor = _setting("vae_scale_factor")
    patch_size = _setting("patch_size")
    max_latent_size = _setting("max_latent_size")
    latent_scale = _setting("scaling_factor")
    latent_shift = _setting("latent_shift")

    def predict_velocity(self, latents: torch.Tensor, transformer: Optional[ExportedModel] = None) -> torch.Tensor:
        """The exported transformer on `z_L`; latents larger than its position-embedding grid need tiling."""
        limit = self.max_latent_size
        if max(latents.shape[-2:]) > limit:
            raise ValueError(
                f"Latent size {tuple(latents.shape[-2:])} exceeds the transformer's {limit} per side: pass a "
                "`tile_size` (the default 64 tiles any image)."
            )
        return (transformer if transformer is not None else self.transformer)(latents)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        providers: Optional[Sequence[str]] = None,
        session_options=None,
        runtime: str = "onnxruntime",
        num_threads: Optional[int] = None,
    ) -> "OnnxTinySRPipeline":
        """Load a folder written by `tinysr export onnx` (`export_onnx`) into `runtime`: "onnxruntime" with its
        `providers` (default: CPU) and `session_options` (an `onnxruntime.SessionOptions`), or "openvino" (its CPU
        device). `num_threads` caps either runtime's threads (default: the runtime's own choice)."""
        if runtime not in RUNTIMES:
            raise ValueError(f"Unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}.")
        if runtime == "openvino" and (providers or session_options):
            raise ValueError("`providers` and `session_options` are onnxruntime's: OpenVINO takes `num_threads`.")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {num_threads}.")
        if num_threads and session_options is not None:
            raise ValueError("Pass `num_threads` or `session_options` (its `intra_op_num_threads`), not both.")
        folder = os.fspath(pretrained_model_name_or_path)
        settings = read_settings(folder)  # before any graph loads: a wrong setting is one error naming it
        if runtime == "onnxruntime" and num_threads:
            session_options = _import_runtime("onnxruntime", "onnx").SessionOptions()
            session_options.intra_op_num_threads = num_threads
        core = _import_runtime("openvino", "openvino").Core() if runtime == "openvino" else None

        def session(name: str) -> ExportedModel:
            path = os.path.join(folder, name, MODEL_FILE)
            if runtime == "openvino":
                return OpenVinoModel(path, num_threads, core)
            return OnnxModel(path, providers, session_options)

        return cls(
            transformer=session("transformer"),
            vae=OnnxAutoencoder(session("vae_encoder"), session("vae_decoder")),
            **settings,
        )

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Not supported: the folder is the export itself (`tinysr export onnx` writes it from a torch pipeline)."""
        raise NotImplementedError("Copy the exported folder, or export the torch pipeline again.")
