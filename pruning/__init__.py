"""Learned depth pruning of SD3-family transformers: the TinySR search, the paper's baselines, and export.

- `search_space`: sizes of the full, static (block-wise) and Dynamic-Inter-block-Activation search spaces.
- `masked`: per-layer masks on any `SD3Transformer2DModel` / `TinySRTransformer2DModel` (diffusers hooks).
- `gates`, `inter_block`: TinyFusion's local gates; TinySR's pair gates with Expansion-Corrosion.
- `learner`: mask learning jointly with LoRA under accelerate, checkpoint/resume, keep-probability log and heatmap.
- `methods`: random-min, Flux-Lite, ShortGPT, sensitivity, SnapFusion, BK-SDM, TinyFusion, TinySR on one interface.
- `export`: renumbered SD3 checkpoints or TinySR students with `pruning.json`; Hub upload.
- `cli`: `tinysr-prune {space,score,learn,export}`.
"""

from .decision import PruningDecision
from .export import export_pruned, prune_sd3, push_to_hub
from .gates import LinearSchedule, LocalGates
from .inter_block import InterBlockGates
from .learner import MaskLearner, MaskLearnerConfig
from .losses import DecodedPerceptualLoss, PruningLoss
from .masked import MaskedTransformer
from .methods import METHODS, get_method
from .search_space import SearchSpace, local_patterns


__all__ = [
    "METHODS",
    "DecodedPerceptualLoss",
    "InterBlockGates",
    "LinearSchedule",
    "LocalGates",
    "MaskLearner",
    "MaskLearnerConfig",
    "MaskedTransformer",
    "PruningDecision",
    "PruningLoss",
    "SearchSpace",
    "export_pruned",
    "get_method",
    "local_patterns",
    "prune_sd3",
    "push_to_hub",
]
