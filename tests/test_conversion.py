"""Converting the TinySR and TSD-SR releases: outputs equal an independent computation from the unconverted pieces
(diffusers' SD3 model with the LoRA as an unmerged peft adapter, zero-length text context at t=1000), and bad pieces
are refused with a clear error."""

import re
import shutil
import warnings

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from diffusers import AutoencoderTiny, DiffusionPipeline
from tests.release_layouts import edit_config, edit_weights, make_tinysr_release, make_tsdsr_release
from tests.tiny_pipelines import JOINT_DIM, LATENT_CHANNELS, TINY_TAESD
from tinysr_diffusers import TinySRPipeline, TSDSRPipeline
from tinysr_diffusers.cli import main
from tinysr_diffusers.hub.conversion import ConversionError, convert_tinysr, convert_tsdsr


@pytest.fixture(scope="module")
def tinysr_release(tmp_path_factory):
    return make_tinysr_release(tmp_path_factory.mktemp("tinysr-release"))


@pytest.fixture(scope="module")
def tsdsr_release(tmp_path_factory):
    return make_tsdsr_release(tmp_path_factory.mktemp("tsdsr-release"))


@pytest.fixture(scope="module")
def tinysr_pipe(tinysr_release):
    return convert_tinysr(**tinysr_release.args())


def test_dtype_is_diffusers_name_and_torch_dtype_its_deprecated_alias(tinysr_release, tsdsr_release):
    """`dtype=` (diffusers 0.42's name) with no FutureWarning from our code paths (SD3's components are loaded
    inside); `torch_dtype=` still works, with diffusers' own FutureWarning; both at once is diffusers' error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert convert_tinysr(**tinysr_release.args(), dtype=torch.bfloat16).transformer.dtype == torch.bfloat16
        assert convert_tsdsr(**tsdsr_release.args(), dtype=torch.bfloat16).vae.dtype == torch.bfloat16
    with pytest.warns(FutureWarning, match="dtype"):
        assert convert_tinysr(**tinysr_release.args(), torch_dtype=torch.float16).vae.dtype == torch.float16
    with pytest.raises(ValueError, match="both `dtype` and `torch_dtype`"):
        convert_tinysr(**tinysr_release.args(), dtype=torch.float16, torch_dtype=torch.float16)


def _low_res(seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _release_velocity(release, latents: torch.Tensor) -> torch.Tensor:
    """The release recipe: SD3 with the LoRA as a peft adapter, zero-length text context, pooled embedding, t=1000."""
    batch = latents.shape[0]
    return release.sd3(
        latents,
        encoder_hidden_states=torch.zeros(batch, 0, JOINT_DIM),
        pooled_projections=release.pooled.expand(batch, -1),
        timestep=torch.full((batch,), 1000.0),
    ).sample


@torch.no_grad()
def test_tinysr_transformer_equals_sd3_with_peft_lora_at_t1000(tinysr_release, tinysr_pipe):
    release = tinysr_release
    latents = torch.randn(2, LATENT_CHANNELS, 24, 16, generator=torch.Generator().manual_seed(1))
    expected = _release_velocity(release, latents)
    torch.testing.assert_close(tinysr_pipe.transformer(latents).sample, expected, atol=2e-5, rtol=1e-4)
    release.sd3.disable_adapters()  # the LoRA matters: without it the output is far off
    try:
        without_lora = _release_velocity(release, latents)
    finally:
        release.sd3.enable_adapters()
    assert (without_lora - expected).abs().max() > 1e-2


def test_tinysr_layout(tinysr_release, tinysr_pipe):
    transformer, vae = tinysr_pipe.transformer, tinysr_pipe.vae
    assert isinstance(tinysr_pipe, TinySRPipeline)
    assert transformer.config.num_layers == 3 and list(transformer.config.source_layers) == [0, 1, 2]
    assert not any("lora" in name for name in transformer.state_dict())
    assert (vae.config.encoder_conv, vae.config.decoder_conv) == ("separable", "separable")
    assert vae.config.scaling_factor == 0.8  # carried over from the release config


@torch.no_grad()
def test_tinysr_pipeline_equals_the_release_recipe(tinysr_release, tinysr_pipe):
    """bicubic x4 -> encode * scaling -> z - v(z) with SD3 + peft LoRA at t=1000 -> the latents the pipeline gives."""
    release = tinysr_release
    low_res = _low_res()
    pixels = F.interpolate(low_res, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1
    z = release.vae.encode(pixels).latents * release.vae.config.scaling_factor
    expected = z - _release_velocity(release, z)
    actual = tinysr_pipe(low_res, output_type="latent", tile_size=None, color_fix=None).images
    torch.testing.assert_close(actual, expected, atol=5e-5, rtol=1e-4)


@torch.no_grad()
def test_standard_conv_tiny_vae_maps_to_autoencoder_tiny(tmp_path):
    """A TAESD-style folder saved by diffusers' AutoencoderTiny converts to a TinySRAutoencoder with equal outputs."""
    from tinysr_diffusers.hub.conversion import _load_release_vae

    torch.manual_seed(0)
    reference = AutoencoderTiny(**TINY_TAESD, scaling_factor=1.5305).eval()
    reference.save_pretrained(tmp_path / "taesd3")
    vae = _load_release_vae(tmp_path / "taesd3")
    assert (vae.config.encoder_conv, vae.config.decoder_conv) == ("standard", "standard")
    images = _low_res(size=32) * 2 - 1
    torch.testing.assert_close(vae.encode(images).latents, reference.encode(images).latents)
    latents = torch.randn(1, LATENT_CHANNELS, 4, 4)
    torch.testing.assert_close(vae.decode(latents).sample, reference.decode(latents).sample)


