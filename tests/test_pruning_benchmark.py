"""`python -m benchmarks.pruning_methods` on a miniature of its --small setup: the table and its record are written."""

import json
import re

import pytest

from benchmarks.pruning_methods import main


TINY = ["--small", "--teacher-steps", "2", "--search-steps", "2", "--recovery-steps", "1", "--train-crops", "16",
        "--eval-crops", "8", "--batch-size", "8", "--calibration-batches", "1", "--random-candidates", "2"]


def test_every_requested_method_gets_a_row(tmp_path):
    output = tmp_path / "methods.md"
    main([*TINY, "--methods", "shortgpt,tinysr", "--output", str(output)])
    text = output.read_text()
    assert re.search(r"Command: `(OMP_NUM_THREADS=\d+ )?python -m benchmarks\.pruning_methods --small", text)
    assert "the same 2 training batches of 8 for the learned methods but only the first 1 of them" in text
    record = json.loads(output.with_suffix(".json").read_text())
    assert [row["method"] for row in record["rows"]] == ["shortgpt", "tinysr"]
    for row in record["rows"]:
        assert len(row["keep_layers"]) == 8 and f"| {row['method']} | " in text
        assert row["after"]["distill_mse"] > 0 and "psnr_y" in row["after"]


def test_an_impossible_keep_count_stops_before_any_method_runs(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--keep 6: Keeping 6 of 16 layers is impossible with blocks of 4"):
        main([*TINY, "--keep", "6", "--output", str(tmp_path / "methods.md")])
    assert not (tmp_path / "methods.md").exists()
