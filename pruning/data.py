"""Latent pairs for mask learning and calibration: what an item may look like, and a reader for cached shards.

Pruning never sees images: it learns from batches of scaled VAE latents, encoded once beforehand (every loss of
docs/method.md, Depth pruning, is computed from z_L, z_HR and the teacher's estimate). A batch is `(lr, hr)` or
`(lr, hr, teacher)` tensors of shape (B, C, H, W), or a mapping with the keys `lr_latents`, `hr_latents` and
optionally `teacher_latents`; `teacher` is the teacher's one-step estimate of the clean latents (`z_L - v_teacher`),
computed on the fly when absent.
"""

import bisect
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset, IterableDataset


LATENT_KEYS = ("lr_latents", "hr_latents", "teacher_latents")


@dataclass
class LatentBatch:
    """Scaled latents of a batch: low-resolution input `lr`, high-resolution target `hr`, optional teacher output."""

    lr: torch.Tensor
    hr: torch.Tensor
    teacher: Optional[torch.Tensor] = None

    def __post_init__(self):
        shapes = {name: tuple(t.shape) for name, t in vars(self).items() if t is not None}
        if self.lr.ndim != 4 or len(set(shapes.values())) != 1:
            raise ValueError(
                f"Latent batches need (batch, channels, height, width) tensors of one shape, got {shapes}."
            )

    def to(self, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None) -> "LatentBatch":
        return replace(self, **{name: t.to(device, dtype) for name, t in vars(self).items() if t is not None})


def as_latent_batch(item: Any) -> LatentBatch:
    """Normalise one batch from a data iterable (tuple, list, mapping or `LatentBatch`)."""
    if isinstance(item, LatentBatch):
        return item
    if isinstance(item, Mapping):
        missing = [key for key in LATENT_KEYS[:2] if key not in item]
        if missing:
            raise KeyError(
                f"A latent batch mapping needs the keys {LATENT_KEYS[:2]} (optional {LATENT_KEYS[2]!r}); missing {missing}."
            )
        return LatentBatch(*(item.get(key) for key in LATENT_KEYS))
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return LatentBatch(*item)
    raise TypeError(
        f"Cannot read a latent batch from {type(item).__name__}: give (lr, hr), (lr, hr, teacher) or a mapping with "
        f"{LATENT_KEYS}."
    )


class LatentPairDataset(Dataset):
    r"""
    Latent pairs stored in safetensors files, read lazily (one sample at a time).

    Each file holds `lr_latents` and `hr_latents` (and optionally `teacher_latents`), all of shape (N, C, H, W) with the
    same N; `path` is one such file or a folder of `*.safetensors` shards (read in name order). Items are mappings with
    those keys, so a `DataLoader` over this dataset yields batches that [`as_latent_batch`] understands.
    """

    def __init__(self, path: Union[str, Path]):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"Latent data {path} does not exist.")
        self.files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not self.files:
            raise FileNotFoundError(f"No .safetensors latent shards in {path}.")
        self.keys, counts = None, []
        for file in self.files:
            with safe_open(str(file), framework="pt") as handle:
                keys = tuple(key for key in LATENT_KEYS if key in handle.keys())
                if keys[:2] != LATENT_KEYS[:2]:
                    raise KeyError(
                        f"{file} must hold {LATENT_KEYS[:2]} (optional {LATENT_KEYS[2]!r}); has {list(handle.keys())}."
                    )
                lengths = {key: handle.get_slice(key).get_shape()[0] for key in keys}
            if len(set(lengths.values())) != 1:
                raise ValueError(f"{file}: the latent tensors have different sample counts {lengths}.")
            if self.keys is not None and keys != self.keys:
                raise ValueError(f"{file} holds {keys} but earlier shards hold {self.keys}.")
            self.keys = keys
            counts.append(next(iter(lengths.values())))
        self.offsets = [0]
        for count in counts:
            self.offsets.append(self.offsets[-1] + count)
        self._handles = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = bisect.bisect_right(self.offsets, index) - 1
        if shard not in self._handles:  # opened lazily, per process (DataLoader workers included)
            self._handles[shard] = safe_open(str(self.files[shard]), framework="pt")
        handle, row = self._handles[shard], index - self.offsets[shard]
        return {key: handle.get_slice(key)[row : row + 1][0] for key in self.keys}


def latent_loader(path: Union[str, Path], batch_size: int, shuffle: bool = True, num_workers: int = 0) -> DataLoader:
    """A `DataLoader` of full batches over [`LatentPairDataset`] (shuffled per epoch; accelerate shards and seeds it)."""
    dataset = LatentPairDataset(path)
    if len(dataset) < batch_size:
        raise ValueError(f"{path} holds {len(dataset)} samples, fewer than one batch of {batch_size}.")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=True, num_workers=num_workers)


def data_length(data: Iterable) -> Optional[int]:
    """Batches per epoch, or None for a stream (no length, or a loader over an `IterableDataset`)."""
    if isinstance(getattr(data, "dataset", None), IterableDataset):
        return None
    try:
        return len(data)
    except TypeError:
        return None


def epoch_batches(
    data: Iterable, start: int = 0, skip_batches: Optional[Callable[[Iterable, int], Iterable]] = None
) -> Iterator[tuple[int, int, Any]]:
    """
    Yield `(epoch, position, batch)` from batch `start` of a run on, epoch after epoch: what a resumed run reads.

    Before each epoch, `set_epoch(epoch)` is called on `data` and on its `dataset` where they have one (accelerate's
    loaders give it to their sampler only). Sized data jumps whole epochs unread, then skips the rest of the way with
    `skip_batches(data, n)` (accelerate's `skip_first_batches`, which does not load them) or by reading; a stream is
    re-read up to `start`.
    """
    length, position, epoch, skip = data_length(data), start, 0, start
    if length == 0:
        raise ValueError("The data gives no batch (fewer samples than one batch?).")
    if length:
        epoch, skip = divmod(start, length)
    while True:
        for target in (data, getattr(data, "dataset", None)):
            if hasattr(target, "set_epoch"):
                target.set_epoch(epoch)
        batches = data
        if length and skip and skip_batches is not None:
            batches, skip = skip_batches(data, skip), 0
        seen = 0
        for seen, batch in enumerate(batches, 1):
            if seen > skip:
                yield epoch, position, batch
                position += 1
        if seen == 0:
            raise ValueError("The data gives no batch.")
        epoch, skip = epoch + 1, max(0, skip - seen)
