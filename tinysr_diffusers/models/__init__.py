from .autoencoder_tinysr import TinySRAutoencoder
from .prompt_embeddings import PromptEmbeddings
from .transformer_tinysr import TinySRTransformer2DModel


__all__ = ["PromptEmbeddings", "TinySRAutoencoder", "TinySRTransformer2DModel"]
