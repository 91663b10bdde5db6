"""benchmarks/device_check.py, the one call of a GPU session: its orchestration with stand-in steps (a result, a
crash, a time box, the budget), its usage errors, and (slow) the whole `--smoke` run on the CPU, so that the GPU
call cannot fail on a mistake that a CPU shows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import device_check
from benchmarks.device_check import STEPS, TRAIN_STAGES, Report, Step, run_check
from benchmarks.reporting import environment


ROOT = Path(__file__).resolve().parents[1]

# Stand-in steps: python programs given the step's record (argv[1]) and the report so far (argv[2]).
STAND_INS = {
    "fine": "import json, sys\njson.dump({'status': 'ok', 'summary': 'fine', 'value': 1}, open(sys.argv[1], 'w'))",
    "crash": "print('boom: the step fell over')\nraise SystemExit(3)",
    "hang": (
        "import json, os, sys, time\n"
        "seen = [step['status'] for step in json.load(open(sys.argv[2]))['steps']]\n"
        "with open(sys.argv[1], 'w') as record:\n"
        "    json.dump({'progress': 'sleeping', 'seen': seen, 'pid': os.getpid()}, record)\n"
        "time.sleep(60)"
    ),
    "late": "raise SystemExit('the budget is spent: this must not run')",
    "unselected": "raise SystemExit('not selected: this must not run')",
}


def test_steps_run_in_order_and_a_failure_keeps_what_came_before(tmp_path, monkeypatch):
    monkeypatch.setattr(device_check, "MIN_STEP_S", 3.0)
    steps = [Step(name, f"the {name} step", 10.0) for name in STAND_INS]
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "steps").mkdir(parents=True)
    header = {"command": "stand-ins", "smoke": True, "device": "cpu", "budget_s": 6.0,
              "environment": environment("cpu")}
    report = Report(str(out), header, steps)

    def command(step: Step, deadline: float) -> list[str]:
        record = work / "steps" / f"{step.name}.json"
        return [sys.executable, "-c", STAND_INS[step.name], str(record), str(out / device_check.JSON_NAME)]

    time_boxes = {name: 4.0 if name == "hang" else 10.0 for name in STAND_INS}
    run_check(steps, ["fine", "crash", "hang", "late"], report, str(work), 6.0, time_boxes, command)

    data = json.loads((out / device_check.JSON_NAME).read_text())
    entries = {entry["name"]: entry for entry in data["steps"]}
    assert list(entries) == list(STAND_INS)
    assert {name: entry["status"] for name, entry in entries.items()} == {
        "fine": "ok", "crash": "failed", "hang": "failed", "late": "skipped", "unselected": "skipped"}
    assert entries["fine"]["results"] == {"value": 1} and entries["fine"]["summary"] == "fine"
    assert entries["crash"]["error"] == "exited with 3 and no result: boom: the step fell over"
    hang = entries["hang"]
    assert hang["error"] == "its time box of 4 s ran out during: sleeping"
    assert 4 <= hang["seconds"] < 10
    # The report was rewritten after every step: the hanging step saw the ones before it finished.
    assert hang["results"]["seen"] == ["ok", "failed", "running", "pending", "pending"]
    with pytest.raises(ProcessLookupError):  # ended with its time box
        os.kill(hang["results"]["pid"], 0)
    assert entries["late"]["error"].startswith("the global budget of 6 s is spent")
    assert entries["unselected"]["error"] == "not in --steps"
    markdown = (out / device_check.MARKDOWN_NAME).read_text()
    assert "| fine | ok |" in markdown and "| hang | failed |" in markdown and "| late | skipped |" in markdown
    assert "boom: the step fell over" in (out / device_check.LOG_NAME).read_text()


def test_usage_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        device_check.main(["--smoke"])
    assert exit_info.value.code == 2 and "--out DIR is required where $OUT is not set" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        device_check.main(["--out", str(tmp_path), "--steps", "paper,bogus"])
    assert exit_info.value.code == 2 and "--steps: unknown ['bogus']" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_smoke_check_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "benchmarks.device_check", "--smoke", "--out", str(out), "--work-dir",
               str(tmp_path / "work")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500, check=False,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

    data = json.loads((out / device_check.JSON_NAME).read_text())
    assert data["smoke"] and data["device"] == "cpu"
    assert [entry["name"] for entry in data["steps"]] == [step.name for step in STEPS]
    assert {entry["name"]: entry["error"] for entry in data["steps"] if entry["status"] != "ok"} == {}
    steps = {entry["name"]: entry for entry in data["steps"]}
    results = {name: entry["results"] for name, entry in steps.items()}

    paper = results["paper"]
    assert {row["group"] for row in paper["rows"]} == {"fp16", "bf16", "bf16 + compile"}
    parts = {(row["group"], row["part"], row["model"]) for row in paper["rows"]}
    for group in ("fp16", "bf16", "bf16 + compile"):
        assert {(group, part, "TSD-SR (teacher)") for part in ("pipeline", "transformer", "vae")} <= parts
        assert {(group, part, "TinySR") for part in ("pipeline", "transformer", "vae", "vae encode", "vae decode",
                                                     "pipeline, batch 2")} <= parts
    assert all(row["latency_ms"] > 0 and len(row["runs_ms"]) == 2 for row in paper["rows"])
    assert set(paper["compile_s"]) == {"TinySR", "TSD-SR (teacher)"} and paper["compile"]["force_eager"]
    assert [aim["value"] is not None for aim in steps["paper"]["aims"]] == [True] * 3

    default_model = results["default_model"]
    cases = {(row["output_px"], row["tile_size"]) for row in default_model["rows"] if row["latency_ms"] > 0}
    assert cases == {(64, "auto"), (64, 8), (128, "auto"), (128, 8)}
    assert all(entry["psnr_db"] > 40 for entry in default_model["psnr"])  # bf16 against float32

    assert results["cli_demo"]["upscale"]["returncode"] == 0 and results["cli_demo"]["upscale"]["photos"] == 5
    assert len(results["cli_demo"]["demo"]["request_s"]) == 2

    oom = results["oom"]
    assert len(oom["warnings"]) == 3 and oom["settled_on"]["tile_size"] == 16 < oom["latent_side"] == 32
    assert oom["max_abs_diff"] <= 1e-2

    launches = results["training"]["launches"]
    assert [entry["stage"] for entry in launches["bf16"]["stages"]] == list(TRAIN_STAGES)
    assert [entry["stage"] for entry in launches["fsdp"]["stages"]] == ["latent"]
    for entry in launches["bf16"]["stages"] + launches["fsdp"]["stages"]:
        assert (entry["steps"], entry["resumed_to"], entry["mixed_precision"]) == (1, 2, "bf16"), entry

    counts = results["pytest"]["pytest"]
    assert counts["tests"] == counts["skipped"] >= 5  # tests/test_cuda.py, collected and skipped without CUDA

    markdown = (out / device_check.MARKDOWN_NAME).read_text()
    assert all(f"| {step.name} | ok |" in markdown for step in STEPS) and "## Aims (issue 26)" in markdown
    assert "accelerate.commands.launch" in (out / device_check.LOG_NAME).read_text()
