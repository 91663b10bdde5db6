"""Convert the authors' released TinySR and TSD-SR checkpoints into this toolkit's pipelines.

The releases (github Microtreei/TinySR, Microtreei/TSD-SR) ship separate pieces that their scripts assemble at run
time; here they become one `save_pretrained` folder each.

TinySR: a diffusers folder of a pruned SD3-config transformer (`prune-12-merge-tinysr/transformer`, SD3 key names;
its class had no `context_embedder`), a tiny VAE folder with an `AutoencoderTiny` config whose convolutions are
depthwise-separable, a LoRA file `transformer.safetensors` and the pooled prompt embedding `pool_embeds.pt`.
TSD-SR: an SD3-medium diffusers folder, LoRA files `transformer.safetensors` and `vae.safetensors` (VAE encoder), and
`prompt_embeds.pt` / `pool_embeds.pt`.

The release LoRA files hold peft parameter names without the adapter name, prefixed `transformer.` (also for the
VAE), e.g. `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`, with `lora_alpha == r`. They are loaded as the
release did (`LoraConfig(r, lora_alpha=r, target_modules)`, `add_adapter`, weights set by name) and merged; for the
student the merge happens BEFORE the modulation is cached, because the adaLN and time-embedding linears are LoRA
targets.
"""

import os
import pickle
import zipfile
from pathlib import Path
from typing import Optional, Sequence, Union

import safetensors.torch
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from diffusers import AutoencoderKL, SD3Transformer2DModel
from diffusers.models.embeddings import PatchEmbed
from diffusers.utils import _resolve_dtype, logging

from ..models import PromptEmbeddings, TinySRAutoencoder, TinySRTransformer2DModel
from ..pipelines import TinySRPipeline, TSDSRPipeline
from ..utils import read_json_object


logger = logging.get_logger(__name__)

LORA_PREFIX = "transformer."  # the release prefixes every LoRA key with this, the VAE's too
ADAPTER_NAME = "default"
TINYSR_TRANSFORMER_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "proj", "linear", "linear_1", "linear_2", "net.2")
TSDSR_TRANSFORMER_TARGETS = (
    "to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "proj", "linear", "proj_out",
)  # fmt: skip
TSDSR_VAE_TARGETS = (
    "encoder.conv_in",
    *(f"encoder.down_blocks.{i}.resnets.{j}.conv{k}" for i in range(4) for j in range(2) for k in (1, 2)),
    *(f"encoder.down_blocks.{i}.resnets.0.conv_shortcut" for i in (1, 2)),
    *(f"encoder.down_blocks.{i}.downsamplers.0.conv" for i in range(3)),
    *(f"encoder.mid_block.attentions.0.{name}" for name in ("to_q", "to_k", "to_v", "to_out.0")),
    *(f"encoder.mid_block.resnets.{j}.conv{k}" for j in range(2) for k in (1, 2)),
    "encoder.conv_out",
    "quant_conv",
)
SD3_TRANSFORMER_CLASSES = ("SD3Transformer2DModel", "TinySD3Transformer2DModel")
# Modules of the text (context) stream: a zero-length text context never reaches them, so the student ignores them.
CONTEXT_STREAM_PARTS = (
    "context_embedder.", ".norm1_context.", ".ff_context.", ".attn.add_q_proj.", ".attn.add_k_proj.",
    ".attn.add_v_proj.", ".attn.to_add_out.", ".attn.norm_added_q.", ".attn.norm_added_k.",
)  # fmt: skip
# Buffers of the release's student class (empty cached norm_out modulation), not part of an SD3 model.
RELEASE_EXTRA_BUFFERS = ("scale", "shift")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class ConversionError(ValueError):
    """A release piece is missing, malformed, or belongs to another model."""


# ---------------------------------------------------------------------------------------------------------- pieces
def _require(path: Union[str, os.PathLike], what: str, folder: bool = False) -> Path:
    path = Path(path)
    if not (path.is_dir() if folder else path.is_file()):
        raise ConversionError(f"{what} not found: {path} is not an existing {'folder' if folder else 'file'}.")
    return path


def _read_config(folder: Path, what: str) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{what} folder {folder} has no config.json: not a diffusers model folder.")
    try:
        return read_json_object(config_path, ConversionError)
    except ConversionError as error:
        raise ConversionError(f"{what} config {error}") from None


