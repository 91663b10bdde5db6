"""Pipeline folders that diffusers loads with the installed `tinysr_diffusers` classes, locally and from the Hub.

diffusers only looks up `model_index.json` class names inside its own libraries. A folder saved by TinySR therefore
carries one-line *shim* files that import the installed package and nothing else: `pipeline_tinysr_diffusers.py` at
the root and `tinysr_diffusers.py` in each component folder whose class is ours, with `_class_name` set to
`["pipeline_tinysr_diffusers", "<Pipeline>"]` and those components to `["tinysr_diffusers", "<Class>"]`. Then

- `DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)` runs the shims (which import the
  installed package) and returns the real classes;
- our pipelines' own `from_pretrained` needs no flag: it trusts a folder only if every `.py` file in it is one of
  these shims, byte for byte, at its expected place, and refuses anything else;
- `AutoModel.from_pretrained(folder, subfolder=...)` resolves the class from the imported package.

The shim text never changes between versions (it star-imports the package), so folders stay trusted across upgrades.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

from huggingface_hub import snapshot_download


PACKAGE = "tinysr_diffusers"
PIPELINE_MODULE = f"pipeline_{PACKAGE}"
PIPELINE_SHIM = f"{PIPELINE_MODULE}.py"
COMPONENT_SHIM = f"{PACKAGE}.py"
SHIM_SOURCE = (
    "# Written by tinysr_diffusers: it only imports the installed package (pip install tinysr-diffusers).\n"
    f"from {PACKAGE} import *  # noqa: F401,F403\n"
)
MODEL_INDEX = "model_index.json"


class UntrustedFolderError(ValueError):
    """A pipeline folder holds code other than TinySR's own shims."""


def _atomic_write(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _is_ours(library: Optional[str]) -> bool:
    return isinstance(library, str) and (library == PACKAGE or library.startswith(PACKAGE + "."))


def write_shims(save_directory: str | os.PathLike, pipeline_class_name: str) -> list[str]:
    """Point `model_index.json` at the shims and write them; returns the shim paths relative to the folder."""
    folder = Path(save_directory)
    index = json.loads((folder / MODEL_INDEX).read_text(encoding="utf-8"))
    index["_class_name"] = [PIPELINE_MODULE, pipeline_class_name]
    index.pop("_name_or_path", None)  # a local path of the machine that saved it: not part of the layout
    shims = [PIPELINE_SHIM]
    for name, value in index.items():
        if isinstance(value, list) and len(value) == 2 and _is_ours(value[0]):
            index[name] = [PACKAGE, value[1]]
            shims.append(f"{name}/{COMPONENT_SHIM}")
    for shim in shims:
        (folder / shim).parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / shim, SHIM_SOURCE.encode("utf-8"))
    _atomic_write(folder / MODEL_INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return shims


def expected_shims(model_index: dict) -> set[str]:
    """The shim paths a folder with this `model_index.json` may hold."""
    components = {
        name
        for name, value in model_index.items()
        if isinstance(value, list) and len(value) == 2 and value[0] == PACKAGE
    }
    return {PIPELINE_SHIM} | {f"{name}/{COMPONENT_SHIM}" for name in components}


def verify_shims(folder: str | os.PathLike) -> dict:
    """Raise `UntrustedFolderError` unless every `.py` file under `folder` is one of our shims; return the index."""
    folder = Path(folder)
    index_path = folder / MODEL_INDEX
    if not index_path.is_file():
        raise FileNotFoundError(f"{folder} has no {MODEL_INDEX}: not a diffusers pipeline folder.")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    allowed = expected_shims(index)
    shim = SHIM_SOURCE.encode("utf-8")
    for path in sorted(folder.rglob("*.py")):
        relative = path.relative_to(folder).as_posix()
        if relative not in allowed:
            raise UntrustedFolderError(
                f"{folder} contains code that is not a tinysr_diffusers shim: {relative}. Refusing to run it; load "
                "with `trust_remote_code=True` only if you have read it and trust it."
            )
        if path.read_bytes() != shim:
            raise UntrustedFolderError(
                f"{folder}/{relative} differs from the shim tinysr_diffusers writes; refusing to run it. Re-save the "
                "pipeline with `save_pretrained`, or load with `trust_remote_code=True` only if you trust that code."
            )
    return index


def fetch_code_files(repo_id: str, revision: Optional[str] = None, **hub_kwargs) -> tuple[str, str]:
    """Download only the `.py` files and `model_index.json` of a Hub repo; return (snapshot folder, commit hash).

    Loading then pins the commit, so the code that was checked is the code that runs.
    """
    folder = snapshot_download(repo_id, revision=revision, allow_patterns=["*.py", MODEL_INDEX], **hub_kwargs)
    return folder, Path(folder).name
