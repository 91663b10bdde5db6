"""`python -m benchmarks.tiling_memory` at smoke size: each measurement in its own process, a table, JSON and a plot."""

import json

import pytest


pytest.importorskip("matplotlib")  # the plot (pruning, training and metrics extras)


@pytest.mark.slow
def test_streamed_and_tiled_rows_and_the_growth_line(tmp_path):
    from benchmarks.tiling_memory import main

    main(["--sides", "256", "512", "--tiled-max", "256", "--vae", "narrow", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "tiling_memory.json").read_text())
    assert [(row["side"], row["streamed"]) for row in rows] == [(256, True), (256, False), (512, True)]
    assert all(row["vae"] == "narrow" and row["device"] == "cpu" and row["peak_extra_mib"] > 0 for row in rows)
    assert [row["output_mib"] for row in rows] == [0.2, 0.2, 0.8]  # 3 bytes per output pixel
    text = (tmp_path / "tiling_memory.md").read_text()
    assert text.count("| streamed |") == 2 and text.count("| tiled (before) |") == 1
    assert "Growth per added output pixel: streamed " in text and "--vae narrow" in text and "CPU: " in text
    assert (tmp_path / "tiling_memory.png").stat().st_size > 0