def _first_sentence(error: BaseException) -> str:
    """The gist of a library's error, without its advice (torch's suggests `weights_only=False`)."""
    text = " ".join(str(error).split())
    return text.split(". ")[0].rstrip(".") or type(error).__name__


def _load_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A safetensors file on the CPU; a truncated, corrupt or foreign file is one clear error naming it."""
    try:
        return safetensors.torch.load_file(path)
    except safetensors.SafetensorError as error:
        with open(path, "rb") as handle:
            pickled = handle.read(1) == b"\x80" or zipfile.is_zipfile(handle)
        reason = "it is a torch.save (pickle) file" if pickled else f"truncated or corrupt: {_first_sentence(error)}"
        raise ConversionError(f"{what} {path} is not a safetensors file ({reason}).") from None


def _load_tensors(path: Path, what: str) -> object:
    """`torch.load(weights_only=True)`: tensors and plain containers only, so a file cannot run code on loading."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # unreadable (permissions, I/O): the message names the file
    except pickle.UnpicklingError:
        raise ConversionError(
            f"{what} {path} is corrupt or holds objects other than tensors; only tensors are loaded, since "
            "unpickling anything else could run code."
        ) from None
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for a truncated or foreign file
        raise ConversionError(f"{what} {path} is not a readable torch.save file ({_first_sentence(error)}).") from None


def _read_weights(folder: Path, what: str) -> dict[str, torch.Tensor]:
    """All tensors of a diffusers model folder (single or sharded safetensors, or a .bin file), on the CPU."""
    shards = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if shards:
        state_dict = {}
        for shard in shards:
            state_dict.update(_load_safetensors(shard, f"{what} weights"))
        return state_dict
    if (folder / WEIGHT_FILES[1]).is_file():
        state_dict = _load_tensors(folder / WEIGHT_FILES[1], f"{what} weights")
        if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise ConversionError(f"{what} weights {folder / WEIGHT_FILES[1]} do not hold a state dict of tensors.")
        return state_dict
    raise ConversionError(f"{what} folder {folder} holds no weights ({' or '.join(WEIGHT_FILES)}).")


def load_embedding(path: Union[str, os.PathLike], shape: Sequence[Optional[int]], what: str) -> torch.Tensor:
    """A tensor saved with `torch.save` (optionally with a leading batch axis of 1), checked against `shape`
    (`None` accepts any size on that axis)."""
    path = _require(path, what)
    tensor = _load_tensors(path, what)
    if not isinstance(tensor, torch.Tensor):
        raise ConversionError(f"{what} {path} holds a {type(tensor).__name__}, not a tensor.")
    if tensor.ndim == len(shape) + 1 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != len(shape) or any(size is not None and size != n for size, n in zip(shape, tensor.shape)):
        wanted = tuple("any" if size is None else size for size in shape)
        raise ConversionError(
            f"{what} {path} has shape {tuple(tensor.shape)}; this transformer needs {wanted} "
            "(optionally with a leading batch axis of 1)."
        )
    return tensor.float()


