"""Export of a pruned transformer: a renumbered SD3 checkpoint or a TinySR student, with `pruning.json`; Hub upload.

An SD3 checkpoint keeps the chosen blocks under new indices 0..K-1, so `SD3Transformer2DModel.from_pretrained` loads it
with no missing or unexpected keys. The only structural subtlety is the last block: SD3 builds its last block with
`context_pre_only=True` (no text-stream output: no `attn.to_add_out`, `ff_context`, `norm2_context`, and a
`norm1_context` that is an `AdaLayerNormContinuous` producing only (scale, shift)). When the last kept block was a full
block in the source, its text-stream output is never read after it, so dropping those modules changes nothing, and
its text-stream input modulation is kept exactly: the `AdaLayerNormZero` linear's (shift_msa, scale_msa) rows become
the `AdaLayerNormContinuous` linear's (scale, shift) rows, and both apply `norm(x) * (1 + scale) + shift`.
"""

import json
import re
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from accelerate import init_empty_weights
from huggingface_hub import create_repo, upload_folder

from tinysr_diffusers.hub.model_cards import SD3_BASE_MODEL, pruned_transformer_card
from tinysr_diffusers.models.transformer_tinysr import TinySRTransformer2DModel
from tinysr_diffusers.utils import PathLike, atomic_directory, atomic_write_text, write_json

from .decision import PruningDecision


EXPORT_FORMATS = ("sd3", "tinysr")
PRUNING_FILE = "pruning.json"
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# Model-card hook: `(folder, pruning record) -> card text`; the default fills `model_cards/pruned_transformer.md`.
ModelCardBuilder = Callable[[Path, dict], str]


@torch.no_grad()
def prune_sd3(transformer: SD3Transformer2DModel, keep_layers: list[int]) -> SD3Transformer2DModel:
    """
    A new `SD3Transformer2DModel` with only `keep_layers` (renumbered 0..K-1), on the source's device and dtype.

    Its output equals the source's with the other layers skipped (see the module docstring for the last block).
    """
    if not isinstance(transformer, SD3Transformer2DModel):
        raise TypeError(f"Expected an SD3Transformer2DModel, got {type(transformer).__name__}.")
    config = transformer.config
    keep = PruningDecision("export", config.num_layers, keep_layers).keep_layers
    dual = tuple(i for i, layer in enumerate(keep) if layer in config.dual_attention_layers)
    new_config = {k: v for k, v in config.items() if not k.startswith("_")}
    new_config.update(num_layers=len(keep), dual_attention_layers=dual)
    with torch.device("meta"):
        pruned = SD3Transformer2DModel(**new_config)

    source = transformer.state_dict()
    last, dim = len(keep) - 1, transformer.inner_dim
    state_dict = {}
    for name in pruned.state_dict():
        if not name.startswith("transformer_blocks."):
            state_dict[name] = source[name].clone()
            continue
        _, index, rest = name.split(".", 2)
        layer = keep[int(index)]
        tensor = source[f"transformer_blocks.{layer}.{rest}"]
        if int(index) == last and layer != config.num_layers - 1 and rest.startswith("norm1_context.linear."):
            tensor = torch.cat([tensor[dim : 2 * dim], tensor[:dim]])  # (shift_msa, scale_msa) -> (scale, shift)
        state_dict[name] = tensor.clone()
    pruned.load_state_dict(state_dict, strict=True, assign=True)
    return pruned.eval()


def export_pruned(
    transformer: SD3Transformer2DModel,
    decision: PruningDecision,
    output_dir: PathLike,
    format: str = "sd3",
    pooled_projections: Optional[torch.Tensor] = None,
    timestep: float = 1000.0,
    overwrite: bool = False,
    safe_serialization: bool = True,
) -> Path:
    """
    Write the pruned model and `pruning.json` into `output_dir` (atomically: the folder appears complete or not at all).

    Args:
        transformer: The source SD3 transformer (merge LoRA adapters first).
        decision: Which layers to keep, with the method's scores.
        output_dir: The folder to create.
        format: `"sd3"` (an `SD3Transformer2DModel` checkpoint) or `"tinysr"` (a `TinySRTransformer2DModel` built by
            `from_sd3` with `pooled_projections` and `timestep`).
        overwrite: Replace an existing non-empty folder (only once the new one is complete).

    Returns:
        The output folder.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"Unknown export format {format!r}; choose one of {EXPORT_FORMATS}.")
    num_layers = transformer.config.num_layers
    if decision.num_layers != num_layers:
        raise ValueError(f"The decision is for {decision.num_layers} layers but the transformer has {num_layers}.")
    if format == "sd3":
        model = prune_sd3(transformer, decision.keep_layers)
    else:
        model = TinySRTransformer2DModel.from_sd3(transformer, decision.keep_layers, timestep, pooled_projections)
    record = {
        **decision.to_dict(),
        "format": format,
        "timestep": timestep if format == "tinysr" else None,
        "source_config": json.loads(transformer.to_json_string()),
    }
    with atomic_directory(output_dir, overwrite=overwrite) as folder:
        model.save_pretrained(folder, safe_serialization=safe_serialization)
        write_json(Path(folder) / PRUNING_FILE, record)
    return Path(output_dir)


def read_pruning_record(folder: PathLike) -> dict:
    path = Path(folder) / PRUNING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a pruning export (no {PRUNING_FILE}).")
    return json.loads(path.read_text(encoding="utf-8"))


def template_model_card(folder: Path, record: dict, repo_id: str, token: Optional[str] = None) -> str:
    """The `model_cards/pruned_transformer.md` card of an exported folder (parameters counted without loading weights)."""
    model_class = TinySRTransformer2DModel if record["format"] == "tinysr" else SD3Transformer2DModel
    with init_empty_weights():
        model = model_class.from_config(model_class.load_config(folder))
    source = record.get("source_config", {}).get("_name_or_path") or ""
    base_model = source if _REPO_ID.match(source) and not Path(source).exists() else SD3_BASE_MODEL
    card = pruned_transformer_card(
        model,
        repo_id,
        kept_layers=record["keep_layers"],
        pruning_method=record["method"],
        token=token,
        base_model=base_model,
    )
    return str(card)


def push_to_hub(
    folder: PathLike,
    repo_id: str,
    *,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    commit_message: Optional[str] = None,
    model_card: Union[str, ModelCardBuilder, None] = None,
) -> str:
    """
    Upload an exported folder to the Hub with a model card (`README.md`), in one commit.

    Args:
        folder: A folder written by [`export_pruned`].
        repo_id: Target repository (created if missing).
        model_card: Card text, or a builder `(folder, pruning record) -> text`; default [`template_model_card`]. An
            existing `README.md` in the folder is kept when `model_card` is `None`.

    Returns:
        The URL of the commit.
    """
    folder = Path(folder)
    record = read_pruning_record(folder)
    readme = folder / "README.md"
    if model_card is not None or not readme.exists():
        if callable(model_card):
            text = model_card(folder, record)
        else:
            text = model_card or template_model_card(folder, record, repo_id, token)
        atomic_write_text(readme, text)
    create_repo(repo_id, token=token, private=private, exist_ok=True)
    commit = upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        token=token,
        commit_message=commit_message or f"Upload {record['method']}-pruned transformer ({record['format']})",
    )
    return str(getattr(commit, "commit_url", commit))
