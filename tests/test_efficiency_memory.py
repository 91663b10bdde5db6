"""The efficiency benchmark's one-at-a-time schedule on tiny models: the counts of building everything at once, the
same weights, the benchmark's own peak memory, and every model freed once it is measured."""

import statistics
import weakref
from dataclasses import replace

import pytest
import torch

from benchmarks import efficiency, memory
from benchmarks.efficiency import STUDENT, STUDENT_FOLDED, TEACHER
from tests.test_efficiency import TINY
from tinysr_diffusers.evaluation.profiling import count_parameters, module_macs, total_flops


ONE_AT_A_TIME = replace(  # test_efficiency's tiny scale, tiled only, in the full mode's schedule
    TINY,
    sweep_sizes=(64,),
    untiled_max=0,
    repeats=3,  # the students: 2 runs before the teacher, 1 after
    schedule="one-at-a-time",
)
STUDENTS = [STUDENT, STUDENT_FOLDED]


class Spy:
    """Wraps `time_interleaved` and `build_teacher`: which models each measurement gets, the modules still alive from
    builds and measurements before it (leaks), and the resident memory while models are held."""

    def __init__(self, time_interleaved, build_teacher):
        self.time_interleaved, self.build_teacher = time_interleaved, build_teacher
        self.calls: list[list[str]] = []
        self.refs: list[weakref.ref] = []
        self.leaks: list[str] = []
        self.max_rss_mib = 0.0

    def teacher(self, *args, **kwargs):
        teacher = self.build_teacher(*args, **kwargs)
        self.refs += [weakref.ref(teacher.transformer), weakref.ref(teacher.vae)]
        return teacher

    def measure(self, group, device, warmup, repeats):
        held = {id(module) for case in group for module in case.modules}
        alive = [module for module in (ref() for ref in self.refs) if module is not None]
        self.leaks += [type(module).__name__ for module in alive if id(module) not in held]
        del alive
        self.refs += [weakref.ref(module) for case in group for module in case.modules]
        self.calls.append(sorted({case.model for case in group}))
        self.max_rss_mib = max(self.max_rss_mib, memory.status_mib("VmRSS"))
        return self.time_interleaved(group, device, warmup, repeats)


def _run(scale, dtypes, models=tuple(efficiency.MODELS.values())):
    spy = Spy(efficiency.time_interleaved, efficiency.build_teacher)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions on a shared 2-core machine are ~30x slower with 2 threads
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(efficiency, "time_interleaved", spy.measure)
            patch.setattr(efficiency, "build_teacher", spy.teacher)
            results = efficiency.run(scale, "cpu", dtypes, [], command="python -m benchmarks.efficiency (test)",
                                     progress=lambda message: None, models=models)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return results, spy


@pytest.fixture(scope="module")
def measured():
    return _run(ONE_AT_A_TIME, ["fp32", "bf16"])


def test_counts_equal_building_everything(measured):
    """Counted on the meta device in the run; here on real weights, every model built at once, through the calls
    that are timed (the whole pipeline call, not the recipe the run counts)."""
    results, _ = measured
    pipelines = efficiency.build_pipelines(ONE_AT_A_TIME)
    expected = {}
    for case in efficiency.cases(pipelines, ONE_AT_A_TIME.output_size, torch.device("cpu"), torch.float32):
        expected[(case.component, case.model)] = {
            "params": count_parameters(case.modules),
            "module_macs": module_macs(case.fn, torch.nn.ModuleList(case.modules)),
            "flops": total_flops(case.fn),
        }
    rows = results["comparison"]
    assert len(rows) == 2 * len(expected) == 2 * 8
    for row in rows:
        counts = {key: row[key] for key in ("params", "module_macs", "flops")}
        assert counts == expected[(row["component"], row["model"])], (row["component"], row["model"], row["dtype"])


