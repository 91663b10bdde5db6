"""Search-space sizes (paper section 3.1), checked against enumeration with the real operators."""

import itertools
from math import comb

import pytest
import torch

from pruning.inter_block import OPERATORS, apply_operators, neighbour_table
from pruning.search_space import SearchSpace, local_patterns


def _bits(mask) -> int:
    return sum(1 << i for i, v in enumerate(mask) if v)


def _pair_masks(space: SearchSpace) -> set[int]:
    """Every mask of one pair of blocks that the operators can produce, for any cur patterns and any `next`."""
    patterns = local_patterns(space.block_size, space.keep_per_block)
    neighbours = neighbour_table(patterns, space.delta)
    reached = set()
    for a, b in itertools.product(range(len(patterns)), repeat=2):
        for next_a, next_b in itertools.product(neighbours[a].nonzero().flatten(), neighbours[b].nonzero().flatten()):
            current = patterns[[a, b]]
            candidate = patterns[[int(next_a), int(next_b)]]
            for op in range(len(OPERATORS)):
                mask = apply_operators(current, candidate, torch.eye(3)[op : op + 1])
                reached.add(_bits(mask.reshape(-1).int().tolist()))
    return reached


def _enumerate_inter_block(space: SearchSpace) -> set[int]:
    """All full masks reachable with DIA: products of per-pair sets (plus the static patterns of an odd last block)."""
    width = 2 * space.block_size
    parts = [_pair_masks(space)] * space.num_pairs
    if space.num_blocks % 2:
        parts.append({_bits(p.int().tolist()) for p in local_patterns(space.block_size, space.keep_per_block)})
    masks = set()
    for combo in itertools.product(*parts):
        masks.add(sum(part << (width * i) for i, part in enumerate(combo)))
    return masks


def _enumerate_static(space: SearchSpace) -> set[int]:
    rows = [_bits(p.int().tolist()) for p in local_patterns(space.block_size, space.keep_per_block)]
    return {
        sum(r << (space.block_size * i) for i, r in enumerate(c))
        for c in itertools.product(rows, repeat=space.num_blocks)
    }


def test_paper_numbers():
    space = SearchSpace.from_keep(24, 12, 4)
    assert (space.full_size, space.static_size, space.inter_block_size) == (2_704_156, 46_656, 314_432)
    assert round(100 * space.static_fraction, 2) == 1.73
    assert round(100 * space.inter_block_fraction, 1) == 11.6
    assert space.pair_size == 68 and space.num_patterns == 6
    assert "2,704,156" in space.summary() and "314,432" in space.summary()


def test_paper_numbers_by_enumeration():
    space = SearchSpace.from_keep(24, 12, 4)
    assert sum(1 for _ in itertools.combinations(range(24), 12)) == space.full_size
    static = _enumerate_static(space)
    reachable = _enumerate_inter_block(space)
    assert len(static) == space.static_size
    assert len(reachable) == space.inter_block_size
    assert static <= reachable  # T_0 everywhere is the static space
    assert all(bin(mask).count("1") == 12 for mask in reachable)  # inside the full space


@pytest.mark.parametrize(
    "layers, keep, block, delta",
    [(8, 4, 4, 1), (12, 6, 4, 1), (6, 2, 3, 1), (8, 2, 4, 1), (8, 4, 4, 2), (16, 12, 4, 1), (10, 5, 2, 1)],
)
def test_small_spaces_by_enumeration(layers, keep, block, delta):
    space = SearchSpace.from_keep(layers, keep, block, delta)
    every = {_bits(m) for m in itertools.product((0, 1), repeat=layers) if sum(m) == keep}
    static, reachable = _enumerate_static(space), _enumerate_inter_block(space)
    assert len(every) == space.full_size == comb(layers, keep)
    assert len(static) == space.static_size
    assert len(reachable) == space.inter_block_size
    assert static <= reachable <= every


def test_layout_errors():
    with pytest.raises(ValueError, match="impossible with blocks of 4"):
        SearchSpace.from_keep(24, 10, 4)
    with pytest.raises(ValueError, match="impossible with blocks of 5"):
        SearchSpace.from_keep(24, 12, 5)
    with pytest.raises(ValueError, match="Cannot keep"):
        SearchSpace.from_keep(24, 30, 4)
    with pytest.raises(ValueError, match="delta"):
        SearchSpace.from_keep(24, 18, 4, delta=2).check_inter_block()
    with pytest.raises(ValueError, match="two blocks"):
        SearchSpace.from_keep(4, 2, 4).check_inter_block()
