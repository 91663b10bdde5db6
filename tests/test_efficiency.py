"""The efficiency benchmark's code path on tiny models: files and fields, not timings."""

import json
import os
from dataclasses import replace

import pytest
import torch

from benchmarks import efficiency
from benchmarks.efficiency import QUICK, STUDENT, STUDENT_FOLDED, TEACHER


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


def test_counts_follow_the_architectures(results):
    rows = {(r["component"], r["model"]): r for r in results["comparison"] if r["dtype"] == "fp32"}
    teacher, student = rows[("transformer", TEACHER)], rows[("transformer", STUDENT)]
    assert teacher["params"] > student["params"] and teacher["module_macs"] > student["module_macs"]
    # folding moves the modulation into the weights: same parameters and MACs
    assert rows[("transformer", STUDENT_FOLDED)]["module_macs"] == student["module_macs"]
    whole = rows[("pipeline", STUDENT)]
    assert whole["module_macs"] == student["module_macs"] + rows[("vae", STUDENT)]["module_macs"]
    assert whole["params"] == student["params"] + rows[("vae", STUDENT)]["params"]


def test_ratios_are_teacher_over_student(results):
    rows = {(r["component"], r["model"], r["dtype"]): r for r in results["comparison"]}
    for ratio in results["ratios"]:
        teacher = rows[(ratio["component"], TEACHER, ratio["dtype"])]
        student = rows[(ratio["component"], ratio["student"], ratio["dtype"])]
        assert ratio["macs_ratio"] == pytest.approx(teacher["module_macs"] / student["module_macs"], abs=0.01)
        assert ratio["speedup"] == pytest.approx(teacher["latency_ms"] / student["latency_ms"], abs=0.01)
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
