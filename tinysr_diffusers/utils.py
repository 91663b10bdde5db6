"""Small shared helpers: atomic outputs (a file or a folder appears complete under its final name, or not at all;
an interrupted write leaves any previous version intact) and the accelerator of an `accelerate launch`."""

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Union

import torch


PathLike = Union[str, "os.PathLike[str]"]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes without error."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]  # keep the extension: writers such as PIL pick the format from it
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(handle)
    os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give the file ordinary permissions
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_json(path: PathLike, data: Any) -> None:
    """Write `data` as indented JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def atomic_directory(path: PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary folder beside `path`; it becomes `path` only if the block finishes without error.

    An existing `path` (other than an empty folder) is refused unless `overwrite`, and is then replaced only after the
    new folder is complete.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not overwrite and not (os.path.isdir(path) and not os.listdir(path)):
        raise FileExistsError(f"{path} already exists; choose another output or allow overwriting it.")
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield temporary
        os.chmod(temporary, 0o777 & ~_umask())  # mkdtemp creates 0700; give the folder ordinary permissions
        if os.path.lexists(path):
            retired = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.replace(path, os.path.join(retired, name))
            os.replace(temporary, path)
            shutil.rmtree(retired)
        else:
            os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            shutil.rmtree(temporary)


def launched_accelerator(**kwargs):
    """An `accelerate.Accelerator` that forms one process group for every process the launch started.

    On a machine without CUDA, accelerate forms a gloo (MULTI_CPU) group only with `cpu=True`; otherwise each process
    would train alone and all would write the same checkpoints. Refuses a launch whose processes did not join up.
    """
    from accelerate import Accelerator

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(cpu=world_size > 1 and not torch.cuda.is_available(), **kwargs)
    if accelerator.num_processes != world_size:
        raise RuntimeError(f"Launched {world_size} processes but accelerate formed a group of "
                           f"{accelerator.num_processes} ({accelerator.distributed_type.value}); check the launch.")
    return accelerator