def load_release_lora(
    model: torch.nn.Module,
    lora_path: Union[str, os.PathLike],
    target_modules: Sequence[str],
    lora_alpha: Optional[float] = None,
    adapter_name: str = ADAPTER_NAME,
) -> None:
    """Attach a peft LoRA adapter to `model` and set its weights from a release LoRA file.

    The rank is read from the file; `lora_alpha` defaults to the rank (the releases train with alpha == r). Every
    adapter parameter must be in the file and every file entry must be used, with matching shapes.
    """
    lora_path = _require(lora_path, "LoRA file")
    lora = _load_safetensors(lora_path, "LoRA file")
    ranks = {tensor.shape[0] for name, tensor in lora.items() if ".lora_A." in name}
    if len(ranks) != 1:
        raise ConversionError(
            f"LoRA file {lora_path} has {'no lora_A weights' if not ranks else f'several ranks {sorted(ranks)}'}; "
            "expected one rank."
        )
    (rank,) = ranks
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if lora_alpha is None else lora_alpha,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    try:
        model.add_adapter(config, adapter_name=adapter_name)
    except ValueError as error:  # peft: no target module found
        raise ConversionError(f"LoRA targets {list(target_modules)} do not fit {type(model).__name__}: {error}")
    expected = {}
    for name, parameter in model.named_parameters():
        if f".{adapter_name}." in name and "lora_" in name:
            expected[LORA_PREFIX + name.replace(f".{adapter_name}", "")] = parameter
    missing = sorted(set(expected) - set(lora))
    unexpected = sorted(set(lora) - set(expected))
    if missing or unexpected:
        raise ConversionError(
            f"LoRA file {lora_path} does not match {type(model).__name__} with targets {list(target_modules)}: "
            f"{len(missing)} adapter weights missing from the file (e.g. {missing[:3]}), {len(unexpected)} file "
            f"entries without a place in the model (e.g. {unexpected[:3]}). Is it the LoRA of another model?"
        )
    with torch.no_grad():
        for name, parameter in expected.items():
            if parameter.shape != lora[name].shape:
                raise ConversionError(
                    f"LoRA weight {name} in {lora_path} has shape {tuple(lora[name].shape)}, the model needs "
                    f"{tuple(parameter.shape)}."
                )
            parameter.copy_(lora[name])


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Merge every peft LoRA layer of `model` into its base weights and remove the adapter modules."""
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    with torch.no_grad():
        for layer in layers:
            layer.merge()
    model.unload_lora()
    return model


def _load_pruned_sd3(folder: Path) -> SD3Transformer2DModel:
    """The release student folder as an `SD3Transformer2DModel` holding every weight the student needs.

    Context-stream weights absent from the folder keep their initial values: with a zero-length text context they
    never touch the image tokens. A missing image-stream or conditioning weight is an error.
    """
    config = _read_config(folder, "Transformer")
    if config.get("_class_name") not in SD3_TRANSFORMER_CLASSES:
        raise ConversionError(
            f"Transformer folder {folder} holds a {config.get('_class_name')!r}, not an SD3-config transformer "
            f"({' or '.join(SD3_TRANSFORMER_CLASSES)})."
        )
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    try:
        model = SD3Transformer2DModel.from_config(config).eval()
    except (TypeError, ValueError) as error:
        raise ConversionError(f"Transformer config {folder / 'config.json'} is not an SD3 config: {error}") from None
    weights = _read_weights(folder, "Transformer")
    expected = model.state_dict()

    missing = [name for name in expected if name not in weights]
    needed = [name for name in missing if not any(part in f".{name}" for part in CONTEXT_STREAM_PARTS)]
    if needed:
        raise ConversionError(
            f"Transformer folder {folder} lacks {len(needed)} weights the student needs, e.g. {needed[:5]}."
        )
    if missing:
        logger.info(f"{len(missing)} context-stream weights absent from {folder}; unused by the student.")
    unexpected = [name for name in weights if name not in expected and name not in RELEASE_EXTRA_BUFFERS]
    if unexpected:
        raise ConversionError(
            f"Transformer folder {folder} holds {len(unexpected)} weights an SD3 transformer with this config does "
            f"not have, e.g. {unexpected[:5]}: the folder of another model?"
        )
    state_dict = {name: weights[name] for name in expected if name in weights}
    state_dict["pos_embed.pos_embed"] = _full_position_embedding(
        weights.get("pos_embed.pos_embed"), expected["pos_embed.pos_embed"], model.pos_embed, folder
    )
    for name, tensor in state_dict.items():
        if tensor.shape != expected[name].shape:
            raise ConversionError(
                f"Weight {name} in {folder} has shape {tuple(tensor.shape)}; the config asks for "
                f"{tuple(expected[name].shape)}."
            )
    model.load_state_dict({name: tensor.float() for name, tensor in state_dict.items()}, strict=False)
    return model


def _full_position_embedding(
    stored: Optional[torch.Tensor], full: torch.Tensor, patch_embed: PatchEmbed, folder: Path
) -> torch.Tensor:
    """SD3's sin-cos position grid (a function of the config). The release student stored only a centre crop for
    64x64 latents; that crop must equal the grid's, so any latent size can use the full grid."""
    if stored is None or stored.shape == full.shape:
        return full if stored is None else stored
    tokens = stored.shape[1]
    side = int(round(tokens**0.5))
    patch = patch_embed.patch_size
    if stored.ndim != 3 or side * side != tokens or side > patch_embed.pos_embed_max_size:
        raise ConversionError(f"pos_embed.pos_embed in {folder} has shape {tuple(stored.shape)}, not an SD3 grid.")
    crop = patch_embed.cropped_pos_embed(side * patch, side * patch)
    if not torch.allclose(stored.float(), crop.float(), atol=2e-3):  # fp16 release files
        raise ConversionError(
            f"pos_embed.pos_embed in {folder} ({side}x{side} patches) is not the centre crop of SD3's sin-cos grid "
            "for this config; refusing to replace it."
        )
    return full