def test_rebuilt_teacher_and_copied_students_have_the_same_weights():
    together = efficiency.build_pipelines(ONE_AT_A_TIME)
    source = efficiency.ModelSource(ONE_AT_A_TIME, list(efficiency.MODELS.values()))
    apart = {**source.build([TEACHER]), **source.build(STUDENTS)}
    assert list(apart) == list(together)
    for model, pipe in together.items():
        for component in ("transformer", "vae"):
            expected = getattr(pipe, component).state_dict()
            got = getattr(apart[model], component).state_dict()
            assert expected.keys() == got.keys(), (model, component)
            for name, tensor in expected.items():
                assert torch.equal(got[name], tensor), (model, component, name)


def test_students_run_before_and_after_the_teacher(measured):
    results, spy = measured
    assert spy.calls == [STUDENTS, [TEACHER], STUDENTS] * 2 + [[STUDENT]]  # fp32, bf16, then the sweep
    for row in results["comparison"]:
        runs = row["latency_ms_runs"]
        assert len(runs) == ONE_AT_A_TIME.repeats
        assert row["latency_ms"] == pytest.approx(statistics.median(runs), abs=1e-3)
        if row["model"] == TEACHER:
            assert row["latency_ms_rounds"] == [row["latency_ms"]]
        else:
            expected = [statistics.median(runs[:2]), statistics.median(runs[2:])]
            assert row["latency_ms_rounds"] == pytest.approx(expected, abs=1e-3)
    markdown = efficiency.to_markdown(results)
    assert "before / after teacher (ms)" in markdown and "Largest gap between a student's medians" in markdown


def test_models_are_freed_after_their_measurement(measured):
    """No module from an earlier build or measurement (the teacher cut for the students, the teacher counted on the
    meta device, the previous round's models) is alive while the next one is measured, nor after the run."""
    _, spy = measured
    assert spy.leaks == []
    assert len(spy.refs) > 0 and all(ref() is None for ref in spy.refs)


def test_records_the_benchmarks_own_peak(measured):
    results, spy = measured
    peak = results["memory"]["process_peak_mib"]
    stages = results["memory"]["stages"]
    slack = 1.0  # the kernel's RSS counters are per-CPU, read approximately (and the results rounded)
    assert peak + slack >= spy.max_rss_mib > 0
    assert peak + slack >= max(stage["peak_mib"] for stage in stages)  # a running maximum
    assert all(stage["peak_mib"] + slack >= stage["rss_mib"] for stage in stages)
    assert results["memory"]["machine_mib"] > peak
    assert [stage["stage"] for stage in stages][:3] == [
        "start", "counted on the meta device", "fp32: TinySR + TinySR, folded modulation built"
    ]  # fmt: skip
    assert f"**{peak:,.0f} MiB**" in efficiency.to_markdown(results)


def test_process_peak_survives_the_per_call_resets():
    """`PeakMemory` resets the kernel's `VmHWM` before every call; the process's peak keeps what it forgot."""
    memory.release_free_memory()
    memory.reset_rss_peak()
    resident = memory.status_mib("VmRSS")
    block = torch.ones(64 * 2**20)  # 256 MiB, written
    del block
    memory.release_free_memory()
    memory.reset_rss_peak()
    assert memory.status_mib("VmHWM") < resident + 128
    assert memory.process_peak_mib() >= resident + 250


def test_models_option_measures_only_those():
    results, spy = _run(replace(ONE_AT_A_TIME, sweep_sizes=()), ["fp32"], models=[STUDENT])
    assert spy.calls == [[STUDENT]]  # no teacher to run around: one round
    assert {row["model"] for row in results["comparison"]} == {STUDENT}
    assert results["models"] == [STUDENT] and results["ratios"] == [] and results["best_ratios"] == []
    assert spy.leaks == [] and all(ref() is None for ref in spy.refs)


def test_cli_models_and_schedule(capsys):
    with pytest.raises(SystemExit, match="unknown"):
        efficiency.main(["--models", "teacher,sd3"])
    with pytest.raises(SystemExit):
        efficiency.main(["--schedule", "sometimes"])
    with pytest.raises(SystemExit):
        efficiency.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "--models" in help_text and "teacher, tinysr, tinysr-folded" in help_text and "one-at-a-time" in help_text
