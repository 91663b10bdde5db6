"""Saving and loading TinySR and TSD-SR pipelines: every diffusers entry point returns the installed classes, folders
with other code are refused, and `push_to_hub` uploads the same layout (hub client replaced by local fakes)."""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import EntryNotFoundError

import diffusers.utils.hub_utils
import tinysr_diffusers.hub.pipeline_folders
import tinysr_diffusers.hub.pipeline_hub
from diffusers import AutoModel, DiffusionPipeline, SD3Transformer2DModel
from tests.tiny_pipelines import photo, tiny_student, tiny_teacher
from tinysr_diffusers import (
    OneStepSRPipeline,
    PromptEmbeddings,
    TinySRAutoencoder,
    TinySRPipeline,
    TinySRTransformer2DModel,
    TSDSRPipeline,
)
from tinysr_diffusers.hub.pipeline_folders import SHIM_SOURCE, UntrustedFolderError


REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINES = {"student": (tiny_student, TinySRPipeline), "teacher": (tiny_teacher, TSDSRPipeline)}


def _files(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()
    }


def _images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    image = photo("astronaut", (20, 12))
    return pipe(image, output_type="np", generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(params=sorted(PIPELINES))
def saved(request, tmp_path):
    make, cls = PIPELINES[request.param]
    pipe = make()
    pipe.save_pretrained(tmp_path / "pipe")
    return SimpleNamespace(pipe=pipe, cls=cls, folder=tmp_path / "pipe", expected=_images(pipe))


def test_folder_layout(saved):
    files = _files(saved.folder)
    index = json.loads(files["model_index.json"])
    assert index["_class_name"] == ["pipeline_tinysr_diffusers", saved.cls.__name__]
    ours = sorted(name for name, value in index.items() if isinstance(value, list) and value[0] == "tinysr_diffusers")
    assert ours == (["transformer", "vae"] if saved.cls is TinySRPipeline else ["prompt_embeddings"])
    shims = sorted(name for name in files if name.endswith(".py"))
    assert shims == sorted(["pipeline_tinysr_diffusers.py"] + [f"{name}/tinysr_diffusers.py" for name in ours])
    assert all(files[name] == SHIM_SOURCE.encode() for name in shims)
    assert "_name_or_path" not in index


def test_every_entry_point_returns_the_installed_classes(saved):
    loaded = [
        DiffusionPipeline.from_pretrained(saved.folder, trust_remote_code=True),
        saved.cls.from_pretrained(saved.folder),  # no flag: the folder holds only our shims
        OneStepSRPipeline.from_pretrained(saved.folder),  # the base class loads either pipeline
    ]
    for pipe in loaded:
        assert type(pipe) is saved.cls
        np.testing.assert_array_equal(_images(pipe), saved.expected)

    transformer = AutoModel.from_pretrained(str(saved.folder), subfolder="transformer")
    vae = AutoModel.from_pretrained(str(saved.folder), subfolder="vae")
    if saved.cls is TinySRPipeline:
        assert type(transformer) is TinySRTransformer2DModel and type(vae) is TinySRAutoencoder
    else:
        assert type(transformer) is SD3Transformer2DModel
        embeddings = AutoModel.from_pretrained(str(saved.folder), subfolder="prompt_embeddings")
        assert type(embeddings) is PromptEmbeddings
        torch.testing.assert_close(embeddings.prompt_embeds, saved.pipe.prompt_embeddings.prompt_embeds)
    torch.testing.assert_close(transformer.state_dict(), saved.pipe.transformer.state_dict())


def _layout(folder: Path) -> dict:
    """Files and contents, minus the `_name_or_path` provenance diffusers writes into a loaded model's config."""
    files = _files(folder)
    for name, data in files.items():
        if name.endswith("config.json"):
            files[name] = {k: v for k, v in json.loads(data).items() if k != "_name_or_path"}
    return files


def test_resaving_a_loaded_pipeline_keeps_the_layout(saved, tmp_path):
    loaders = (
        lambda: DiffusionPipeline.from_pretrained(saved.folder, trust_remote_code=True),
        lambda: saved.cls.from_pretrained(saved.folder),
    )
    for index, load in enumerate(loaders):
        resaved = tmp_path / f"resaved{index}"
        load().save_pretrained(resaved)
        assert _layout(resaved) == _layout(saved.folder)  # same files, shims, index and weights
        assert type(saved.cls.from_pretrained(resaved)) is saved.cls


def test_dtype_on_loading_without_future_warnings(saved):
    """diffusers 0.42 names it `dtype` (`torch_dtype` is deprecated): no FutureWarning from our own code paths."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        pipe = saved.cls.from_pretrained(saved.folder, dtype=torch.bfloat16)
        assert {module.dtype for module in pipe.components.values() if isinstance(module, torch.nn.Module)} == {
            torch.bfloat16
        }
        assert np.isfinite(_images(pipe)).all()
        if saved.cls is TinySRPipeline:  # the default model: float32 unless `dtype` says otherwise
            assert TinySRPipeline.from_pretrained().transformer.dtype == torch.float32
            assert TinySRPipeline.from_pretrained(dtype=torch.bfloat16).transformer.dtype == torch.bfloat16
    with pytest.warns(FutureWarning, match="dtype"):  # diffusers' own deprecation of the old name
        assert saved.cls.from_pretrained(saved.folder, torch_dtype=torch.float16).transformer.dtype == torch.float16


def test_diffusers_does_not_run_the_shims_without_the_flag(saved):
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(saved.folder)


@pytest.mark.parametrize(
    "tamper",
    ["edit component shim", "edit root shim", "extra module", "other library"],
)
def test_a_folder_with_other_code_is_refused_and_not_run(saved, tmp_path, tamper):
    folder = saved.folder
    marker = tmp_path / "ran"
    payload = f"open({str(marker)!r}, 'w').close()\n"
    if tamper == "edit component shim":
        component = "transformer" if saved.cls is TinySRPipeline else "prompt_embeddings"
        (folder / component / "tinysr_diffusers.py").write_text(SHIM_SOURCE + payload)
    elif tamper == "edit root shim":
        (folder / "pipeline_tinysr_diffusers.py").write_text(payload + SHIM_SOURCE)
    elif tamper == "extra module":
        (folder / "vae" / "helpers.py").write_text(payload)
    else:  # the index points a component at a module that ships with the folder
        index = json.loads((folder / "model_index.json").read_text())
        index["vae"] = ["evil", index["vae"][1]]
        (folder / "model_index.json").write_text(json.dumps(index))
        (folder / "vae" / "evil.py").write_text(payload)

    with pytest.raises(UntrustedFolderError, match="refusing to (run|import) it|not a tinysr_diffusers shim"):
        saved.cls.from_pretrained(folder)
    assert not marker.exists()


def test_loading_a_folder_with_the_wrong_pipeline_class_is_explained(tmp_path):
    tiny_teacher().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a TSDSRPipeline, not a TinySRPipeline"):
        TinySRPipeline.from_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["_class_name"][1] = "OnnxTinySRPipeline"  # one of ours, but not a class a pipeline folder holds
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="names 'OnnxTinySRPipeline', not one of"):
        OneStepSRPipeline.from_pretrained(tmp_path)


def test_the_registry_lists_the_pipelines_a_folder_can_hold():
    """`PIPELINE_CLASSES` (no pipeline is imported to check a folder) against the classes: every pipeline that
    `save_pretrained` can save, at the module the registry names."""
    from tinysr_diffusers.hub.pipeline_hub import PIPELINE_CLASSES
    from tinysr_diffusers.pipelines import OnnxTinySRPipeline

    def subclasses(cls: type) -> set[type]:
        return set(cls.__subclasses__()).union(*(subclasses(sub) for sub in cls.__subclasses__()))

    saveable = {cls for cls in subclasses(OneStepSRPipeline) if cls is not OnnxTinySRPipeline}
    assert {cls.__name__: cls.__module__ for cls in saveable} == PIPELINE_CLASSES


@pytest.mark.slow  # a fresh interpreter imports torch and diffusers (~10-20 s on 2 busy cores)
def test_fresh_python_loads_without_importing_the_package_first(tmp_path):
    """What a user of a Hub repo does: diffusers alone, with the package installed but not imported."""
    tiny_student().save_pretrained(tmp_path)
    code = (
        "import sys\n"
        "from diffusers import DiffusionPipeline\n"
        "assert 'tinysr_diffusers' not in sys.modules\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)\n"
        "print(type(pipe).__module__, type(pipe.transformer).__module__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == [
        "tinysr_diffusers.pipelines.pipeline_tinysr",
        "tinysr_diffusers.models.transformer_tinysr",
    ]


# --------------------------------------------------------------------------------------------------------- the Hub
class FakeHub:
    """Stands in for the Hub: repos are folders under `root`; records every upload."""

    def __init__(self, root: Path):
        self.root = root
        self.uploads = []

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, token=None, commit_message=None, create_pr=False, **kwargs):
        assert kwargs.get("path_in_repo") is None
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        self.uploads.append({"repo_id": repo_id, "message": commit_message, "files": _files(Path(folder_path))})
        return f"https://hub.invalid/{repo_id}/commit/{len(self.uploads)}"

    @staticmethod
    def load_card(repo_id_or_path, **kwargs):
        raise EntryNotFoundError(f"{repo_id_or_path} has no README.md yet")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(tinysr_diffusers.hub.pipeline_hub, "create_repo", fake.create_repo)
    monkeypatch.setattr(diffusers.utils.hub_utils, "upload_folder", fake.upload_folder)
    monkeypatch.setattr(ModelCard, "load", staticmethod(fake.load_card))
    return fake


@pytest.mark.parametrize("how", ["push_to_hub", "save_pretrained(push_to_hub=True)"])
def test_push_to_hub_uploads_the_saved_layout(saved, hub, tmp_path, how):
    if how == "push_to_hub":
        url = saved.pipe.push_to_hub("user/tiny-sr", commit_message="first")
        assert url == "https://hub.invalid/user/tiny-sr/commit/1"
    else:
        saved.pipe.save_pretrained(
            tmp_path / "pushed", push_to_hub=True, repo_id="user/tiny-sr", commit_message="first"
        )

    (upload,) = hub.uploads
    assert upload["repo_id"] == "user/tiny-sr" and upload["message"] == "first"
    files = dict(upload["files"])
    card = ModelCard(files.pop("README.md").decode())  # the model-card hook ran before the upload
    assert card.data.library_name == "diffusers" and "super-resolution" in card.data.tags
    assert files == _files(saved.folder)  # exactly the layout save_pretrained writes, shims included


def test_loading_from_the_hub_checks_the_code_then_pins_that_commit(saved, hub, monkeypatch):
    saved.pipe.push_to_hub("user/tiny-sr")
    remote = hub.root / "user/tiny-sr"
    commit = "0123456789abcdef0123456789abcdef01234567"
    downloads = []

    def fake_snapshot_download(repo_id, *, revision=None, allow_patterns=None, **kwargs):
        snapshot = hub.root / "cache" / "snapshots" / commit
        for path in remote.rglob("*"):
            relative = path.relative_to(remote)
            if path.is_file() and (path.suffix == ".py" or relative.name == "model_index.json"):
                (snapshot / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, snapshot / relative)
        assert sorted(allow_patterns) == ["*.py", "model_index.json"]  # only code and index before the check
        return str(snapshot)

    def fake_download(cls, repo_id, **kwargs):
        downloads.append(kwargs)
        return str(remote)

    monkeypatch.setattr(tinysr_diffusers.hub.pipeline_folders, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(OneStepSRPipeline, "download", classmethod(fake_download))

    pipe = saved.cls.from_pretrained("user/tiny-sr")
    assert type(pipe) is saved.cls
    np.testing.assert_array_equal(_images(pipe), saved.expected)
    assert downloads[0]["revision"] == commit and downloads[0]["trust_remote_code"] is True

    (remote / "pipeline_tinysr_diffusers.py").write_text(SHIM_SOURCE + "import os\n")
    with pytest.raises(UntrustedFolderError):
        saved.cls.from_pretrained("user/tiny-sr")
    assert len(downloads) == 1  # nothing beyond the code files was fetched for the refused repo


def test_a_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such folder"):
        TinySRPipeline.from_pretrained(str(tmp_path / "missing"))


def test_a_mistyped_local_path_is_not_a_hub_failure(tmp_path, monkeypatch):
    """`runs/final` could be a Hub repo id, but `runs/` is a folder here: a mistyped path (nothing is fetched)."""
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    for trust_remote_code in (False, True):
        with pytest.raises(FileNotFoundError, match="No such folder: runs/final"):
            OneStepSRPipeline.from_pretrained("runs/final", trust_remote_code=trust_remote_code)


@pytest.mark.parametrize("index", ['{"_class_name": ["pipeline_tinysr_diffusers", ', "[]", b"\xff\xfe"])
def test_a_malformed_model_index_is_named(tmp_path, index):
    tiny_student().save_pretrained(tmp_path)
    path = tmp_path / "model_index.json"
    path.write_bytes(index if isinstance(index, bytes) else index.encode())
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))} (is not valid JSON|holds a JSON list)"):
        TinySRPipeline.from_pretrained(tmp_path)


def test_saved_files_follow_the_umask(tmp_path):
    """`model_index.json` and the shims are readable by whoever may read the folder (mkstemp alone makes 0600)."""
    previous = os.umask(0o022)
    try:
        tiny_student().save_pretrained(tmp_path)
    finally:
        os.umask(previous)
    for name in ("model_index.json", "pipeline_tinysr_diffusers.py", "transformer/tinysr_diffusers.py"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert not list(tmp_path.rglob(".tmp-*"))
