"""Saving, pushing and loading our pipelines with the trust rules of `pipeline_folders`, as a mixin for them.

[`PipelineHubMixin`] goes before `DiffusionPipeline` in a pipeline's bases: `save_pretrained` adds the shims,
`push_to_hub` uploads that layout with a model card, and `from_pretrained` runs a folder without `trust_remote_code`
only when its code is nothing but our shims. The pipeline classes a folder may name are listed in
`PIPELINE_CLASSES` (a registry, so that no pipeline module has to be imported to check a folder).
"""

import importlib
import os
import tempfile
from typing import Optional, Union

from huggingface_hub import create_repo

from .model_cards import pipeline_card
from .pipeline_folders import MODEL_INDEX, fetch_code_files, looks_like_a_path, verify_shims, write_shims


# The pipelines a saved folder's `model_index.json` may name (`_class_name`), with their modules: the classes that
# the package exports and `save_pretrained` saves (tests/test_loading.py checks the registry against the classes).
PIPELINE_CLASSES = {
    "TSDSRPipeline": "tinysr_diffusers.pipelines.pipeline_tsdsr",
    "TinySRPipeline": "tinysr_diffusers.pipelines.pipeline_tinysr",
}
HUB_ARGUMENTS = ("cache_dir", "token", "local_files_only", "force_download", "proxies")  # what fetching the code takes


class PipelineHubMixin:
    """`save_pretrained`, `push_to_hub` and `from_pretrained` for folders that diffusers loads with our classes."""

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        max_shard_size: Optional[Union[int, str]] = None,
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """Save like diffusers, plus the shims that let `DiffusionPipeline.from_pretrained` load the installed classes.

        With `push_to_hub=True` the folder (shims and model card included) is uploaded afterwards; `repo_id`,
        `token`, `private`, `commit_message` and `create_pr` are taken from `kwargs` as in diffusers.
        """
        hub_kwargs = {name: kwargs.pop(name, None) for name in ("repo_id", "token", "private", "commit_message")}
        create_pr = kwargs.pop("create_pr", False)
        super().save_pretrained(
            save_directory,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            push_to_hub=False,
            **kwargs,
        )
        write_shims(save_directory, type(self).__name__)
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id") or os.path.basename(os.path.normpath(save_directory))
            self._push_folder(save_directory, repo_id, create_pr=create_pr, **hub_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: Optional[str] = None,
    ) -> str:
        """Upload the pipeline in the layout `save_pretrained` writes (shims and model card included)."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            return self._push_folder(
                folder, repo_id, token=token, private=private, commit_message=commit_message, create_pr=create_pr
            )

    def _push_folder(
        self,
        folder: str,
        repo_id: str,
        *,
        token: Optional[str] = None,
        private: Optional[bool] = None,
        commit_message: Optional[str] = None,
        create_pr: bool = False,
    ) -> str:
        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        self.write_model_card(folder, repo_id, token=token)
        return self._upload_folder(folder, repo_id, token=token, commit_message=commit_message, create_pr=create_pr)

    def write_model_card(self, folder: str, repo_id: str, token: Optional[str] = None) -> None:
        """Write `README.md` into `folder` before it is pushed to `repo_id`: the one place where cards are made.

        The card comes from the templates in `model_cards/` ([`~hub.model_cards.pipeline_card`]): configuration, kept
        layers and parameter counts from this pipeline, the SD3 licence notice and the Hub metadata. An existing card
        of the repo is kept, as in diffusers.
        """
        pipeline_card(self, repo_id, token=token).save(os.path.join(folder, "README.md"))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs):
        r"""
        Load a pipeline folder or Hub repo saved by `save_pretrained`, with the installed classes.

        Without `trust_remote_code`, the folder is trusted only if every `.py` file in it is one of the shims that
        `save_pretrained` writes, byte for byte (they only import the installed `tinysr_diffusers`); anything else
        raises [`~hub.pipeline_folders.UntrustedFolderError`]. For a Hub repo only its code files are fetched first,
        checked, and the load is pinned to that commit. Other arguments are those of
        `DiffusionPipeline.from_pretrained` (`dtype`, `revision`, `variant`, ...).
        """
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path) and looks_like_a_path(path):  # not a Hub failure: say which folder is missing
            raise FileNotFoundError(f"No such folder: {path} (it reads as a local path, not a Hub repo id org/name).")
        if kwargs.get("trust_remote_code") or kwargs.get("custom_pipeline") is not None:
            return _check_weights(super().from_pretrained(pretrained_model_name_or_path, **kwargs), path)
        if os.path.isdir(path):
            folder = path
        else:
            hub_kwargs = {name: kwargs[name] for name in HUB_ARGUMENTS if name in kwargs}
            folder, kwargs["revision"] = fetch_code_files(path, revision=kwargs.get("revision"), **hub_kwargs)
        index = verify_shims(folder)
        cls._check_pipeline_class(index, folder)
        kwargs["trust_remote_code"] = True  # the only code in the folder imports the installed package
        return _check_weights(super().from_pretrained(pretrained_model_name_or_path, **kwargs), path)

    @classmethod
    def _check_pipeline_class(cls, index: dict, folder: str) -> None:
        """The class a folder names must be one of ours and `cls` or a subclass of it (a base class such as
        `OneStepSRPipeline` loads any of its pipelines): diffusers returns the class the folder names."""
        class_name = index.get("_class_name")
        class_name = class_name[1] if isinstance(class_name, list) else class_name
        if class_name not in PIPELINE_CLASSES:
            raise ValueError(f"{folder}/{MODEL_INDEX} names {class_name!r}, not one of {sorted(PIPELINE_CLASSES)}.")
        if not issubclass(getattr(importlib.import_module(PIPELINE_CLASSES[class_name]), class_name), cls):
            raise ValueError(
                f"{folder} holds a {class_name}, not a {cls.__name__}: load it with {class_name}.from_pretrained "
                "or DiffusionPipeline.from_pretrained(..., trust_remote_code=True)."
            )


def _check_weights(pipe, path: str):
    """`pipe`, unless a component's weights file lacked some of its tensors: diffusers leaves those on the meta
    device (with only a warning), and the first `.to()` then fails with "Cannot copy out of meta tensor". Name them."""
    import torch

    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            missing = [key for key, tensor in component.state_dict().items() if tensor.is_meta]
            if missing:
                shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                raise ValueError(f"{path}/{name}: the weights file lacks {shown}; the file is incomplete or "
                                 "belongs to another model.")
    return pipe
