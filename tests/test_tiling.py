"""The shared tiling mechanism and the settings of a call's tiles."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from tinysr_diffusers.tiling import TileSettings, blend_weights, tile_starts, tiled_map


@pytest.mark.parametrize("length, tile, overlap, align", [(100, 32, 8, 1), (96, 32, 8, 8), (33, 32, 4, 1), (32, 32, 4, 1)])
def test_tiles_cover_everything_with_the_requested_overlap(length, tile, overlap, align):
    starts = tile_starts(length, tile, overlap, align)
    assert starts[0] == 0 and starts[-1] + tile == length
    assert all(start % align == 0 for start in starts)
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_bad_tile_geometry_is_named():
    with pytest.raises(ValueError, match="overlap < tile"):
        tile_starts(100, 16, 16)
    with pytest.raises(ValueError, match="multiples of 8"):
        tile_starts(100, 32, 8, align=8)
    with pytest.raises(ValueError, match="blend kind"):
        blend_weights(4, 4, 1, 1, "cosine")


def _released_gaussian(size: int) -> np.ndarray:
    """The TSD-SR/TinySR latent-tile weight along one side: a normal density centred on the tile, variance 0.01 of
    the side (its normalising constant cancels in the blend)."""
    position = np.arange(size, dtype=np.float64)
    return np.exp(-((position - (size - 1) / 2) ** 2) / size**2 / (2 * 0.01)) / np.sqrt(2 * np.pi * 0.01)


def test_linear_weights_ramp_over_the_overlap_and_neighbours_add_up_to_one():
    weights = blend_weights(16, 12, 4, 3, "linear")
    ramp_y = torch.tensor([1, 2, 3, 4] + [5] * 8 + [4, 3, 2, 1]) / 5  # overlap + 1 steps, flat inside
    ramp_x = torch.tensor([1, 2, 3] + [4] * 6 + [3, 2, 1]) / 4
    torch.testing.assert_close(weights, torch.outer(ramp_y, ramp_x))
    # Two tiles that overlap by exactly `overlap` cross-fade: across the overlap their weights sum to one (column 5
    # lies in the flat middle across).
    torch.testing.assert_close(weights[-4:, 5] + weights[:4, 5], torch.ones(4))


def test_gaussian_weights_are_the_released_ones():
    weights = blend_weights(16, 12, 4, 4, "gaussian").double().numpy()
    expected = np.outer(_released_gaussian(16), _released_gaussian(12))
    np.testing.assert_allclose(weights / expected, np.full(weights.shape, weights[0, 0] / expected[0, 0]), rtol=1e-6)
    assert weights.min() > 0  # an image border covered by one tile keeps its values


@pytest.mark.parametrize("blend", ["linear", "gaussian"])
def test_a_tile_dependent_map_is_blended_with_the_weights(blend):
    """Each tile's result carries an offset of its own, as a model with context gives: every output pixel must be the
    weighted mean of the offsets of the tiles covering it (computed here by hand), not a hard seam or a flat mean."""
    x = torch.randn(2, 3, 1, 28, generator=torch.Generator().manual_seed(0))  # tiles [0, 16) and [12, 28) across
    offsets = iter([10.0, 20.0])
    result = tiled_map(lambda tile: tile + next(offsets), x, 16, 4, blend=blend)
    if blend == "linear":  # a cross-fade over the 4 overlapping pixels, in steps of (20 - 10) / (4 + 1)
        expected = np.array([10.0] * 12 + [12, 14, 16, 18] + [20] * 12)
    else:
        first, second = np.zeros(28), np.zeros(28)
        first[:16], second[12:] = _released_gaussian(16), _released_gaussian(16)
        expected = (10 * first + 20 * second) / (first + second)
    torch.testing.assert_close(result - x, torch.from_numpy(expected).float().expand_as(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("scale, align", [(1.0, 1), (2.0, 1), (0.5, 2)])
@pytest.mark.parametrize("blend", ["linear", "gaussian"])
def test_tiling_a_local_map_is_exact(scale, align, blend):
    """For a map without spatial context every tile agrees with the whole, so the blend must reproduce it."""
    x = torch.randn(2, 3, 36, 52)

    def fn(tile):
        if scale >= 1:
            return torch.nn.functional.interpolate(tile, scale_factor=scale, mode="nearest") * 2 + 1
        return torch.nn.functional.avg_pool2d(tile, int(1 / scale)) * 2 + 1

    calls = []
    result = tiled_map(lambda t: calls.append(t.shape[0]) or fn(t), x, 16, 4, scale=scale, align=align,
                       tiles_per_batch=3, blend=blend)
    torch.testing.assert_close(result, fn(x))
    assert max(calls) == 3 * 2  # three tiles of a batch of two per call


def test_progress_callback_sees_every_batch():
    seen = []

    def progress(batches):
        for batch in batches:
            seen.append(len(batch))
            yield batch

    tiled_map(lambda t: t, torch.zeros(1, 1, 40, 40), 16, 4, tiles_per_batch=4, progress=progress)
    assert sum(seen) == len(tile_starts(40, 16, 4)) ** 2


def test_tile_settings_are_keyword_only_frozen_and_checked():
    assert TileSettings() == TileSettings(size=64, overlap=8, batch=4)  # the releases' tiles
    with pytest.raises(TypeError):
        TileSettings(64, 8, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TileSettings().size = 32
    for settings, message in [
        ({"size": 0}, "`tile_size` must be a positive integer or None"),
        ({"size": True}, "`tile_size`"),
        ({"size": 16, "overlap": 16}, r"`tile_overlap` must be an integer in \[0, tile_size\)"),
        ({"size": None, "overlap": -1}, "`tile_overlap`"),
        ({"batch": 0}, "`tile_batch_size` must be a positive integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            TileSettings(**settings)


def test_halved_halves_the_batch_then_the_tile_down_to_the_smallest():
    """The out-of-memory fallback's sequence: the batch first, then the tile (a multiple of the patch, its overlap
    at most a quarter of it), until it would be smaller than 16 latent pixels."""
    steps, tiles = [], TileSettings(size=64, overlap=8, batch=4)
    while tiles is not None:
        steps.append((tiles.size, tiles.overlap, tiles.batch))
        tiles = tiles.halved(latent_side=100, multiple=2)
    assert steps == [(64, 8, 4), (64, 8, 2), (64, 8, 1), (32, 8, 1), (16, 4, 1)]
    assert TileSettings(size=None).halved(latent_side=42, multiple=2) == TileSettings(size=20, overlap=5, batch=1)
    assert TileSettings(size=128, batch=1).halved(latent_side=40, multiple=2).size == 20  # one tile: the image's half


def test_the_settings_load_without_torch():
    """The command line reads the default tiles at start-up, before torch is imported."""
    code = "import sys, tinysr_diffusers.tiling as t; print(t.TileSettings().size, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["64", "False"], result.stderr
