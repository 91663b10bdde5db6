from typing import TYPE_CHECKING

from ..import_utils import install_lazy_module


if TYPE_CHECKING:
    from .autoencoder_tinysr import TinySRAutoencoder
    from .prompt_embeddings import PromptEmbeddings
    from .transformer_tinysr import TinySRTransformer2DModel

_import_structure = {
    "autoencoder_tinysr": ["TinySRAutoencoder"],
    "prompt_embeddings": ["PromptEmbeddings"],
    "transformer_tinysr": ["TinySRTransformer2DModel"],
}
install_lazy_module(__name__, _import_structure)
