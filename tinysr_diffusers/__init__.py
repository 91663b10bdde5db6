"""TinySR: one-step real-world 4x super-resolution with a depth-pruned SD3 transformer, as diffusers components."""

from .models import TinySRAutoencoder, TinySRTransformer2DModel


__version__ = "0.1.0"

__all__ = ["TinySRAutoencoder", "TinySRTransformer2DModel"]
