"""TinySR: one-step real-world 4x super-resolution with a depth-pruned SD3 transformer, as diffusers components.

The namespace is lazy (as diffusers' own): `import tinysr_diffusers` imports neither torch nor diffusers until a model or
pipeline class is used, so the command line starts at once.
"""

import os
from typing import TYPE_CHECKING

from .import_utils import install_lazy_module


if TYPE_CHECKING:
    from .models import PromptEmbeddings, TinySRAutoencoder, TinySRTransformer2DModel
    from .pipelines import OneStepSRPipeline, TinySRPipeline, TSDSRPipeline

__version__ = "0.1.0"

# The model shipped inside the package (trained on a CPU by `python -m training.recipes.mini`, see its model card):
# `TinySRPipeline.from_pretrained()` and `tinysr upscale` without `--model` load it.
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")

_import_structure = {
    "models": ["PromptEmbeddings", "TinySRAutoencoder", "TinySRTransformer2DModel"],
    "pipelines": ["OneStepSRPipeline", "TSDSRPipeline", "TinySRPipeline"],
}
install_lazy_module(
    __name__, _import_structure, extra_objects={"__version__": __version__, "DEFAULT_MODEL": DEFAULT_MODEL}
)