def _load_release_vae(folder: Path) -> TinySRAutoencoder:
    """An `AutoencoderTiny`-config folder (standard or depthwise-separable convolutions per side) as a
    `TinySRAutoencoder`; the convolution type of each side is read from the weight names."""
    config = _read_config(folder, "VAE")
    if config.get("_class_name") not in ("AutoencoderTiny", "TinySRAutoencoder"):
        raise ConversionError(
            f"VAE folder {folder} holds a {config.get('_class_name')!r}, not a tiny autoencoder "
            "(AutoencoderTiny config)."
        )
    weights = _read_weights(folder, "VAE")
    sides = {}
    for side in ("encoder", "decoder"):
        if f"{side}.layers.0.depthwise.weight" in weights:
            sides[f"{side}_conv"] = "separable"
        elif f"{side}.layers.0.weight" in weights:
            sides[f"{side}_conv"] = "standard"
        else:
            raise ConversionError(f"VAE folder {folder} has no {side}.layers.0 weights: not a TAESD-topology VAE.")
    known = TinySRAutoencoder.extract_init_dict(config)[0]
    try:
        vae = TinySRAutoencoder(**{**known, **sides}).eval()
    except (TypeError, ValueError) as error:
        raise ConversionError(f"VAE config {folder / 'config.json'} is not a tiny-VAE config: {error}") from None
    try:
        vae.load_state_dict({name: tensor.float() for name, tensor in weights.items()}, strict=True)
    except RuntimeError as error:
        raise ConversionError(f"VAE weights in {folder} do not fit its config: {error}") from error
    return vae


def convert_taef2(
    encoder_path: Union[str, os.PathLike], decoder_path: Union[str, os.PathLike]
) -> TinySRAutoencoder:
    """TAEF2 (madebyollin/taesd, MIT): the released `taef2_encoder.pth` / `taef2_decoder.pth` state dicts (keys are
    `nn.Sequential` indices) as a `TinySRAutoencoder` with `TinySRAutoencoder.taef2_config()`.

    The encoder's indices are ours; the decoder's start with a parameter-free `Clamp` module (our decoder applies the
    same `tanh(z / 3) * 3` in `forward`), so its indices shift by one.
    """
    vae = TinySRAutoencoder(**TinySRAutoencoder.taef2_config()).eval()
    state_dict = {}
    for side, path, shift in (("encoder", encoder_path, 0), ("decoder", decoder_path, 1)):
        path = _require(path, f"TAEF2 {side}")
        weights = _load_tensors(path, f"TAEF2 {side}")
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise ConversionError(f"TAEF2 {side} {path} does not hold a state dict of tensors.")
        for name, tensor in weights.items():
            index, _, rest = name.partition(".")
            if not index.isdigit():
                raise ConversionError(f"TAEF2 {side} {path}: unexpected key {name!r} (not an nn.Sequential index).")
            state_dict[f"{side}.layers.{int(index) - shift}.{rest}"] = tensor.float()
    try:
        vae.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ConversionError(f"TAEF2 weights do not fit the TAEF2 layout: {error}") from None
    return vae


