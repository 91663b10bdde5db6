import sys
from typing import TYPE_CHECKING

from ..import_utils import _LazyModule


_import_structure = {
    "autoencoder_tinysr": ["TinySRAutoencoder"],
    "prompt_embeddings": ["PromptEmbeddings"],
    "transformer_tinysr": ["TinySRTransformer2DModel"],
}

if TYPE_CHECKING:
    from .autoencoder_tinysr import TinySRAutoencoder
    from .prompt_embeddings import PromptEmbeddings
    from .transformer_tinysr import TinySRTransformer2DModel
else:
    sys.modules[__name__] = _LazyModule(__name__, globals()["__file__"], _import_structure, module_spec=__spec__)
