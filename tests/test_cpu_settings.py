"""`python -m benchmarks.cpu_settings` on a tiny pipeline: every runtime's row, its latency and its quality figure."""

import importlib.util
import json

import pytest


for module in ("onnx", "onnxscript", "onnxruntime"):  # the onnx extra, or the benchmark leaves the ONNX rows out
    pytest.importorskip(module)


@pytest.mark.slow
def test_every_setting_gets_a_row_with_its_quality(tmp_path):
    from benchmarks.cpu_settings import main
    from tests.tiny_pipelines import tiny_student

    tiny_student().save_pretrained(tmp_path / "model")
    output = tmp_path / "settings.md"
    main(["--model", str(tmp_path / "model"), "--repeats", "1", "--dtypes", "fp32", "--no-compile",
          "--output", str(output)])  # fmt: skip
    rows = json.loads(output.with_suffix(".json").read_text())["rows"]
    settings = [(row["runtime"], row["dtype"], row["channels_last_vae"]) for row in rows]
    expected = [("torch", "fp32", False), ("torch", "fp32", True), ("onnxruntime", "fp32", False)]
    expected += [("onnxruntime", "int8", False)]
    expected += [("openvino", "fp32", False)] if importlib.util.find_spec("openvino") else []
    assert settings == expected
    psnr = {setting: row["psnr_vs_fp32_db"] for setting, row in zip(settings, rows)}
    assert psnr[expected[0]] == float("inf")  # the reference against itself
    assert all(value > 60 for setting, value in psnr.items() if setting[1] == "fp32")  # float32 everywhere
    assert 20 < psnr[("onnxruntime", "int8", False)] < psnr[("onnxruntime", "fp32", False)]  # quantised: moved
    assert all(row["latency_s"] > 0 for row in rows)
    assert output.read_text().count("\n| ") == len(expected) + 1  # the header and a line per setting