def _load_sd3_component(cls: type, sd3_dir: Path, subfolder: str) -> torch.nn.Module:
    """diffusers' own loading, in float32; a config it cannot build from is one line naming the folder (an unreadable
    weights file is diffusers' `OSError`, which names the file)."""
    try:
        return cls.from_pretrained(sd3_dir, subfolder=subfolder, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        reason = _first_sentence(error)
        raise ConversionError(f"{sd3_dir / subfolder} is not a loadable {cls.__name__}: {reason}.") from None


# ----------------------------------------------------------------------------------------------------- conversions
def convert_tinysr(
    transformer_dir: Union[str, os.PathLike],
    vae_dir: Union[str, os.PathLike],
    lora_path: Union[str, os.PathLike],
    pool_embeds_path: Union[str, os.PathLike],
    *,
    keep_layers: Optional[Sequence[int]] = None,
    timestep: float = 1000.0,
    dtype: Optional[torch.dtype] = None,
    torch_dtype: Optional[torch.dtype] = None,
) -> TinySRPipeline:
    """The TinySR release as a [`TinySRPipeline`].

    Args:
        transformer_dir: The pruned transformer folder (`prune-12-merge-tinysr/transformer`).
        vae_dir: The tiny VAE folder (`vae/separable`).
        lora_path: The student LoRA (`tinysr/transformer.safetensors`).
        pool_embeds_path: The default prompt's pooled embedding (`pool_embeds.pt`).
        keep_layers: Blocks of the released transformer to keep (default: all; it is already pruned).
        timestep: The timestep at which the modulation is cached (the release runs at 1000).
        dtype: Dtype of the returned pipeline (default float32; the conversion itself runs in float32).
        torch_dtype: Deprecated name of `dtype`, as in diffusers (a FutureWarning).
    """
    dtype = _resolve_dtype(dtype, torch_dtype) or torch.float32  # diffusers' rule: both is an error
    transformer_dir = _require(transformer_dir, "Transformer folder", folder=True)
    vae_dir = _require(vae_dir, "VAE folder", folder=True)
    sd3 = _load_pruned_sd3(transformer_dir)
    pooled = load_embedding(pool_embeds_path, (sd3.config.pooled_projection_dim,), "Pooled prompt embedding")
    load_release_lora(sd3, lora_path, TINYSR_TRANSFORMER_TARGETS)
    merge_lora(sd3)  # before caching: the adaLN and time-embedding linears carry LoRA
    transformer = TinySRTransformer2DModel.from_sd3(sd3, keep_layers, timestep=timestep, pooled_projections=pooled)
    pipe = TinySRPipeline(transformer=transformer, vae=_load_release_vae(vae_dir))
    return pipe.to(dtype=dtype)


def convert_tsdsr(
    sd3_dir: Union[str, os.PathLike],
    transformer_lora: Union[str, os.PathLike],
    vae_lora: Union[str, os.PathLike],
    prompt_embeds: Union[str, os.PathLike],
    pool_embeds: Union[str, os.PathLike],
    *,
    merge: bool = True,
    dtype: Optional[torch.dtype] = None,
    torch_dtype: Optional[torch.dtype] = None,
) -> TSDSRPipeline:
    """The TSD-SR release as a [`TSDSRPipeline`] (SD3's transformer and VAE; no text encoders needed).

    Args:
        sd3_dir: The SD3-medium diffusers folder (`transformer/` and `vae/` are used).
        transformer_lora, vae_lora: The release LoRA files (`transformer.safetensors`, `vae.safetensors`).
        prompt_embeds, pool_embeds: The default prompt's embeddings (`prompt_embeds.pt`, `pool_embeds.pt`).
        merge: Merge the LoRAs into the weights (default). With `False` they stay active peft adapters named
            `"default"` (for further training); such a pipeline must be merged before `save_pretrained`.
        dtype: Dtype of the returned pipeline (default float32; the conversion itself runs in float32).
        torch_dtype: Deprecated name of `dtype`, as in diffusers (a FutureWarning).
    """
    dtype = _resolve_dtype(dtype, torch_dtype) or torch.float32  # diffusers' rule: both is an error
    sd3_dir = _require(sd3_dir, "SD3 folder", folder=True)
    for subfolder, class_names in (("transformer", ("SD3Transformer2DModel",)), ("vae", ("AutoencoderKL",))):
        found = _read_config(_require(sd3_dir / subfolder, f"SD3 {subfolder}", folder=True), subfolder)
        if found.get("_class_name") not in class_names:
            raise ConversionError(
                f"{sd3_dir / subfolder} holds a {found.get('_class_name')!r}, not an {class_names[0]}: is {sd3_dir} "
                "an SD3 diffusers folder?"
            )
    transformer = _load_sd3_component(SD3Transformer2DModel, sd3_dir, "transformer")
    vae = _load_sd3_component(AutoencoderKL, sd3_dir, "vae")
    config = transformer.config
    embeds = load_embedding(prompt_embeds, (None, config.joint_attention_dim), "Prompt embeddings")
    pooled = load_embedding(pool_embeds, (config.pooled_projection_dim,), "Pooled prompt embedding")
    load_release_lora(transformer, transformer_lora, TSDSR_TRANSFORMER_TARGETS)
    load_release_lora(vae, vae_lora, TSDSR_VAE_TARGETS)
    if merge:
        merge_lora(transformer)
        merge_lora(vae)
    pipe = TSDSRPipeline(
        transformer=transformer.eval(),
        vae=vae.eval(),
        prompt_embeddings=PromptEmbeddings.from_tensors(embeds, pooled),
    )
    return pipe.to(dtype=dtype)

