"""`--dtype auto` and the CPU helpers: bf16 exactly where the CPU has native bf16 matrix units."""

import pytest
import torch

from tests.tiny_pipelines import photo, tiny_student
from tinysr_diffusers import devices
from tinysr_diffusers.devices import auto_dtype, cpu_has_native_bf16, optimize_for_cpu


SAPPHIRE_RAPIDS = "fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8"
ZEN4 = "fpu sse2 avx2 avx512f avx512_bf16"
SKYLAKE = "fpu sse2 avx2 avx512f avx512bw"


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """Make the CPU look like one with the given /proc/cpuinfo flags, with torch's own query (torch >= 2.9) either
    answering from the same flags or, with `torch_knows=False`, missing as in older torch."""

    def fake(flags: str, torch_knows: bool = True) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
        monkeypatch.setattr(devices, "CPUINFO", str(path))
        if torch_knows:
            capabilities = {flag: True for flag in flags.split()}
            monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
        else:
            monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)

    return fake


@pytest.mark.parametrize("torch_knows", [True, False], ids=["torch-capabilities", "proc-cpuinfo"])
@pytest.mark.parametrize(
    "flags, native", [(SAPPHIRE_RAPIDS, True), (ZEN4, True), (SKYLAKE, False), ("", False)],
    ids=["amx", "avx512-bf16", "avx512-without-bf16", "no-flags"],
)
def test_native_bf16_is_detected_from_the_cpu_flags(cpuinfo, flags, native, torch_knows):
    cpuinfo(flags, torch_knows)
    assert cpu_has_native_bf16() is native
    assert auto_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    assert auto_dtype(torch.device("cpu")) == auto_dtype("cpu")


def test_missing_cpuinfo_means_fp32(cpuinfo, monkeypatch, tmp_path):
    cpuinfo(SAPPHIRE_RAPIDS, torch_knows=False)
    monkeypatch.setattr(devices, "CPUINFO", str(tmp_path / "absent"))
    assert auto_dtype("cpu") == torch.float32


def test_no_onednn_means_fp32(cpuinfo, monkeypatch):
    cpuinfo(SAPPHIRE_RAPIDS)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert auto_dtype("cpu") == torch.float32


def test_real_cpu_agrees_with_proc_cpuinfo():
    """torch's query and /proc/cpuinfo name the same flags: both ways give one answer on this machine."""
    if not hasattr(torch.cpu, "get_capabilities") or not devices._cpuinfo_flags():
        pytest.skip("needs torch >= 2.9 on Linux")
    assert cpu_has_native_bf16() == bool(devices._cpuinfo_flags() & set(devices.NATIVE_BF16_FLAGS))


@pytest.mark.parametrize("bf16_supported, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_is_unchanged(cpuinfo, monkeypatch, bf16_supported, expected):
    cpuinfo("")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert auto_dtype("cuda") == expected
    assert auto_dtype("cuda:1") == expected


def test_mps_stays_fp32(cpuinfo):
    cpuinfo(SAPPHIRE_RAPIDS)
    assert auto_dtype("mps") == torch.float32


def test_optimize_for_cpu_puts_the_vae_in_channels_last_and_keeps_the_output():
    pipe = tiny_student()
    image = photo(size=(24, 16))
    expected = pipe(image, output_type="pt", tile_size=None).images
    assert optimize_for_cpu(pipe) is pipe
    convs = [module for module in pipe.vae.modules() if isinstance(module, torch.nn.Conv2d)]
    assert convs and all(conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convs)
    got = pipe(image, output_type="pt", tile_size=None).images
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    tiled = pipe(image, output_type="pt", tile_size=2, tile_overlap=0).images
    assert tiled.shape == expected.shape


@pytest.mark.parametrize("flags, expected", [(ZEN4, torch.bfloat16), (SKYLAKE, torch.float32)], ids=["bf16", "fp32"])
def test_tinysr_upscale_dtype_auto_follows_the_cpu_and_puts_the_vae_in_channels_last(
    cpuinfo, monkeypatch, tmp_path, flags, expected
):
    from tinysr_diffusers import cli
    from tinysr_diffusers.pipelines import TinySRPipeline

    cpuinfo(flags)
    loaded = []

    def load(*args, dtype=None, **kwargs):
        pipe = tiny_student().to(dtype)
        loaded.append(pipe)
        return pipe

    monkeypatch.setattr(TinySRPipeline, "from_pretrained", load)
    photo("astronaut", (24, 20)).save(tmp_path / "in.png")
    assert cli.main(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 0
    (pipe,) = loaded
    assert pipe.transformer.dtype == expected and pipe.vae.dtype == expected
    weight = next(p for p in pipe.vae.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[-1] > 1)
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert (tmp_path / "out" / "in.png").is_file()
