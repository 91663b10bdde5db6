"""The keep-probability heatmap of mask learning: one row per layer, one column per logged step."""

from typing import Optional, Sequence

import numpy as np

from tinysr_diffusers.utils import PathLike, atomic_path


def plot_keep_probabilities(
    steps: Sequence[int],
    probabilities: Sequence[Sequence[float]],
    path: PathLike,
    keep_layers: Optional[Sequence[int]] = None,
    title: str = "Keep probability per layer",
) -> None:
    """
    Write a PNG heatmap of per-layer keep probabilities over training steps (atomically).

    Args:
        steps: The logged training steps (x axis).
        probabilities: One row of per-layer keep probabilities per logged step.
        path: Output `.png` file.
        keep_layers: The decided layers, marked on the right edge.
        title: Figure title.
    """
    try:  # matplotlib is needed for this figure only (extra `pruning`)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("The keep-probability heatmap needs matplotlib: `pip install matplotlib`.") from error
    values = np.asarray(probabilities, dtype=float)
    if values.ndim != 2 or len(values) != len(steps) or not len(steps):
        raise ValueError(f"Need one row of probabilities per step, got {values.shape} for {len(steps)} steps.")
    num_layers = values.shape[1]
    figure = Figure(figsize=(max(6.0, min(16.0, 0.05 * len(steps) + 5)), max(3.0, 0.28 * num_layers + 1.5)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    first, last = steps[0], steps[-1]
    half_step = (last - first) / max(len(steps) - 1, 1) / 2 or 0.5
    image = axes.imshow(
        values.T,
        aspect="auto",
        origin="lower",
        cmap="viridis",
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
        extent=(first - half_step, last + half_step, -0.5, num_layers - 0.5),
    )
    axes.set_xlabel("training step")
    axes.set_ylabel("layer")
    axes.set_yticks(range(num_layers))
    axes.set_title(title)
    if keep_layers is not None:
        axes.plot([last + half_step] * len(keep_layers), list(keep_layers), "r<", markersize=6, clip_on=False)
        axes.set_title(f"{title}\n(red marks: the decided layers)")
    figure.colorbar(image, ax=axes, label="keep probability")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
