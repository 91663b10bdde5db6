"""Learned depth pruning of SD3-family transformers: the TinySR search, the paper's baselines, and export.

- `search_space`: sizes of the full, static (block-wise) and Dynamic-Inter-block-Activation search spaces.
- `masked`: per-layer masks on any `SD3Transformer2DModel` / `TinySRTransformer2DModel` (diffusers hooks).
- `local_gates`, `inter_block`: TinyFusion's local gates; TinySR's pair gates with Expansion-Corrosion.
- `config`: `MaskLearnerConfig`, the settings of a mask search (import-light).
- `learner`: mask learning jointly with LoRA under accelerate, checkpoint/resume, keep-probability log and heatmap.
- `methods`: random-min, Flux-Lite, ShortGPT, sensitivity, SnapFusion, BK-SDM, TinyFusion, TinySR on one interface.
- `comparison`: every method decides at one keep count, the same recovery after each, one table (the
  `benchmarks.pruning_methods` command and the mini recipe's `pruning_table` stage).
- `export`: renumbered SD3 checkpoints or TinySR students with `pruning.json`; Hub upload.
- `cli`: `tinysr-prune {space,score,learn,export}`.

The namespace is lazy: `import pruning` imports nothing heavy until a name is used.
"""

import sys
from typing import TYPE_CHECKING

from tinysr_diffusers.import_utils import _LazyModule


_import_structure = {
    "config": ["MaskLearnerConfig"],
    "decision": ["PruningDecision"],
    "export": ["export_pruned", "prune_sd3", "push_to_hub"],
    "inter_block": ["InterBlockGates"],
    "learner": ["MaskLearner"],
    "local_gates": ["LinearSchedule", "LocalGates"],
    "losses": ["DecodedPerceptualLoss", "PruningLoss"],
    "masked": ["MaskedTransformer"],
    "methods": ["METHODS", "get_method"],
    "search_space": ["SearchSpace", "local_patterns"],
}

if TYPE_CHECKING:
    from .config import MaskLearnerConfig
    from .decision import PruningDecision
    from .export import export_pruned, prune_sd3, push_to_hub
    from .inter_block import InterBlockGates
    from .learner import MaskLearner
    from .local_gates import LinearSchedule, LocalGates
    from .losses import DecodedPerceptualLoss, PruningLoss
    from .masked import MaskedTransformer
    from .methods import METHODS, get_method
    from .search_space import SearchSpace, local_patterns
else:
    sys.modules[__name__] = _LazyModule(
        __name__, globals()["__file__"], _import_structure, module_spec=__spec__, doc=__doc__
    )
