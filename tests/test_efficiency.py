"""The efficiency benchmark's code path on tiny models: files and fields, not timings."""

import json
import os
import statistics
from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import efficiency
from benchmarks.efficiency import QUICK, STUDENT, STUDENT_FOLDED, TEACHER
from tinysr_diffusers import TinySRAutoencoder


TINY = replace(
    QUICK,
    name="tiny",
    width_divisor=24,  # one attention head of 64, 2-channel tiny VAE
    num_layers=2,
    keep_layers=(1,),
    output_size=64,
    sweep_sizes=(64, 128),
    untiled_max=64,
    repeats=2,
    warmup=1,
    sweep_repeats=1,
    text_tokens=5,
    tile_size=8,
    tile_overlap=2,
)


# The tiny scale by hand: SD3-medium's widths divided by 24 (one attention head of 64), 64-px output.
WIDTH, LATENT_CHANNELS, PATCH = 64, 16, 2
IMAGE_TOKENS = (TINY.output_size // 8 // PATCH) ** 2  # 8x8 latents in 2x2 patches


def _linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def _fp32_rows(results) -> dict:
    return {(r["component"], r["model"]): r for r in results["comparison"] if r["dtype"] == "fp32"}


def _attention_flops(layers: int, tokens: int) -> int:
    """QK^T and AV of every layer: 2 matmuls of tokens x tokens x width, 2 FLOPs per multiply-add."""
    return layers * 2 * 2 * tokens**2 * WIDTH


@pytest.fixture(scope="module")
def results():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions on a shared 2-core machine are ~30x slower with 2 threads
    try:
        return efficiency.run(TINY, "cpu", ["fp32", "bf16"], [], command="python -m benchmarks.efficiency (test)",
                              progress=lambda message: None)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def test_comparison_has_every_case_with_counts_and_measurements(results):
    rows = results["comparison"]
    cases = {(r["component"], r["model"], r["dtype"]) for r in rows}
    for dtype in ("fp32", "bf16"):
        for model in (TEACHER, STUDENT, STUDENT_FOLDED):
            assert ("pipeline", model, dtype) in cases
            assert ("transformer", model, dtype) in cases
        assert ("vae", TEACHER, dtype) in cases and ("vae", STUDENT, dtype) in cases
    assert len(rows) == 2 * 8
    for row in rows:
        assert row["params"] > 0 and row["module_macs"] > 0 and row["flops"] >= 2 * row["module_macs"]
        assert len(row["latency_ms_runs"]) == TINY.repeats and row["latency_ms"] > 0
        assert row["peak_extra_mib"] is not None and row["peak_extra_mib"] >= 0
        assert row["weights_mib"] > 0
    weights = {(r["component"], r["model"], r["dtype"]): r["weights_mib"] for r in rows}
    for component, model, dtype in weights:  # every parameter and buffer is cast: bfloat16 halves the weights
        assert weights[component, model, "bf16"] == pytest.approx(weights[component, model, "fp32"] / 2, abs=1e-3)


def _student_transformer_counts() -> dict:
    """The student is the kept blocks' image stream: patch embedding, q/k/v/out and the feed-forward per block, the
    output projection; its modulation is cached (buffers, no Linear). FLOPs: 2 per MAC, plus the attention."""
    kept = len(TINY.keep_layers)
    block = 4 * _linear(WIDTH, WIDTH) + _linear(WIDTH, 4 * WIDTH) + _linear(4 * WIDTH, WIDTH)
    patch_embed = LATENT_CHANNELS * PATCH * PATCH * WIDTH  # conv weights; also its MACs per token
    projection = WIDTH * PATCH * PATCH * LATENT_CHANNELS
    macs = IMAGE_TOKENS * (patch_embed + kept * (4 + 2 * 4) * WIDTH**2 + projection)
    return {
        "params": patch_embed + WIDTH + kept * block + projection + PATCH * PATCH * LATENT_CHANNELS,
        "module_macs": macs,
        "flops": 2 * macs + _attention_flops(kept, IMAGE_TOKENS),
    }


def _teacher_transformer() -> SD3Transformer2DModel:
    """Built here from the scale, not from the benchmark's config."""
    return SD3Transformer2DModel(
        sample_size=128, patch_size=PATCH, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=TINY.num_layers, num_attention_heads=1, attention_head_dim=WIDTH, pos_embed_max_size=192,
        joint_attention_dim=4096 // 24, caption_projection_dim=1536 // 24, pooled_projection_dim=2048 // 24,
    )  # fmt: skip


def test_student_transformer_counts_by_hand(results):
    rows = _fp32_rows(results)
    for model in (STUDENT, STUDENT_FOLDED):  # folding moves the modulation into the weights: the same counts
        row = rows[("transformer", model)]
        assert {key: row[key] for key in ("params", "module_macs", "flops")} == _student_transformer_counts(), model


def test_teacher_and_vae_counts_against_torch(results):
    """Parameters of models built here from the scale (not from the benchmark's configs); module MACs as torch's own
    FLOP counter sees them (its mm/addmm/convolution FLOPs / 2; attention runs as bmm under the math kernel)."""
    rows = _fp32_rows(results)
    sd3_vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
        block_out_channels=(128 // 24, 256 // 24, 512 // 24, 512 // 24), norm_num_groups=1,
        latent_channels=LATENT_CHANNELS, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    tiny_vae = TinySRAutoencoder(encoder_block_out_channels=(64 // 24,) * 4, decoder_block_out_channels=(64 // 24,) * 4)
    expected = {("transformer", TEACHER): _teacher_transformer(), ("vae", TEACHER): sd3_vae, ("vae", STUDENT): tiny_vae}
    for key, model in expected.items():
        assert rows[key]["params"] == sum(p.numel() for p in model.parameters()), key
    for model in (TEACHER, STUDENT):
        whole, parts = rows[("pipeline", model)], [rows[("transformer", model)], rows[("vae", model)]]
        assert whole["params"] == sum(part["params"] for part in parts)

    # Text tokens join the image tokens in every teacher layer's attention.
    teacher_row = rows[("transformer", TEACHER)]
    tokens = IMAGE_TOKENS + TINY.text_tokens
    assert teacher_row["flops"] == 2 * teacher_row["module_macs"] + _attention_flops(TINY.num_layers, tokens)

    pipelines = efficiency.build_pipelines(TINY)
    for case in efficiency.cases(pipelines, TINY.output_size, torch.device("cpu"), torch.float32):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            case.fn()
        flops = {str(op): value for op, value in counter.get_flop_counts()["Global"].items()}
        macs = (flops.get("aten.mm", 0) + flops.get("aten.addmm", 0) + flops.get("aten.convolution", 0)) // 2
        assert rows[(case.component, case.model)]["module_macs"] == macs, (case.component, case.model)


def test_ratios_are_teacher_over_student(results):
    """The transformer's count ratios against the counts by hand and by torch; every ratio against the counts checked
    above and the medians of the timed runs."""
    rows = {(r["component"], r["model"], r["dtype"]): r for r in results["comparison"]}
    fp32 = _fp32_rows(results)
    teacher_params = sum(p.numel() for p in _teacher_transformer().parameters())
    for ratio in results["ratios"]:
        component, student, dtype = ratio["component"], ratio["student"], ratio["dtype"]
        for key, name in (("params", "params_ratio"), ("module_macs", "macs_ratio"), ("flops", "flops_ratio")):
            expected = fp32[(component, TEACHER)][key] / fp32[(component, student)][key]
            assert ratio[name] == round(expected, 2), (name, component, student, dtype)
        if component == "transformer":
            assert ratio["params_ratio"] == round(teacher_params / _student_transformer_counts()["params"], 2)
        latency = {
            model: statistics.median(rows[(component, model, dtype)]["latency_ms_runs"]) for model in (TEACHER, student)
        }
        assert ratio["speedup"] == pytest.approx(latency[TEACHER] / latency[student], abs=0.01)
    assert len(results["ratios"]) == 2 * 5


def test_sweep_covers_sizes_and_tiling(results):
    sweep = {(r["output_size"], r["tiled"]) for r in results["sweep"]}
    assert sweep == {(64, True), (64, False), (128, True)}
    for row in results["sweep"]:
        assert row["model"] == STUDENT and row["latency_ms"] > 0 and row["peak_extra_mib"] is not None


def test_writes_markdown_json_and_plots(results, tmp_path):
    paths = efficiency.write_results(results, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["comparison.png", "efficiency.json", "efficiency.md", "sweep.png"]
    for path in paths:
        assert os.path.getsize(path) > 0
    for name in ("comparison.png", "sweep.png"):
        with open(tmp_path / name, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "efficiency.json").read_text())
    assert saved["environment"]["device_name"] and saved["environment"]["versions"]["torch"]
    assert saved["command"].startswith("python -m benchmarks.efficiency")
    assert saved["transformer_config"]["num_attention_heads"] == 1
    markdown = (tmp_path / "efficiency.md").read_text()
    assert "Teacher / student" in markdown and "Size sweep" in markdown and saved["command"] in markdown


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="unknown"):
        efficiency.main(["--dtypes", "fp8"])
    with pytest.raises(SystemExit, match="multiples of 32"):
        efficiency.main(["--sweep-sizes", "100"])
