"""The one interface of every depth-pruning method, and what the score-based ones share.

`method.decide(model, calibration_data, keep) -> PruningDecision`: `model` is an `SD3Transformer2DModel`, a
`TinySRTransformer2DModel`, or a [`MaskedTransformer`] around one (which carries the SD3 conditioning to use);
`calibration_data` is an iterable of latent batches ([`pruning.data`]); `keep` the number of layers to keep.
"""

from contextlib import contextmanager
from typing import Callable, ClassVar, Iterable, Iterator, Sequence, Union

import torch

from ..data import LatentBatch, as_latent_batch
from ..decision import PruningDecision
from ..masked import MaskableTransformer, MaskedTransformer


ModelLike = Union[MaskableTransformer, MaskedTransformer]
# (clean-latent prediction, batch) -> a number; lower is better for losses, higher for metrics.
BatchScore = Callable[[torch.Tensor, LatentBatch], torch.Tensor]


def task_loss(prediction: torch.Tensor, batch: LatentBatch) -> torch.Tensor:
    """The paper's task term: MSE between the one-step estimate and the high-resolution latents."""
    return torch.nn.functional.mse_loss(prediction.float(), batch.hr.float())


def latent_psnr(prediction: torch.Tensor, batch: LatentBatch) -> torch.Tensor:
    """PSNR in dB of the estimate against the high-resolution latents, with their peak-to-peak range as the peak."""
    target = batch.hr.float()
    mse = torch.nn.functional.mse_loss(prediction.float(), target)
    peak = target.max() - target.min()
    return 10 * torch.log10(peak**2 / mse.clamp_min(1e-12))


class PruningMethod:
    """Base of every method: subclasses set `name` and implement `decide`."""

    name: ClassVar[str]

    def decide(self, model: ModelLike, calibration_data: Iterable, keep: int) -> PruningDecision:
        raise NotImplementedError

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not callable(v))
        return f"{type(self).__name__}({options})"


@contextmanager
def masked_view(model: ModelLike) -> Iterator[MaskedTransformer]:
    """Use `model` as a [`MaskedTransformer`]; a plain transformer is wrapped (default conditioning) and unwrapped."""
    if isinstance(model, MaskedTransformer):
        yield model
        return
    with MaskedTransformer(model) as masked:
        yield masked


def check_keep(keep: int, num_layers: int) -> int:
    if not isinstance(keep, int) or not 1 <= keep <= num_layers:
        raise ValueError(f"Cannot keep {keep!r} of {num_layers} layers: keep between 1 and {num_layers}.")
    return keep


def calibration_batches(calibration_data: Iterable, device: torch.device) -> list[LatentBatch]:
    """Read the calibration data once (it is evaluated many times) onto `device`."""
    batches = [as_latent_batch(item).to(device) for item in calibration_data]
    if not batches:
        raise ValueError("The calibration data is empty.")
    return batches


@contextmanager
def calibrated_view(
    model: ModelLike, calibration_data: Iterable, keep: int
) -> Iterator[tuple[MaskedTransformer, list[LatentBatch]]]:
    """How every score-based method starts: [`masked_view`] of `model`, `keep` checked against its layer count and the
    calibration data read onto its device."""
    with masked_view(model) as masked:
        check_keep(keep, masked.num_layers)
        yield masked, calibration_batches(calibration_data, masked.transformer.device)


@torch.no_grad()
def evaluate(masked: MaskedTransformer, batches: Sequence[LatentBatch], mask, score: BatchScore) -> float:
    """Mean of `score` over the calibration batches, the model running with the hard `mask` (None: all layers)."""
    values = [score(masked.predict_clean(batch.lr, mask), batch).item() for batch in batches]
    return sum(values) / len(values)


def keep_top(scores: Sequence[float], keep: int) -> list[int]:
    """The `keep` highest-scoring layers (the lower index first on ties), ascending."""
    order = sorted(range(len(scores)), key=lambda layer: (-scores[layer], layer))
    return sorted(order[:keep])


def without(num_layers: int, removed: Iterable[int]) -> torch.Tensor:
    """A 0/1 mask keeping every layer but `removed`."""
    mask = torch.ones(num_layers)
    mask[list(removed)] = 0.0
    return mask
