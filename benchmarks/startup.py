"""Start-up time of the commands and of `import tinysr_diffusers`, each in fresh interpreters.

    python -m benchmarks.startup [--runs 5] [--output-dir benchmarks/results]

Each command runs `--runs` times in a new Python process (as its console script does) from the repository root; the
median wall time is reported with the range, and whatever the command wrote on stderr (a plain command writes
nothing). `python -c pass` is the interpreter's own start-up; "first use of TinySRPipeline" is where the torch and
diffusers imports went. The load average is recorded beside the figures: other work on the machine slows them.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from tinysr_diffusers.evaluation.profiling import cpu_model
from tinysr_diffusers.utils import atomic_write_text

from .reporting import command_line, markdown_table


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entry_point(module: str) -> list[str]:
    """The interpreter arguments that run `module.main` as its console script does (arguments follow)."""
    return ["-c", f"import sys; from {module} import main; sys.exit(main())"]


COMMANDS = {  # label: interpreter arguments
    "python -c pass": ["-c", "pass"],
    "import tinysr_diffusers": ["-c", "import tinysr_diffusers"],
    "import pruning": ["-c", "import pruning"],
    "tinysr --help": [*_entry_point("tinysr_diffusers.cli"), "--help"],
    "tinysr upscale --help": [*_entry_point("tinysr_diffusers.cli"), "upscale", "--help"],
    "tinysr-prune space --layers 24 --keep 12 --block-size 4": [
        *_entry_point("pruning.cli"), "space", "--layers", "24", "--keep", "12", "--block-size", "4",
    ],  # fmt: skip
    "first use of TinySRPipeline (torch, diffusers)": [
        "-c", "import tinysr_diffusers; tinysr_diffusers.TinySRPipeline",
    ],  # fmt: skip
}


@dataclass
class Startup:
    """Wall times of one command's runs and what it wrote on stderr (last run)."""

    command: str
    seconds: list[float]
    returncode: int
    stderr: str

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def measure(command: str, arguments: Sequence[str], runs: int) -> Startup:
    seconds, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run([sys.executable, *arguments], cwd=REPOSITORY, capture_output=True, text=True)
        seconds.append(time.perf_counter() - start)
    return Startup(command, seconds, result.returncode, result.stderr)


def to_markdown(results: Sequence[Startup], runs: int, load: tuple[float, float, float], command: str) -> str:
    rows = [
        (
            f"`{result.command}`",
            f"{result.median:.2f}",
            f"{min(result.seconds):.2f}-{max(result.seconds):.2f}",
            "none" if not result.stderr.strip() else f"{len(result.stderr.strip().splitlines())} line(s)",
            result.returncode,
        )
        for result in results
    ]
    lines = [
        f"Start-up in fresh processes, median of {runs} runs, by `{command}`"
        f" on {cpu_model()} ({os.cpu_count()} cores), Python {sys.version.split()[0]}; load average "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min) when it started.",
        "",
        markdown_table(["command", "median (s)", "range (s)", "stderr", "exit code"], rows).rstrip("\n"),
    ]
    noisy = [result for result in results if result.stderr.strip()]
    if noisy:
        lines.append("")
        lines += [f"- `{result.command}` wrote: {result.stderr.strip().splitlines()[0]}" for result in noisy]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="Fresh processes per command (the median is reported).")
    parser.add_argument(
        "--output-dir",
        default=os.path.join(REPOSITORY, "benchmarks", "results"),
        help="Folder for startup.md (default: benchmarks/results).",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    load = os.getloadavg()
    results = [measure(command, arguments, args.runs) for command, arguments in COMMANDS.items()]
    markdown = to_markdown(results, args.runs, load, command_line("benchmarks.startup", argv))
    sys.stdout.write(markdown)
    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write_text(os.path.join(args.output_dir, "startup.md"), markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
