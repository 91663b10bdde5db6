"""Training images: random HR crops from image folders or a `datasets` image dataset; corrupt images are skipped.

Crops are drawn from a generator seeded by (seed, epoch, index), so a resumed run sees the same crops as an
uninterrupted one. The LR side is made on the accelerator by the Real-ESRGAN degradation (see `distill.py`).
"""

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset


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

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.hf_dataset)

    def _open(self, index: int) -> PIL.Image.Image:
        if self.files is not None:
            with PIL.Image.open(self.files[index]) as image:
                image.load()
                return image
        return self.hf_dataset[index][self.image_column]

    def __getitem__(self, index: int) -> Optional[torch.Tensor]:
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) % 2**63)
        try:
            return random_crop(self._open(index), self.size, generator)
        except (OSError, ValueError, SyntaxError) as error:  # PIL raises these for truncated / corrupt files
            name = self.files[index] if self.files is not None else f"{self.image_column}[{index}]"
            logger.warning("Skipping corrupt image %s: %s", name, error)
            return None


def collate_crops(items: list[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """Stack the crops that loaded; None when the whole batch was corrupt (the step is then skipped)."""
    items = [item for item in items if item is not None]
    return torch.stack(items) if items else None


def build_dataset(config) -> HRCropDataset:
    if config.dataset_name:
        import datasets

        hf_dataset = datasets.load_dataset(config.dataset_name, config.dataset_config, split=config.dataset_split)
        if config.image_column not in hf_dataset.column_names:
            raise ValueError(f"{config.dataset_name} has no column {config.image_column!r}; it has "
                             f"{hf_dataset.column_names}.")
        return HRCropDataset(config.hr_size, config.seed, hf_dataset=hf_dataset, image_column=config.image_column)
    return HRCropDataset(config.hr_size, config.seed, files=find_images(config.train_data))
