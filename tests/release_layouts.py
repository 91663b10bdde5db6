"""Synthetic TinySR and TSD-SR releases in the authors' file layouts, from tiny random models (nothing downloaded).

The LoRA files are written the way the releases wrote them: a peft adapter (`LoraConfig(r, lora_alpha=r, ...)`,
`add_adapter`), its `get_peft_model_state_dict` with every key prefixed `transformer.`, saved with safetensors.
The unconverted pieces are returned too, so tests can compute the expected output independently.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffusers import AutoencoderKL, SD3Transformer2DModel
from tests.tiny_models import randomize_
from tests.tiny_pipelines import (
    JOINT_DIM,
    LATENT_CHANNELS,
    POOLED_DIM,
    TEXT_TOKENS,
    TINY_DIT,
    TINY_TAESD,
    tiny_autoencoder_kl,
)
from tinysr_diffusers import TinySRAutoencoder
from tinysr_diffusers.hub.conversion import (
    TINYSR_TRANSFORMER_TARGETS,
    TSDSR_TRANSFORMER_TARGETS,
    TSDSR_VAE_TARGETS,
)


RANK = 4
CONTEXT_KEYS = ("context_embedder.",)  # the release student class had no context embedder
CROP_PATCHES = 8  # the release student stored its position embedding cropped to one latent size


def sd3_config(num_layers: int = 3) -> dict:
    return dict(
        **TINY_DIT,
        num_layers=num_layers,
        joint_attention_dim=JOINT_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=POOLED_DIM,
        out_channels=LATENT_CHANNELS,
    )


def lora_state_dict(model: torch.nn.Module, targets, seed: int) -> dict[str, torch.Tensor]:
    """Give `model` a random LoRA adapter the way the releases trained one; return its release-format weights."""
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=list(targets)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:  # lora_B starts at zero: make the adapter change the output
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return {"transformer." + name: tensor.contiguous() for name, tensor in get_peft_model_state_dict(model).items()}


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_weights(folder: Path, edit) -> None:
    path = folder / "diffusion_pytorch_model.safetensors"
    weights = safetensors.torch.load_file(path)
    safetensors.torch.save_file(edit(weights), path)


@dataclass
class TinySRRelease:
    transformer_dir: Path
    vae_dir: Path
    lora_path: Path
    pool_embeds_path: Path
    sd3: SD3Transformer2DModel  # the unconverted transformer with the LoRA as an active peft adapter (unmerged)
    vae: TinySRAutoencoder
    pooled: torch.Tensor

    def args(self) -> dict:
        return dict(
            transformer_dir=self.transformer_dir,
            vae_dir=self.vae_dir,
            lora_path=self.lora_path,
            pool_embeds_path=self.pool_embeds_path,
        )


def make_tinysr_release(root: Path, seed: int = 0) -> TinySRRelease:
    """`prune-12-merge-tinysr/transformer`, `vae/separable`, `tinysr/transformer.safetensors`, `pool_embeds.pt`."""
    torch.manual_seed(seed)
    sd3 = randomize_(SD3Transformer2DModel(**sd3_config()), seed).eval()
    transformer_dir = root / "prune-12-merge-tinysr" / "transformer"
    sd3.save_pretrained(transformer_dir)
    edit_config(transformer_dir, _class_name="TinySD3Transformer2DModel")

    def release_weights(weights):
        weights = {name: t for name, t in weights.items() if not name.startswith(CONTEXT_KEYS)}
        weights["pos_embed.pos_embed"] = sd3.pos_embed.cropped_pos_embed(CROP_PATCHES * 2, CROP_PATCHES * 2)
        weights["scale"], weights["shift"] = torch.tensor([]), torch.tensor([])
        return weights

    edit_weights(transformer_dir, release_weights)

    torch.manual_seed(seed + 1)
    vae = randomize_(
        TinySRAutoencoder(**TINY_TAESD, encoder_conv="separable", decoder_conv="separable", scaling_factor=0.8),
        seed + 1,
        std=0.3,
    ).eval()
    vae_dir = root / "vae" / "separable"
    vae.save_pretrained(vae_dir)
    config = json.loads((vae_dir / "config.json").read_text())
    for key in ("encoder_conv", "decoder_conv"):
        config.pop(key)  # the release config is an AutoencoderTiny one
    config.update(_class_name="AutoencoderTiny", latent_magnitude=3, latent_shift=0.5, force_upcast=False)
    (vae_dir / "config.json").write_text(json.dumps(config))

    lora_path = root / "tinysr" / "transformer.safetensors"
    lora_path.parent.mkdir(parents=True)
    lora = lora_state_dict(sd3, TINYSR_TRANSFORMER_TARGETS, seed + 2)
    safetensors.torch.save_file(lora, lora_path)

    pooled = torch.randn(POOLED_DIM, generator=torch.Generator().manual_seed(seed + 3))
    pool_embeds_path = root / "default" / "pool_embeds.pt"
    pool_embeds_path.parent.mkdir(parents=True)
    torch.save(pooled[None], pool_embeds_path)  # (1, 2048) in the release
    return TinySRRelease(transformer_dir, vae_dir, lora_path, pool_embeds_path, sd3, vae, pooled)


@dataclass
class TSDSRRelease:
    sd3_dir: Path
    transformer_lora: Path
    vae_lora: Path
    prompt_embeds: Path
    pool_embeds: Path
    transformer: SD3Transformer2DModel  # unconverted, LoRA as an active peft adapter (unmerged)
    vae: AutoencoderKL
    embeds: torch.Tensor
    pooled: torch.Tensor

    def args(self) -> dict:
        return dict(
            sd3_dir=self.sd3_dir,
            transformer_lora=self.transformer_lora,
            vae_lora=self.vae_lora,
            prompt_embeds=self.prompt_embeds,
            pool_embeds=self.pool_embeds,
        )


def make_tsdsr_release(root: Path, seed: int = 0) -> TSDSRRelease:
    """An SD3 diffusers folder, `tsdsr/transformer.safetensors`, `tsdsr/vae.safetensors`, the two embeddings."""
    torch.manual_seed(seed)
    transformer = randomize_(SD3Transformer2DModel(**sd3_config(num_layers=2)), seed).eval()
    # two resnets per block and a channel change, as SD3's VAE, so the release VAE LoRA targets exist
    vae = tiny_autoencoder_kl(seed, block_out_channels=(8, 8, 16, 16), layers_per_block=2)
    sd3_dir = root / "stable-diffusion-3-medium-diffusers"
    transformer.save_pretrained(sd3_dir / "transformer")
    vae.save_pretrained(sd3_dir / "vae")
    (sd3_dir / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))

    lora_dir = root / "tsdsr"
    lora_dir.mkdir()
    safetensors.torch.save_file(
        lora_state_dict(transformer, TSDSR_TRANSFORMER_TARGETS, seed + 1), lora_dir / "transformer.safetensors"
    )
    safetensors.torch.save_file(lora_state_dict(vae, TSDSR_VAE_TARGETS, seed + 2), lora_dir / "vae.safetensors")

    generator = torch.Generator().manual_seed(seed + 3)
    embeds = torch.randn(TEXT_TOKENS, JOINT_DIM, generator=generator)
    pooled = torch.randn(POOLED_DIM, generator=generator)
    embed_dir = root / "default"
    embed_dir.mkdir()
    torch.save(embeds[None], embed_dir / "prompt_embeds.pt")
    torch.save(pooled[None], embed_dir / "pool_embeds.pt")
    return TSDSRRelease(
        sd3_dir,
        lora_dir / "transformer.safetensors",
        lora_dir / "vae.safetensors",
        embed_dir / "prompt_embeds.pt",
        embed_dir / "pool_embeds.pt",
        transformer,
        vae,
        embeds,
        pooled,
    )
