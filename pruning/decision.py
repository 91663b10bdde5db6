"""The result of every pruning method: which layers to keep, and the evidence behind the choice."""

import json
import operator
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch

from tinysr_diffusers.models.transformer_tinysr import _check_keep_layers

from tinysr_diffusers.utils import PathLike, write_json


def _integer(value: Any) -> int:
    """`value` if it is an integer, else TypeError: `int()` would floor 0.5, read "1" and take `true` for 1, so a
    mistyped decision (e.g. a hand-edited `pruning.json`) would silently keep other layers."""
    if isinstance(value, bool):
        raise TypeError("a bool is not a layer index")
    return operator.index(value)


def _sequence(values: Any) -> list:
    """The items of a list-like `values` (TypeError for a string or a mapping, whose items are no layers)."""
    if isinstance(values, (str, bytes, dict)):
        raise TypeError("not a list")
    return list(values)


@dataclass
class PruningDecision:
    r"""
    A hard layer mask with its scores, as every method of [`pruning.methods`] returns and `pruning.json` stores.

    Attributes:
        method (`str`): Name of the method that decided.
        num_layers (`int`): Layers of the source transformer.
        keep_layers (`list[int]`): Kept layer indices, ascending.
        scores (`list[float]`, *optional*): Per-layer importance (higher = more worth keeping) for score-based
            methods; `None` for methods that do not score layers (random-min, BK-SDM-style).
        probabilities (`list[float]`, *optional*): Per-layer keep probability for the learned methods.
        details (`dict`): Method-specific, JSON-ready evidence (candidate losses, patterns, operators, settings).
    """

    method: str
    num_layers: int
    keep_layers: list[int]
    scores: Optional[list[float]] = None
    probabilities: Optional[list[float]] = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        try:
            self.num_layers = _integer(self.num_layers)
        except TypeError:
            raise ValueError(f"`num_layers` must be an integer, got {self.num_layers!r}.") from None
        try:
            keep = [_integer(layer) for layer in _sequence(self.keep_layers)]
        except TypeError:
            raise ValueError(f"`keep_layers` must be a list of integers, got {self.keep_layers!r}.") from None
        self.keep_layers = _check_keep_layers(keep, self.num_layers)
        for name in ("scores", "probabilities"):
            values = getattr(self, name)
            if values is not None:
                values = [float(v) for v in values]
                if len(values) != self.num_layers:
                    raise ValueError(f"`{name}` has {len(values)} entries for {self.num_layers} layers.")
                setattr(self, name, values)

    @classmethod
    def from_mask(cls, method: str, mask: Sequence[float], **kwargs) -> "PruningDecision":
        """From a 0/1 mask with one entry per layer."""
        mask = torch.as_tensor(mask).reshape(-1)
        if not torch.all((mask == 0) | (mask == 1)):
            raise ValueError(f"A pruning mask must hold only 0 and 1, got {mask.tolist()}.")
        return cls(method, len(mask), mask.nonzero().reshape(-1).tolist(), **kwargs)

    @property
    def mask(self) -> torch.Tensor:
        """Float 0/1 mask of shape (num_layers,)."""
        mask = torch.zeros(self.num_layers)
        mask[self.keep_layers] = 1.0
        return mask

    @property
    def pruned_layers(self) -> list[int]:
        return [layer for layer in range(self.num_layers) if layer not in self.keep_layers]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruningDecision":
        known = {"method", "num_layers", "keep_layers", "scores", "probabilities", "details"}
        missing = {"method", "num_layers", "keep_layers"} - set(data)
        if missing:
            raise ValueError(f"Not a pruning decision: missing {sorted(missing)}.")
        return cls(**{key: value for key, value in data.items() if key in known})

    def save(self, path: PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: PathLike) -> "PruningDecision":
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))