@torch.no_grad()
@pytest.mark.parametrize("merge", [True, False])
def test_tsdsr_equals_sd3_and_vae_with_peft_loras(tsdsr_release, merge):
    release = tsdsr_release
    pipe = convert_tsdsr(**release.args(), merge=merge)
    assert isinstance(pipe, TSDSRPipeline)
    assert any("lora" in name for name in pipe.transformer.state_dict()) is not merge
    low_res = _low_res(size=8)
    pixels = F.interpolate(low_res, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1
    posterior = release.vae.encode(pixels).latent_dist
    torch.testing.assert_close(pipe.vae.encode(pixels).latent_dist.mean, posterior.mean, atol=1e-5, rtol=1e-4)
    z = posterior.sample(torch.Generator().manual_seed(3)) * release.vae.config.scaling_factor
    velocity = release.transformer(
        z,
        encoder_hidden_states=release.embeds[None],
        pooled_projections=release.pooled[None],
        timestep=torch.tensor([1000.0]),
    ).sample
    actual = pipe(
        low_res, output_type="latent", tile_size=None, color_fix=None, generator=torch.Generator().manual_seed(3)
    ).images
    torch.testing.assert_close(actual, z - velocity, atol=5e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------- bad pieces
def _copy(release_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(release_dir, target)
    return target


def test_missing_pieces_are_named(tinysr_release, tmp_path):
    args = tinysr_release.args()
    with pytest.raises(ConversionError, match="LoRA file not found"):
        convert_tinysr(**{**args, "lora_path": tmp_path / "nope.safetensors"})
    with pytest.raises(ConversionError, match="VAE folder not found"):
        convert_tinysr(**{**args, "vae_dir": tmp_path / "nope"})
    with pytest.raises(ConversionError, match="Pooled prompt embedding not found"):
        convert_tinysr(**{**args, "pool_embeds_path": tmp_path / "nope.pt"})


def test_missing_student_weight_is_an_error(tinysr_release, tmp_path):
    folder = _copy(tinysr_release.transformer_dir, tmp_path)
    edit_weights(folder, lambda w: {k: v for k, v in w.items() if k != "transformer_blocks.1.norm1.linear.weight"})
    with pytest.raises(ConversionError, match=r"lacks 1 weights the student needs.*transformer_blocks\.1\.norm1"):
        convert_tinysr(**{**tinysr_release.args(), "transformer_dir": folder})


def test_lora_of_another_model_is_refused(tinysr_release, tsdsr_release):
    with pytest.raises(ConversionError, match="does not match SD3Transformer2DModel"):
        convert_tinysr(**{**tinysr_release.args(), "lora_path": tsdsr_release.transformer_lora})


def test_lora_with_a_wrong_shape_is_refused(tinysr_release, tmp_path):
    lora = safetensors.torch.load_file(tinysr_release.lora_path)
    name = next(name for name in lora if name.endswith("attn.to_q.lora_B.weight"))
    lora[name] = torch.zeros(lora[name].shape[0] + 1, lora[name].shape[1])
    safetensors.torch.save_file(lora, tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError, match="has shape"):
        convert_tinysr(**{**tinysr_release.args(), "lora_path": tmp_path / "bad.safetensors"})


def test_wrong_embedding_shapes_are_refused(tinysr_release, tsdsr_release, tmp_path):
    torch.save(torch.zeros(1, 7), tmp_path / "pool.pt")
    with pytest.raises(ConversionError, match=r"has shape \(7,\); this transformer needs \(24,\)"):
        convert_tinysr(**{**tinysr_release.args(), "pool_embeds_path": tmp_path / "pool.pt"})
    torch.save(torch.zeros(1, 5, JOINT_DIM + 1), tmp_path / "prompt.pt")
    with pytest.raises(ConversionError, match=r"Prompt embeddings .* needs \('any', 32\)"):
        convert_tsdsr(**{**tsdsr_release.args(), "prompt_embeds": tmp_path / "prompt.pt"})


def test_folders_of_another_model_are_refused(tinysr_release, tsdsr_release, tmp_path):
    with pytest.raises(ConversionError, match="not an SD3-config transformer"):
        convert_tinysr(**{**tinysr_release.args(), "transformer_dir": tinysr_release.vae_dir})
    with pytest.raises(ConversionError, match="not a tiny autoencoder"):
        convert_tinysr(**{**tinysr_release.args(), "vae_dir": tsdsr_release.sd3_dir / "vae"})
    with pytest.raises(ConversionError, match="not an SD3Transformer2DModel"):
        convert_tsdsr(**{**tsdsr_release.args(), "sd3_dir": _fake_sd3(tinysr_release, tmp_path)})


def _fake_sd3(release, tmp_path):
    """An SD3-looking folder whose `transformer/` is a tiny VAE."""
    folder = tmp_path / "not-sd3"
    shutil.copytree(release.vae_dir, folder / "transformer")
    shutil.copytree(release.vae_dir, folder / "vae")
    return folder


def test_unexpected_weights_mean_another_model(tinysr_release, tmp_path):
    folder = _copy(tinysr_release.transformer_dir, tmp_path)
    edit_config(folder, num_layers=2)  # a 3-layer folder read with a 2-layer config
    with pytest.raises(ConversionError, match="holds 28 weights an SD3 transformer with this config does not have"):
        convert_tinysr(**{**tinysr_release.args(), "transformer_dir": folder})


def test_position_embedding_that_is_not_sd3s_is_refused(tinysr_release, tmp_path):
    folder = _copy(tinysr_release.transformer_dir, tmp_path)
    edit_weights(folder, lambda w: {**w, "pos_embed.pos_embed": torch.randn_like(w["pos_embed.pos_embed"])})
    with pytest.raises(ConversionError, match="not the centre crop"):
        convert_tinysr(**{**tinysr_release.args(), "transformer_dir": folder})


# -------------------------------------------------------------------------------------------------------------- CLI
def _tinysr_argv(release, output):
    return [
        "convert", "tinysr", "--transformer", str(release.transformer_dir), "--vae", str(release.vae_dir),
        "--lora", str(release.lora_path), "--pool-embeds", str(release.pool_embeds_path), "-o", str(output),
    ]  # fmt: skip


@torch.no_grad()
def test_cli_convert_tinysr_writes_a_loadable_pipeline(tinysr_release, tinysr_pipe, tmp_path, capsys):
    output = tmp_path / "tinysr-pipeline"
    assert main(_tinysr_argv(tinysr_release, output)) == 0
    assert "[2/2] Saving TinySRPipeline" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tinysr-pipeline"]  # no temporary folder left
    loaded = DiffusionPipeline.from_pretrained(output, trust_remote_code=True)
    assert isinstance(loaded, TinySRPipeline)
    low_res = _low_res()
    call = dict(output_type="latent", tile_size=None, color_fix=None)
    torch.testing.assert_close(loaded(low_res, **call).images, tinysr_pipe(low_res, **call).images)


def test_cli_convert_never_overwrites_without_the_flag(tinysr_release, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert main(_tinysr_argv(tinysr_release, output)) == 2
    assert "already exists" in capsys.readouterr().err and (output / "keep.txt").read_text() == "mine"
    assert main([*_tinysr_argv(tinysr_release, output), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert not (output / "keep.txt").exists() and (output / "model_index.json").is_file()
    weights = safetensors.torch.load_file(output / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_cli_convert_tsdsr_and_a_bad_piece(tsdsr_release, tmp_path, capsys):
    release = tsdsr_release
    argv = [
        "convert", "tsdsr", "--sd3", str(release.sd3_dir), "--transformer-lora", str(release.transformer_lora),
        "--vae-lora", str(release.vae_lora), "--prompt-embeds", str(release.prompt_embeds),
        "--pool-embeds", str(release.pool_embeds), "-o", str(tmp_path / "tsdsr"),
    ]  # fmt: skip
    assert main(argv) == 0
    assert isinstance(TSDSRPipeline.from_pretrained(tmp_path / "tsdsr"), TSDSRPipeline)
    bad = [*argv[:-1], str(tmp_path / "second")]
    bad[bad.index("--vae-lora") + 1] = str(release.transformer_lora)  # the transformer's LoRA given for the VAE
    assert main(bad) == 1
    error = capsys.readouterr().err
    assert "error: ConversionError: LoRA file" in error and "does not match AutoencoderKL" in error
    assert not (tmp_path / "second").exists()


def _truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


def _broken_piece(release, tmp_path, broken: str) -> tuple[str, str, str]:
    """(option, path given for it, what the error says about that file) for one damaged piece of the release."""
    if broken == "truncated LoRA":
        lora = tmp_path / "transformer.safetensors"
        shutil.copy(release.lora_path, lora)
        _truncate(lora, lora.stat().st_size // 2)
        return "--lora", str(lora), f"LoRA file {lora} is not a safetensors file (truncated or corrupt"
    if broken == ".pt given as LoRA":
        return "--lora", str(release.pool_embeds_path), "is not a safetensors file (it is a torch.save (pickle) file)"
    if broken == "corrupt weights":
        folder = _copy(release.transformer_dir, tmp_path)
        _truncate(folder / "diffusion_pytorch_model.safetensors", 100)
        weights = folder / "diffusion_pytorch_model.safetensors"
        return "--transformer", str(folder), f"Transformer weights {weights} is not a safetensors file"
    if broken == "malformed config.json":
        folder = _copy(release.vae_dir, tmp_path)
        (folder / "config.json").write_text('{"_class_name": "AutoencoderTiny",')
        return "--vae", str(folder), f"VAE config {folder / 'config.json'} is not valid JSON"
    embedding = tmp_path / "pool_embeds.pt"  # "corrupt embedding": random bytes, not a torch.save file
    embedding.write_bytes(bytes(range(256)) * 4)
    return "--pool-embeds", str(embedding), f"Pooled prompt embedding {embedding} is corrupt"


@pytest.mark.parametrize(
    "broken", ["truncated LoRA", ".pt given as LoRA", "corrupt weights", "malformed config.json", "corrupt embedding"]
)
def test_cli_convert_names_a_damaged_file_in_one_line(tinysr_release, tmp_path, capsys, broken):
    option, path, expected = _broken_piece(tinysr_release, tmp_path, broken)
    argv = _tinysr_argv(tinysr_release, tmp_path / "out")
    argv[argv.index(option) + 1] = path
    assert main(argv) == 1
    error = capsys.readouterr().err
    lines = [line for line in error.splitlines() if not line.startswith("[1/2]")]
    assert len(lines) == 1 and lines[0].startswith("error: ConversionError: "), error
    assert expected in lines[0]
    assert "weights_only" not in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_a_config_that_diffusers_cannot_build_from_is_named(tsdsr_release, tmp_path):
    sd3 = _copy(tsdsr_release.sd3_dir, tmp_path)
    edit_config(sd3 / "transformer", num_layers="four")
    with pytest.raises(ConversionError, match=re.escape(f"{sd3 / 'transformer'} is not a loadable SD3Transformer2D")):
        convert_tsdsr(**{**tsdsr_release.args(), "sd3_dir": sd3})
