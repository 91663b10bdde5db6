"""Small shared helpers."""

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes without error.

    Readers never see a half-written file, and an interrupted write leaves any previous file intact.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]  # keep the extension: writers such as PIL pick the format from it
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary folder beside `path`; it becomes `path` only if the block finishes without error.

    An existing `path` is refused unless `overwrite`, and is then replaced only after the new folder is complete.
    """
    path = os.path.abspath(path)
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another output or allow overwriting it.")
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield temporary
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
