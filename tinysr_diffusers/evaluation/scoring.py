"""Scoring super-resolved image files with the paper's metrics (`metrics`), per image and mean, and the image reading
and writing around it: one copy for the quality and peer benchmarks and the mini recipe's evaluation alike. A metric
that cannot be built here is reported with the reason, not raised."""

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..utils import PathLike
from .metrics import PAPER_METRICS, MetricUnavailable, create_metric


if TYPE_CHECKING:
    import PIL.Image


def load_image(path: PathLike) -> torch.Tensor:
    """RGB image as a (1, 3, H, W) float tensor in [0, 1]."""
    from diffusers.utils import load_image as load_pil

    array = np.asarray(load_pil(str(path)), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def save_image(image: Union[torch.Tensor, "PIL.Image.Image"], path: PathLike) -> None:
    """Save a PIL image or a (1, 3, H, W) tensor in [0, 1] as PNG, atomically (an interrupted run leaves no partial
    file to be scored later)."""
    from ..image_io import write_image
    from ..image_processing import to_pil

    write_image(to_pil(image[0]) if isinstance(image, torch.Tensor) else image, Path(path), "PNG")


def crop_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Crop the bottom and right of an image to a multiple of `multiple` (as LR images made from it were)."""
    height, width = image.shape[-2:]
    return image[..., : height - height % multiple, : width - width % multiple]


def score(
    sr_files: dict[str, Path],
    hr_files: Optional[dict[str, Path]],
    metric_names: list[str],
    device: torch.device,
    allow_download: bool = True,
    crop_hr_to: int = 1,
) -> tuple[dict, list[dict]]:
    """Score SR images (against HR images paired by name, if given). Returns per-metric status and per-image scores.

    `crop_hr_to` crops each HR image to a multiple of it first (the LR images made from HR images were cropped so).
    Raises `ValueError` for inputs that cannot be scored (an SR image without its HR image or of another size).
    """
    if hr_files is not None:
        missing = sorted(set(sr_files) - set(hr_files))
        if missing:
            raise ValueError(f"no HR image for the SR images {missing}.")
    status, metrics = {}, {}
    for name in metric_names:
        spec = PAPER_METRICS[name]
        status[name] = {"description": spec.description, "kind": spec.kind, "lower_better": spec.lower_better}
        if hr_files is None and spec.kind != "no-reference":
            status[name].update(status="not applicable", reason="needs HR images (--hr)")
            continue
        try:
            metrics[name] = create_metric(name, device=device, allow_download=allow_download)
            status[name].update(status="ok", reason=None)
        except MetricUnavailable as error:
            status[name].update(status="unavailable", reason=str(error))

    per_image = [{"image": name, "scores": {}} for name in sr_files]
    image_metrics = [name for name in metrics if PAPER_METRICS[name].kind != "distribution"]
    if image_metrics:
        for row in tqdm(per_image, desc="scoring", unit="image"):
            sr = load_image(sr_files[row["image"]]).to(device)
            hr = None
            if hr_files is not None:
                hr = crop_to_multiple(load_image(hr_files[row["image"]]), crop_hr_to).to(device)
                if hr.shape != sr.shape:
                    raise ValueError(
                        f"SR {sr_files[row['image']]} is {sr.shape[-1]}x{sr.shape[-2]} but HR "
                        f"{hr_files[row['image']]} is {hr.shape[-1]}x{hr.shape[-2]}."
                    )
            for name in image_metrics:
                if status[name]["status"] != "ok":
                    continue
                try:
                    inputs = (sr,) if PAPER_METRICS[name].kind == "no-reference" else (sr, hr)
                    with torch.no_grad():
                        value = metrics[name](*inputs)
                    row["scores"][name] = float(value)
                except Exception as error:  # one metric failing on an image must not lose the others' results
                    status[name].update(status="error", reason=f"{row['image']}: {type(error).__name__}: {error}")
    for name in metrics:
        if PAPER_METRICS[name].kind == "distribution":
            sr_dir, hr_dir = _folder_of(sr_files), _folder_of(hr_files)
            try:
                status[name]["value"] = float(metrics[name](str(sr_dir), str(hr_dir)))
            except Exception as error:
                status[name].update(status="error", reason=f"{type(error).__name__}: {error}")
        elif status[name]["status"] == "ok":
            values = [row["scores"][name] for row in per_image]
            status[name]["value"] = float(np.mean(values))
        else:
            for row in per_image:
                row["scores"].pop(name, None)
    return status, per_image


def _folder_of(files: dict[str, Path]) -> Path:
    folders = {path.parent for path in files.values()}
    if len(folders) != 1:
        raise ValueError(f"FID needs the images of one folder, got {sorted(map(str, folders))}.")
    return folders.pop()
