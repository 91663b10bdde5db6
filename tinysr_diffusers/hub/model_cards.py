"""Hub model cards for TinySR pipelines and pruned transformers, filled from the models themselves.

Templates live in the top-level `model_cards` package (`string.Template` fields), installed with the wheel as package
data. Configuration, kept layers and parameter counts are read from the objects given (attributes and configs, no
pipeline classes are imported, so the pipelines can import this module); efficiency and quality figures are printed
only when measured values are passed in with the command that produced them, never invented.
"""

import string
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError
from torch import nn

from diffusers.utils.hub_utils import populate_model_card

from ..evaluation.profiling import count_parameters


TEMPLATE_PACKAGE = "model_cards"
SD3_BASE_MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"
SD3_LICENSE_NAME = "stabilityai-ai-community"
SD3_LICENSE_LINK = "https://huggingface.co/stabilityai/stable-diffusion-3-medium/blob/main/LICENSE.md"
LICENCE_NOTICE = (
    "The weights derive from Stable Diffusion 3 and are subject to the "
    f"[Stability AI Community License]({SD3_LICENSE_LINK}) of the base model (`{{base_model}}`); read it before use, "
    "in particular its terms for commercial use. The TinySR toolkit code is licensed separately."
)
TAGS = ["super-resolution", "image-to-image", "tinysr", "sd3", "one-step"]
NOT_MEASURED = "Not measured for this checkpoint."

# A measured figure: name -> (value with its unit, the command that produced it).
Measurements = Mapping[str, tuple[str, str]]


def read_template(name: str) -> str:
    """The text of the template `name` (e.g. `"tinysr_pipeline.md"`) from the installed `model_cards` package.

    A source checkout whose editable install predates that package (its finder does not map it) reads the
    repository's `model_cards/` folder instead.
    """
    try:
        return resources.files(TEMPLATE_PACKAGE).joinpath(name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        return (Path(__file__).resolve().parents[2] / TEMPLATE_PACKAGE / name).read_text(encoding="utf-8")


def _render(template: str, **fields) -> str:
    return string.Template(read_template(template)).substitute(fields)


def _measurements(measurements: Optional[Measurements]) -> str:
    if not measurements:
        return NOT_MEASURED
    rows = [f"| {name} | {value} | `{command}` |" for name, (value, command) in measurements.items()]
    return "\n".join(["| figure | value | command |", "|---|---:|---|", *rows])


def _millions(module: nn.Module) -> str:
    return f"{count_parameters(module) / 1e6:,.2f} M"


def _card(
    description: str,
    repo_id: str,
    base_model: str,
    tags: list[str],
    token: Optional[str] = None,
) -> ModelCard:
    """The card of `repo_id` with our metadata: its existing Hub card is kept (as in diffusers), else `description`."""
    try:
        card = ModelCard.load(repo_id, token=token)
    except (EntryNotFoundError, RepositoryNotFoundError, OfflineModeIsEnabled):
        card = ModelCard(f"---\n{ModelCardData(library_name='diffusers').to_yaml()}\n---\n\n{description}")
    card = populate_model_card(card, tags=tags)
    card.data.pipeline_tag = "image-to-image"
    card.data.base_model = base_model
    card.data.license = "other"
    card.data.license_name = SD3_LICENSE_NAME
    card.data.license_link = SD3_LICENSE_LINK
    return card


def pipeline_card(
    pipe: Any,
    repo_id: str,
    token: Optional[str] = None,
    base_model: str = SD3_BASE_MODEL,
    pruning_method: Optional[str] = None,
    measurements: Optional[Measurements] = None,
) -> ModelCard:
    """The card of a one-step SR pipeline pushed to `repo_id`, read from the pipeline's attributes.

    A pipeline with a `prompt_embeddings` component (the teacher, [`TSDSRPipeline`]) gets the teacher's card; any
    other (the student, [`TinySRPipeline`]) the TinySR card, with the kept layers (`source_layers`) and folded
    modulation recorded in its transformer's config and its `timestep`.
    """
    config = pipe.transformer.config
    components = [("transformer", pipe.transformer), ("vae", pipe.vae)]
    common = dict(
        pipeline_class=type(pipe).__name__,
        repo_id=repo_id,
        num_layers=config.num_layers,
        inner_dim=config.num_attention_heads * config.attention_head_dim,
        heads=config.num_attention_heads,
        components="\n".join(f"| `{name}` | `{type(m).__name__}` | {_millions(m)} |" for name, m in components),
        measurements=_measurements(measurements),
        licence=LICENCE_NOTICE.format(base_model=base_model),
    )
    embeddings = getattr(pipe, "prompt_embeddings", None)
    if embeddings is not None:
        description = _render(
            "teacher_pipeline.md",
            **common,
            num_tokens=embeddings.config.num_tokens,
            prompt=f"`{embeddings.config.prompt}`" if embeddings.config.prompt else "not recorded",
        )
        return _card(description, repo_id, base_model, tags=[*TAGS, "tsd-sr"], token=token)

    vae = pipe.vae.config
    if "encoder_conv" in vae:
        vae_description = f"TAESD topology, {vae.encoder_conv} encoder and {vae.decoder_conv} decoder convolutions"
    else:
        vae_description = type(pipe.vae).__name__
    kept_layers = getattr(config, "source_layers", None)
    description = _render(
        "tinysr_pipeline.md",
        **common,
        kept_layers=list(kept_layers) if kept_layers is not None else "not recorded",
        timestep=f"{pipe.timestep:g}",
        folded=", folded into the weights" if getattr(config, "modulation_folded", False) else "",
        pruning_method=pruning_method or "not recorded",
        vae_description=vae_description,
    )
    return _card(description, repo_id, base_model, tags=[*TAGS, "pruned"], token=token)


def pruned_transformer_card(
    transformer: nn.Module,
    repo_id: str,
    *,
    kept_layers: Optional[list[int]] = None,
    pruning_method: Optional[str] = None,
    token: Optional[str] = None,
    base_model: str = SD3_BASE_MODEL,
    measurements: Optional[Measurements] = None,
) -> ModelCard:
    """The card of a pruned transformer pushed on its own (the pruning export's hook).

    `kept_layers` defaults to the model's recorded `source_layers`.
    """
    model_class = type(transformer).__name__
    library = type(transformer).__module__.split(".")[0]
    if kept_layers is None:
        kept_layers = getattr(transformer.config, "source_layers", None)
    description = _render(
        "pruned_transformer.md",
        model_class=model_class,
        library=library,
        install="pip install tinysr-diffusers" if library == "tinysr_diffusers" else "pip install diffusers",
        base_model=base_model,
        repo_id=repo_id,
        num_layers=transformer.config.num_layers,
        kept_layers=list(kept_layers) if kept_layers is not None else "not recorded",
        pruning_method=pruning_method or "not recorded",
        parameters=_millions(transformer),
        measurements=_measurements(measurements),
        licence=LICENCE_NOTICE.format(base_model=base_model),
    )
    return _card(description, repo_id, base_model, tags=[*TAGS, "pruned"], token=token)
