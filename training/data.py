"""Training images: random HR crops from image folders or a `datasets` image dataset (optionally streamed); corrupt
images are logged and skipped.

Crops are drawn from a generator seeded by (seed, epoch, index), so a resumed run sees the same crops as an
uninterrupted one. A corrupt image is replaced by the next readable one (a stream moves on to its next item), so
every batch is full and every process of a multi-process run stays at the same step. `datasets` images are decoded
here, not by `datasets`, so that one corrupt file does not end a stream. The LR side is made on the accelerator by the
Real-ESRGAN degradation (`training.latents.make_batch`).
"""

import io
import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info


logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def find_images(folders: Sequence[str]) -> list[Path]:
    files = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"train_data folder {folder!r} does not exist.")
        files += sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"No images ({', '.join(IMAGE_SUFFIXES)}) found in {list(folders)}.")
    return files


def open_image(value) -> PIL.Image.Image:
    """A loaded PIL image from a file path, a PIL image, or an undecoded `datasets` image (`{"bytes", "path"}`)."""
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, dict):
        value = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
    with PIL.Image.open(value) as image:
        image.load()
        return image


def seeded_generator(seed: int, *key: int, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A generator seeded by `seed` and a key (e.g. epoch and index): the same numbers on every run and Python."""
    state = np.random.SeedSequence([seed, *key]).generate_state(2, np.uint32)
    return torch.Generator(device).manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def _crop_or_skip(source, size: int, generator: torch.Generator, name: str) -> Optional[torch.Tensor]:
    try:
        return random_crop(open_image(source), size, generator)
    except (OSError, ValueError, SyntaxError) as error:  # PIL raises these for truncated / corrupt files
        logger.warning("Skipping corrupt image %s: %s", name, error)
        return None


def random_crop(image: PIL.Image.Image, size: int, generator: torch.Generator) -> torch.Tensor:
    """A (3, size, size) crop in [0, 1]; images smaller than `size` are first upscaled (bicubic) to fit."""
    image = image.convert("RGB")
    if min(image.size) < size:
        ratio = size / min(image.size)
        image = image.resize((max(size, round(image.width * ratio)), max(size, round(image.height * ratio))),
                             PIL.Image.Resampling.BICUBIC)
    top = int(torch.randint(image.height - size + 1, (1,), generator=generator))
    left = int(torch.randint(image.width - size + 1, (1,), generator=generator))
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


class HRCropDataset(Dataset):
    """HR crops of images from folders (`files`) or from a `datasets` dataset (`hf_dataset`, `image_column`)."""

    def __init__(self, size: int, seed: int, files: Optional[list[Path]] = None, hf_dataset=None,
                 image_column: str = "image"):
        if (files is None) == (hf_dataset is None):
            raise ValueError("Give exactly one of `files` and `hf_dataset`.")
        self.size, self.seed, self.files = size, seed, files
        self.hf_dataset, self.image_column = hf_dataset, image_column
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reseed the crops for `epoch` (`pruning.data.epoch_batches` calls it)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.hf_dataset)

    def _crop(self, index: int, generator: torch.Generator) -> Optional[torch.Tensor]:
        if self.files is not None:
            return _crop_or_skip(self.files[index], self.size, generator, str(self.files[index]))
        return _crop_or_skip(self.hf_dataset[index][self.image_column], self.size, generator,
                             f"{self.image_column}[{index}]")

    def __getitem__(self, index: int) -> torch.Tensor:
        """The crop of image `index`, or of the next readable image after it."""
        generator = seeded_generator(self.seed, self.epoch, index)
        for offset in range(len(self)):
            crop = self._crop((index + offset) % len(self), generator)
            if crop is not None:
                return crop
        raise ValueError("None of the training images can be read.")


class StreamingCropDataset(IterableDataset):
    """HR crops of a streamed `datasets` dataset, in stream order; `epoch` reseeds the crops (and the stream's
    shuffling, if it has any). accelerate shares the batches between processes."""

    def __init__(self, hf_dataset, size: int, seed: int, image_column: str = "image"):
        self.hf_dataset, self.size, self.seed, self.image_column = hf_dataset, size, seed, image_column
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reseed the crops for `epoch` (`pruning.data.epoch_batches` calls it)."""
        self.epoch = epoch

    def __iter__(self):
        if hasattr(self.hf_dataset, "set_epoch"):
            self.hf_dataset.set_epoch(self.epoch)
        worker = get_worker_info()
        for index, example in enumerate(self.hf_dataset):
            if worker is not None and index % worker.num_workers != worker.id:
                continue  # every DataLoader worker reads the stream; each crops its own share
            generator = seeded_generator(self.seed, self.epoch, index)
            crop = _crop_or_skip(example[self.image_column], self.size, generator, f"{self.image_column}[{index}]")
            if crop is not None:
                yield crop


class PairShardDataset(Dataset):
    """(LR, target, HR) crop triplets from `.npz` shards (`lr` (N, h, w, 3), `target` and `hr` (N, 4h, 4w, 3), uint8),
    as `python -m training.recipes.peer` writes them; each item a dict of (3, H, W) tensors in [0, 1], randomly cropped
    to `size` HR pixels (aligned to the 4x scale) from a generator seeded by (seed, epoch, index)."""

    def __init__(self, folder: str, size: int, seed: int):
        self.shards = sorted(Path(folder).glob("shard-*.npz"))
        if not self.shards:
            raise FileNotFoundError(f"pair_data {folder!r} holds no shard-*.npz files.")
        self.size, self.seed, self.epoch = size, seed, 0
        self.counts = [self._open(path)["lr"].shape[0] for path in self.shards]
        self.starts = np.cumsum([0, *self.counts])
        self._cache: dict[int, dict] = {}

    @staticmethod
    def _open(path: Path) -> dict:
        with np.load(path) as data:
            return {key: data[key] for key in ("lr", "target", "hr")}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> dict:
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        if shard not in self._cache:
            self._cache[shard] = self._open(self.shards[shard])
        arrays = {key: value[index - self.starts[shard]] for key, value in self._cache[shard].items()}
        full = arrays["hr"].shape[0]
        if self.size > full or full % 4:
            raise ValueError(f"hr_size {self.size} does not fit the {full}-pixel crops of the pair data.")
        generator = seeded_generator(self.seed, self.epoch, index)
        top, left = (int(torch.randint(0, (full - self.size) // 4 + 1, (), generator=generator)) * 4 for _ in "tl")
        window = {"lr": (slice(top // 4, (top + self.size) // 4), slice(left // 4, (left + self.size) // 4))}
        item = {}
        for key, value in arrays.items():
            rows, columns = window.get(key, (slice(top, top + self.size), slice(left, left + self.size)))
            item[key] = torch.from_numpy(value[rows, columns].copy()).permute(2, 0, 1).float() / 255
        return item


def build_dataset(config):
    """The crop dataset of a config: image folders, a `datasets` dataset, (`dataset_streaming`) a streamed one, or
    (`pair_data`) LR/target pairs."""
    if config.pair_data:
        return PairShardDataset(config.pair_data, config.hr_size, config.seed)
    if not config.dataset_name:
        return HRCropDataset(config.hr_size, config.seed, files=find_images(config.train_data))
    import datasets

    hf_dataset = datasets.load_dataset(config.dataset_name, config.dataset_config, split=config.dataset_split,
                                      streaming=config.dataset_streaming)
    columns = hf_dataset.column_names or list(hf_dataset.features or [])
    if config.image_column not in columns:
        raise ValueError(f"{config.dataset_name} has no column {config.image_column!r}; it has {columns}.")
    if isinstance(hf_dataset.features.get(config.image_column) if hf_dataset.features else None, datasets.Image):
        hf_dataset = hf_dataset.cast_column(config.image_column, datasets.Image(decode=False))
    if config.dataset_streaming:
        return StreamingCropDataset(hf_dataset, config.hr_size, config.seed, config.image_column)
    return HRCropDataset(config.hr_size, config.seed, hf_dataset=hf_dataset, image_column=config.image_column)
