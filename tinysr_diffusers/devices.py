"""Per-device defaults: which dtype `--dtype auto` picks, and the CPU layout the tiny VAE runs fastest in.

bf16 only pays on a CPU with native bf16 matrix units (Intel AMX, AVX512-BF16 on Intel and AMD Zen 4+); elsewhere
its matrix products are emulated and no faster than fp32, so the choice is made from the CPU's flags, not guessed.
"""

from typing import TYPE_CHECKING, Union


if TYPE_CHECKING:
    import torch

    from .pipelines import OneStepSRPipeline

# CPU flags (as torch.cpu.get_capabilities and Linux's /proc/cpuinfo name them) of native bf16 matrix instructions.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = "/proc/cpuinfo"
DTYPE_HELP = ("auto: bfloat16 (float16 where unsupported) on CUDA, bfloat16 on a CPU with native bf16 matrix units "
              "(AMX / AVX512-BF16), else float32 (measured: benchmarks/results/cpu_settings.md).")


def _cpuinfo_flags() -> set[str]:
    """The `flags` of the first processor in /proc/cpuinfo (Linux); empty where the file does not exist."""
    try:
        with open(CPUINFO) as file:
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX-BF16 or AVX512-BF16) and torch can use it (oneDNN).

    torch's own runtime detection (`torch.cpu.get_capabilities`, torch >= 2.9) is asked first; older torch falls
    back to /proc/cpuinfo, where the flags have the same names.
    """
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        capabilities = get_capabilities()
        return any(capabilities.get(flag, False) for flag in NATIVE_BF16_FLAGS)
    return bool(_cpuinfo_flags().intersection(NATIVE_BF16_FLAGS))


def auto_dtype(device: Union[str, "torch.device"]) -> "torch.dtype":
    """The inference dtype for `device`: on CUDA bf16 (fp16 where bf16 is unsupported), on a CPU with native bf16
    matrix units bf16, else fp32 (also on MPS)."""
    import torch

    device_type = torch.device(device).type
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device_type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def optimize_for_cpu(pipe: "OneStepSRPipeline") -> "OneStepSRPipeline":
    """Put the VAE's convolutions in channels_last, which oneDNN runs faster on CPUs (the tiny VAE's encode ~2x,
    decode ~1.4x in fp32 on an AMX Xeon, issue 16); outputs are unchanged. Returns `pipe`; a no-op off the CPU."""
    import torch

    vae = getattr(pipe, "vae", None)  # a pipeline loaded with trust_remote_code may have none
    if isinstance(vae, torch.nn.Module) and vae.device.type == "cpu":
        vae.to(memory_format=torch.channels_last)
    return pipe


def compile_pipeline(
    pipe: "OneStepSRPipeline", mode: str | None = None, dynamic: bool | None = None
) -> "OneStepSRPipeline":
    """Compile the pipeline's heavy modules in place with `torch.compile`: the transformer and the VAE's encoder
    and decoder (which `vae.encode` / `vae.decode` and the VAE's own tiling call). Returns `pipe`.

    Opt-in, because compiling takes tens of seconds on the first call (and again for each new input shape); it pays
    only when many same-size inputs follow, as tiles do (every tile of an image, and of every image tiled alike, has
    one shape). `mode` and `dynamic` are `torch.compile`'s. `nn.Module.compile` is used, so the module objects,
    their configs and state dicts (no `_orig_mod.` prefixes) are unchanged and `save_pretrained` writes the same
    files. Raises `ValueError` for a pipeline without torch modules (ONNX).
    """
    import torch

    vae = pipe.vae
    modules = [pipe.transformer, getattr(vae, "encoder", None), getattr(vae, "decoder", None)]
    modules = [module for module in modules if isinstance(module, torch.nn.Module)]
    if not modules:
        raise ValueError(f"{type(pipe).__name__} has no torch modules to compile (ONNX runs in onnxruntime).")
    for module in modules:
        module.compile(mode=mode, dynamic=dynamic)
    return pipe
