"""The depth-pruning search spaces of TinySR (paper section 3.1; docs/method.md, Depth pruning).

An L-layer transformer is cut into L/M consecutive blocks of M layers and N layers are kept in every block. Counting
masks that keep L*N/M layers:

- full space: every choice of L*N/M layers, C(L, L*N/M);
- static space (TinyFusion's local constraint): one of the C(M, N) local patterns per block, C(M, N) ** (L/M);
- Dynamic Inter-block Activation (TinySR): blocks are paired (2j, 2j+1) and an operator may move `delta` kept layers
  from one block of the pair to the other, so a pair reaches C(M, N)**2 + 2 * C(M, N - delta) * C(M, N + delta) masks.
  A trailing unpaired block (odd number of blocks) keeps its static patterns.

For 24 layers, 2:4: 2,704,156 full, 46,656 static (1.73%), 314,432 with DIA (11.6%).
"""

import itertools
from dataclasses import dataclass
from math import comb
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    import torch


def local_patterns(block_size: int, keep_per_block: int) -> "torch.Tensor":
    """The C(M, N) binary rows of length M with N ones, in `itertools.combinations` order (float32, shape (C, M))."""
    import torch  # here only: the space sizes are combinatorics, so `tinysr-prune space` starts without torch

    if not 0 <= keep_per_block <= block_size:
        raise ValueError(f"Cannot keep {keep_per_block} of {block_size} layers per block.")
    rows = [
        [1.0 if i in chosen else 0.0 for i in range(block_size)]
        for chosen in itertools.combinations(range(block_size), keep_per_block)
    ]
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, block_size)


@dataclass(frozen=True)
class SearchSpace:
    r"""
    The block layout of a depth-pruning search: `num_layers` layers in blocks of `block_size`, `keep_per_block` kept in
    each block, DIA moving `delta` layers between the two blocks of a pair.

    Build it from a global keep count with [`SearchSpace.from_keep`], which rejects counts the layout cannot express.
    """

    num_layers: int
    block_size: int
    keep_per_block: int
    delta: int = 1

    def __post_init__(self):
        for name in ("num_layers", "block_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        if self.num_layers % self.block_size:
            raise ValueError(
                f"{self.num_layers} layers cannot be cut into blocks of {self.block_size}: choose a block size that "
                f"divides the number of layers."
            )
        if not 1 <= self.keep_per_block <= self.block_size:
            raise ValueError(f"Keeping {self.keep_per_block} of {self.block_size} layers per block is impossible.")
        if self.delta < 0:
            raise ValueError(f"`delta` must be >= 0, got {self.delta}.")

    @classmethod
    def from_keep(cls, num_layers: int, num_keep: int, block_size: int, delta: int = 1) -> "SearchSpace":
        """The layout keeping `num_keep` of `num_layers` layers, the same number in every block of `block_size`."""
        if not 1 <= num_keep <= num_layers:
            raise ValueError(f"Cannot keep {num_keep} of {num_layers} layers.")
        if block_size < 1:
            raise ValueError(f"The block size must be a positive integer, got {block_size}.")
        if num_layers % block_size or (num_keep * block_size) % num_layers:
            raise ValueError(
                f"Keeping {num_keep} of {num_layers} layers is impossible with blocks of {block_size}: the layer count "
                f"must be a multiple of the block size and every block must keep the same whole number of layers "
                f"(keep * block_size / num_layers = {num_keep * block_size / num_layers:g})."
            )
        return cls(num_layers, block_size, num_keep * block_size // num_layers, delta)

    @property
    def num_blocks(self) -> int:
        return self.num_layers // self.block_size

    @property
    def num_pairs(self) -> int:
        return self.num_blocks // 2

    @property
    def num_keep(self) -> int:
        return self.num_blocks * self.keep_per_block

    def check_inter_block(self) -> None:
        """Dynamic Inter-block Activation needs `delta` layers to move both ways and at least one pair of blocks."""
        if not 1 <= self.delta <= min(self.keep_per_block, self.block_size - self.keep_per_block):
            raise ValueError(
                f"Dynamic Inter-block Activation moves delta={self.delta} layer(s) between blocks: a block keeping "
                f"{self.keep_per_block} of {self.block_size} needs 1 <= delta <= "
                f"{min(self.keep_per_block, self.block_size - self.keep_per_block)}."
            )
        if self.num_pairs == 0:
            raise ValueError("Dynamic Inter-block Activation needs at least two blocks.")

    @property
    def num_patterns(self) -> int:
        return comb(self.block_size, self.keep_per_block)

    @property
    def full_size(self) -> int:
        """C(L, L*N/M): every mask with the same number of kept layers."""
        return comb(self.num_layers, self.num_keep)

    @property
    def static_size(self) -> int:
        """C(M, N) ** (L/M): one local pattern per block."""
        return self.num_patterns**self.num_blocks

    @property
    def pair_size(self) -> int:
        """Masks one pair of blocks reaches with DIA: T_0 keeps both patterns, T_-1 / T_+1 move `delta` layers."""
        moved = comb(self.block_size, self.keep_per_block - self.delta) * comb(
            self.block_size, self.keep_per_block + self.delta
        )
        return self.num_patterns**2 + 2 * moved

    @property
    def inter_block_size(self) -> int:
        """Masks reachable with Dynamic Inter-block Activation (pairs, plus a trailing unpaired block if any)."""
        self.check_inter_block()
        return self.pair_size**self.num_pairs * self.num_patterns ** (self.num_blocks % 2)

    @property
    def static_fraction(self) -> float:
        return self.static_size / self.full_size

    @property
    def inter_block_fraction(self) -> float:
        return self.inter_block_size / self.full_size

    def summary(self) -> str:
        """A one-paragraph report of the three space sizes and the reachable fractions."""
        try:
            inter_block = f"{self.inter_block_size:,} ({100 * self.inter_block_fraction:.2f}%)"
        except ValueError as error:  # e.g. every layer kept: no layer can move between blocks
            inter_block = f"not applicable ({error})"
        return (
            f"{self.num_layers} layers, blocks of {self.block_size} keeping {self.keep_per_block} "
            f"({self.num_keep} kept): full {self.full_size:,}; static {self.static_size:,} "
            f"({100 * self.static_fraction:.2f}%); with Dynamic Inter-block Activation (delta={self.delta}) "
            f"{inter_block}."
        )
