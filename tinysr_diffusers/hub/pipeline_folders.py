"""Pipeline folders that diffusers loads with the installed `tinysr_diffusers` classes, locally and from the Hub.

diffusers only looks up `model_index.json` class names inside its own libraries. A folder saved by TinySR therefore
carries one-line *shim* files that import the installed package and nothing else: `pipeline_tinysr_diffusers.py` at
the root and `tinysr_diffusers.py` in each component folder whose class is ours, with `_class_name` set to
`["pipeline_tinysr_diffusers", "<Pipeline>"]` and those components to `["tinysr_diffusers", "<Class>"]`. Then

- `DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)` runs the shims (which import the
  installed package) and returns the real classes;
- our pipelines' own `from_pretrained` needs no flag: it trusts a folder only if every `.py` file in it is one of
  these shims, byte for byte, at its expected place, and refuses anything else. The check reads every file where
  diffusers will import it from: through symlinked files and into symlinked folders, wherever they point;
- `AutoModel.from_pretrained(folder, subfolder=...)` resolves the class from the imported package.

The shim text never changes between versions (it star-imports the package), so folders stay trusted across upgrades.
"""

import json
import os
from pathlib import Path
from typing import Iterator, Optional

from huggingface_hub import snapshot_download

from ..utils import atomic_path, read_json_object


PACKAGE = "tinysr_diffusers"
PIPELINE_MODULE = f"pipeline_{PACKAGE}"
PIPELINE_SHIM = f"{PIPELINE_MODULE}.py"
COMPONENT_SHIM = f"{PACKAGE}.py"
SHIM_SOURCE = (
    "# Written by tinysr_diffusers: it only imports the installed package (pip install tinysr-diffusers).\n"
    f"from {PACKAGE} import *  # noqa: F401,F403\n"
)
MODEL_INDEX = "model_index.json"
# The libraries a trusted folder's components may name: diffusers imports each by name, and looks a name that is none
# of its own up as a file `<component>/<library>.py` (so `../../evil` would run `<folder>/../evil.py`). Only installed
# packages that hold the classes a TinySR or TSD-SR folder uses are plain enough to import without trust.
TRUSTED_LIBRARIES = (PACKAGE, "diffusers", "transformers")


class UntrustedFolderError(ValueError):
    """A pipeline folder holds code other than TinySR's own shims."""


def _is_ours(library: Optional[str]) -> bool:
    return isinstance(library, str) and (library == PACKAGE or library.startswith(PACKAGE + "."))


def write_shims(save_directory: str | os.PathLike, pipeline_class_name: str) -> list[str]:
    """Point `model_index.json` at the shims and write them; returns the shim paths relative to the folder."""
    folder = Path(save_directory)
    index = read_model_index(folder)
    index["_class_name"] = [PIPELINE_MODULE, pipeline_class_name]
    index.pop("_name_or_path", None)  # a local path of the machine that saved it: not part of the layout
    shims = [PIPELINE_SHIM]
    for name, value in index.items():
        if isinstance(value, list) and len(value) == 2 and _is_ours(value[0]):
            index[name] = [PACKAGE, value[1]]
            shims.append(f"{name}/{COMPONENT_SHIM}")
    files = {shim: SHIM_SOURCE for shim in shims}
    files[MODEL_INDEX] = json.dumps(index, indent=2, sort_keys=True) + "\n"
    for name, text in files.items():  # bytes, not text mode: the shims are compared byte for byte on loading
        with atomic_path(folder / name) as temporary, open(temporary, "wb") as handle:
            handle.write(text.encode("utf-8"))
    return shims


def expected_shims(model_index: dict) -> set[str]:
    """The shim paths a folder with this `model_index.json` may hold."""
    components = {
        name
        for name, value in model_index.items()
        if isinstance(value, list) and len(value) == 2 and value[0] == PACKAGE
    }
    return {PIPELINE_SHIM} | {f"{name}/{COMPONENT_SHIM}" for name in components}


def read_model_index(folder: str | os.PathLike) -> dict:
    """The `model_index.json` of a pipeline folder; one clear error naming the file if it is missing or malformed."""
    path = Path(folder) / MODEL_INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {MODEL_INDEX}: not a diffusers pipeline folder.")
    try:
        return read_json_object(path)
    except ValueError as error:
        raise ValueError(f"{error} Re-save the pipeline with `save_pretrained`.") from None


