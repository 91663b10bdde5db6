"""Small shared helpers: atomic outputs (a file or a folder appears complete under its final name, or not at all;
an interrupted write leaves any previous version intact), the accelerator of an `accelerate launch`, and the atomic
`checkpoint-<step>` folders of every training loop."""

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Iterator, Optional, Union


PathLike = Union[str, "os.PathLike[str]"]
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")

logger = logging.getLogger(__name__)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def read_json_object(path: PathLike, error: type[Exception] = ValueError) -> dict:
    """The JSON object in the file `path`: raises `error` with one line naming the file when it is not valid JSON
    or holds something else than an object (the callers say what is missing first, in their own words)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise error(f"{path} is not valid JSON ({problem}).") from None
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, not an object.")
    return data


@contextlib.contextmanager
def atomic_path(path: PathLike, *, replace: bool = True) -> Iterator[str]:
    """Yield a temporary path beside `path`; it becomes `path` only if the block finishes without error.

    With `replace=False` an existing `path` is never replaced, even one that another process writes meanwhile:
    `FileExistsError` is raised instead (the file is published with a hard link, which fails if the name exists).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]  # keep the extension: writers such as PIL pick the format from it
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(handle)
    os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give the file ordinary permissions
    try:
        yield temporary
        if replace:
            os.replace(temporary, path)
        else:
            _publish_new(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _publish_new(temporary: str, path: str) -> None:
    """Give the complete file `temporary` the name `path` unless that name exists (`FileExistsError`)."""
    try:
        os.link(temporary, path)  # atomic, and fails if `path` exists
    except FileExistsError:
        raise FileExistsError(f"{path} already exists") from None
    except OSError:  # a file system without hard links: reserve the name exclusively, then fill it
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        os.replace(temporary, path)


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
        _replace_directory(temporary, path)
    finally:
        if os.path.exists(temporary):
            shutil.rmtree(temporary)


def _replace_directory(source: str, path: str) -> None:
    """Rename the complete folder `source` to `path`; an existing `path` is moved aside first and deleted after."""
    if os.path.lexists(path):
        parent, name = os.path.split(path)
        retired = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        os.replace(path, os.path.join(retired, name))
        os.replace(source, path)
        shutil.rmtree(retired)
    else:
        os.replace(source, path)


def launched_accelerator(**kwargs):
    """An `accelerate.Accelerator` that forms one process group for every process the launch started.

    On a machine without CUDA, accelerate forms a gloo (MULTI_CPU) group only with `cpu=True`; otherwise each process
    would train alone and all would write the same checkpoints. Refuses a launch whose processes did not join up.
    """
    import torch
    from accelerate import Accelerator

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(cpu=world_size > 1 and not torch.cuda.is_available(), **kwargs)
    if accelerator.num_processes != world_size:
        raise RuntimeError(f"Launched {world_size} processes but accelerate formed a group of "
                           f"{accelerator.num_processes} ({accelerator.distributed_type.value}); check the launch.")
    return accelerator


# ------------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_step(path: PathLike) -> int:
    """The step of a `checkpoint-<step>` folder."""
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(os.fspath(path))))
    if match is None:
        raise ValueError(f"{os.fspath(path)!r} is not a checkpoint folder: expected a name checkpoint-<step>.")
    return int(match.group(1))


def list_checkpoints(folder: PathLike) -> list[str]:
    """The complete `checkpoint-<step>` folders in `folder`, oldest first (unfinished `.checkpoint-*.tmp` ignored)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    found = [os.path.join(folder, name) for name in os.listdir(folder) if CHECKPOINT_PATTERN.match(name)]
    return sorted((path for path in found if os.path.isdir(path)), key=checkpoint_step)


def resolve_checkpoint(folder: PathLike, resume_from: PathLike) -> Optional[str]:
    """`"latest"`: the newest complete checkpoint in `folder`, or None when there is none yet (a new run starts, as
    in diffusers' training scripts). Otherwise the given `checkpoint-<step>` folder, which must exist."""
    if os.fspath(resume_from) == "latest":
        found = list_checkpoints(folder)
        if not found:
            logger.info("No checkpoint in %s yet: starting a new run.", os.fspath(folder))
            return None
        return found[-1]
    path = os.fspath(resume_from)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Checkpoint folder {path!r} does not exist.")
    checkpoint_step(path)
    return path


def save_checkpoint(accelerator, folder: PathLike, step: int, total_limit: Optional[int] = None) -> str:
    """`accelerator.save_state` into `folder/checkpoint-<step>`, atomically.

    Every process writes into the hidden `.checkpoint-<step>.tmp`; the main process then renames it (an existing
    checkpoint of that step is replaced only once the new one is complete) and keeps the newest `total_limit`. A kill
    at any moment leaves every earlier complete checkpoint intact.
    """
    folder = os.fspath(folder)
    final = os.path.join(folder, f"checkpoint-{step}")
    temporary = os.path.join(folder, f".checkpoint-{step}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _replace_directory(temporary, final)
        if total_limit:
            for old in list_checkpoints(folder)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
