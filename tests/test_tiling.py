"""The shared tiling mechanism."""

import pytest
import torch

from tinysr_diffusers.tiling import blend_weights, tile_starts, tiled_map


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


@pytest.mark.parametrize("kind", ["linear", "gaussian"])
def test_weights_are_positive_and_peak_in_the_middle(kind):
    weights = blend_weights(16, 12, 4, 4, kind)
    assert weights.min() > 0
    assert weights[8, 6] >= weights[0, 0]


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