def _python_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """(path relative to `folder`, path) of every `.py` file, going into symlinked folders as diffusers does.

    `Path.rglob` does not enter a symlinked folder, but imports from it work; so every folder is listed here, links
    included, wherever they point. A link to a folder that holds one above it would never end, and is refused.
    Files come as they are found, so a check can stop at the first foreign one.
    """
    pending = [(Path(), (folder.resolve(),))]
    while pending:
        relative, ancestors = pending.pop()
        with os.scandir(folder / relative) as entries:
            for entry in entries:
                path = relative / entry.name
                if entry.is_dir():  # follows links
                    real = Path(entry.path).resolve()
                    if any(real == above or real in above.parents for above in ancestors):
                        raise UntrustedFolderError(
                            f"{folder}/{path.as_posix()} is a symlink to a folder above it; refusing a folder with "
                            "a symlink loop."
                        )
                    pending.append((path, (*ancestors, real)))
                elif entry.name.lower().endswith(".py"):  # case-insensitive file systems import `X.PY` as `X.py`
                    yield path.as_posix(), folder / path


def check_libraries(index: dict, folder: str | os.PathLike) -> None:
    """Raise `UntrustedFolderError` unless the pipeline and every component of `model_index.json` name one of our
    own modules: the pipeline `pipeline_tinysr_diffusers` (or a diffusers class name), each component a library of
    `TRUSTED_LIBRARIES`. Anything else (a path, a dotted or another package's name) would make diffusers import code
    from outside the checked files."""
    pipeline = index.get("_class_name")
    if isinstance(pipeline, list) and (len(pipeline) != 2 or pipeline[0] != PIPELINE_MODULE):
        raise UntrustedFolderError(
            f"{folder}/{MODEL_INDEX} names the pipeline module {pipeline[0]!r}, not {PIPELINE_MODULE!r}; refusing to "
            "import it (load with `trust_remote_code=True` only if you trust that code)."
        )
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):
            continue
        library = value[0] if len(value) == 2 else value
        if library is not None and library not in TRUSTED_LIBRARIES:
            raise UntrustedFolderError(
                f"{folder}/{MODEL_INDEX}: component {name!r} names the library {library!r}, not one of "
                f"{list(TRUSTED_LIBRARIES)}; refusing to import it (load with `trust_remote_code=True` only if you "
                "trust that code)."
            )


def verify_shims(folder: str | os.PathLike) -> dict:
    """Raise `UntrustedFolderError` unless every `.py` file under `folder` is one of our shims and every library that
    `model_index.json` names is one of ours (`check_libraries`); return the index.

    Each file is read where diffusers imports it from (symlinks followed), so a link cannot bring in other code.
    """
    folder = Path(folder)
    index = read_model_index(folder)
    check_libraries(index, folder)
    allowed = expected_shims(index)
    shim = SHIM_SOURCE.encode("utf-8")
    for relative, path in _python_files(folder):
        if relative not in allowed:
            raise UntrustedFolderError(
                f"{folder} contains code that is not a tinysr_diffusers shim: {relative}. Refusing to run it; load "
                "with `trust_remote_code=True` only if you have read it and trust it."
            )
        if not path.is_file() or path.read_bytes() != shim:
            raise UntrustedFolderError(
                f"{folder}/{relative} differs from the shim tinysr_diffusers writes; refusing to run it. Re-save the "
                "pipeline with `save_pretrained`, or load with `trust_remote_code=True` only if you trust that code."
            )
    return index


def looks_like_a_path(name: str) -> bool:
    """Whether `name`, which is not an existing folder, was meant as a local path rather than a Hub repo id.

    A repo id is `org/name` (or a bare legacy `name`); a path is absolute, starts with `.` or `~`, has a backslash or
    more than one `/`, or starts with a folder that exists here (`runs/final` where `runs/` exists).
    """
    parts = name.split("/")
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or len(parts) > 2
        or (len(parts) == 2 and os.path.isdir(parts[0]))
    )


def fetch_code_files(repo_id: str, revision: Optional[str] = None, **hub_kwargs) -> tuple[str, str]:
    """Download only the `.py` files and `model_index.json` of a Hub repo; return (snapshot folder, commit hash).

    Loading then pins the commit, so the code that was checked is the code that runs.
    """
    folder = snapshot_download(repo_id, revision=revision, allow_patterns=["*.py", MODEL_INDEX], **hub_kwargs)
    return folder, Path(folder).name
