from .autoencoder_tinysr import TinySRAutoencoder
from .transformer_tinysr import TinySRTransformer2DModel


__all__ = ["TinySRAutoencoder", "TinySRTransformer2DModel"]
