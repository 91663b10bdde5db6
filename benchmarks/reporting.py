"""What every benchmark run records beside its numbers: the command, the machine and the package versions."""

import csv
import datetime
import importlib.metadata
import io
import os
import platform
import shlex
import subprocess
from typing import Iterable, Optional, Sequence

import torch

from tinysr_diffusers.evaluation.profiling import cpu_model
from tinysr_diffusers.utils import atomic_write_text


PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "accelerate", "peft", "pyiqa", "numpy", "pillow")


def command_line(module: str, argv: Sequence[str]) -> str:
    """The shell command that reproduces this run."""
    return shlex.join(["python", "-m", module, *argv])


def _git_commit() -> Optional[str]:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def environment(device: "str | torch.device") -> dict:
    """Machine, device and versions of the packages that shape the results."""
    import tinysr_diffusers

    device = torch.device(device)
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    versions["tinysr_diffusers"] = tinysr_diffusers.__version__
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "git_commit": _git_commit(),
        "versions": versions,
    }


def environment_markdown(env: dict) -> str:
    """One line naming the machine and the main versions."""
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items() if version)
    return f"{env['device_name']} ({env['device']}), {env['date']}, commit {env['git_commit'] or 'unknown'}; {versions}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: Optional[str] = None) -> str:
    """A GitHub markdown table; `align` has one of "l", "r", "c" per column (default: first left, others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a CSV file atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def default_run_name() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")

