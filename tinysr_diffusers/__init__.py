"""TinySR: one-step real-world 4x super-resolution with a depth-pruned SD3 transformer, as diffusers components."""

from .models import PromptEmbeddings, TinySRAutoencoder, TinySRTransformer2DModel
from .pipelines import OneStepSRPipeline, TinySRPipeline, TSDSRPipeline


__version__ = "0.1.0"

__all__ = [
    "OneStepSRPipeline",
    "PromptEmbeddings",
    "TSDSRPipeline",
    "TinySRAutoencoder",
    "TinySRPipeline",
    "TinySRTransformer2DModel",
]
