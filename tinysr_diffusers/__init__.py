"""TinySR: one-step real-world 4x super-resolution with a depth-pruned SD3 transformer, as diffusers components."""

import os

from .models import PromptEmbeddings, TinySRAutoencoder, TinySRTransformer2DModel
from .pipelines import OneStepSRPipeline, TinySRPipeline, TSDSRPipeline


__version__ = "0.1.0"

# The model shipped inside the package (trained by `python -m training.recipes.mini`, see its model card):
# `TinySRPipeline.from_pretrained()` and `tinysr upscale` without `--model` load it.
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")

__all__ = [
    "DEFAULT_MODEL",
    "OneStepSRPipeline",
    "PromptEmbeddings",
    "TSDSRPipeline",
    "TinySRAutoencoder",
    "TinySRPipeline",
    "TinySRTransformer2DModel",
]
