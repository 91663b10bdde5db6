"""TinySRTransformer2DModel against diffusers' own SD3 transformer."""

import pytest
import torch
from peft import LoraConfig

from tinysr_diffusers import TinySRTransformer2DModel

from .tiny_models import TINY_CONFIGS, tiny_sd3


KEEP_SETS = [None, [0, 2], [1, 3], [3], [0, 1, 2], [2, 0]]


def sd3_reference(teacher, latents, pooled, keep):
    """The teacher at t=1000 with a zero-length text context and the pruned layers skipped (diffusers itself)."""
    batch = latents.shape[0]
    skip = [] if keep is None else [i for i in range(teacher.config.num_layers) if i not in keep]
    context = torch.zeros(batch, 0, teacher.config.joint_attention_dim, dtype=latents.dtype)
    return teacher(
        latents,
        encoder_hidden_states=context,
        pooled_projections=pooled.expand(batch, -1),
        timestep=torch.full((batch,), 1000.0),
        skip_layers=skip,
    ).sample


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
@pytest.mark.parametrize("keep", KEEP_SETS)
@torch.no_grad()
def test_student_equals_sd3_with_skipped_layers(kind, keep):
    teacher = tiny_sd3(kind)
    pooled = torch.randn(1, teacher.config.pooled_projection_dim)
    latents = torch.randn(2, 4, 12, 20)  # not square, smaller than sample_size
    reference = sd3_reference(teacher, latents, pooled, keep)

    student = TinySRTransformer2DModel.from_sd3(teacher, keep, pooled_projections=pooled)
    expected_layers = sorted(keep) if keep is not None else list(range(4))
    assert list(student.config.source_layers) == expected_layers
    torch.testing.assert_close(student(latents).sample, reference, rtol=1e-5, atol=1e-5)

    student.fold_modulation()
    assert student.config.modulation_folded
    assert not any(name.endswith("modulation") for name in student.state_dict())
    torch.testing.assert_close(student(latents).sample, reference, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_student_depends_on_timestep_and_pooled_embedding():
    teacher = tiny_sd3("sd3")
    latents = torch.randn(1, 4, 8, 8)
    pooled = torch.randn(teacher.config.pooled_projection_dim)
    base = TinySRTransformer2DModel.from_sd3(teacher, [0, 1], pooled_projections=pooled)(latents).sample
    other_pooled = TinySRTransformer2DModel.from_sd3(teacher, [0, 1], pooled_projections=-pooled)(latents).sample
    other_time = TinySRTransformer2DModel.from_sd3(teacher, [0, 1], 500.0, pooled)(latents).sample
    assert not torch.allclose(base, other_pooled)
    assert not torch.allclose(base, other_time)


def test_student_is_independent_of_the_teacher_weights():
    teacher = tiny_sd3("sd3")
    student = TinySRTransformer2DModel.from_sd3(teacher, [1, 2], pooled_projections=torch.zeros(12))
    before = student.transformer_blocks[0].attn.to_q.weight.clone()
    with torch.no_grad():
        teacher.transformer_blocks[1].attn.to_q.weight.add_(1.0)
    torch.testing.assert_close(student.transformer_blocks[0].attn.to_q.weight, before)


def test_sd35_dual_attention_layers_are_mapped_to_student_indices():
    teacher = tiny_sd3("sd35")  # dual attention in source layers 0 and 1
    student = TinySRTransformer2DModel.from_sd3(teacher, [1, 3], pooled_projections=torch.zeros(12))
    assert list(student.config.dual_attention_layers) == [0]
    assert student.transformer_blocks[0].attn2 is not None and student.transformer_blocks[1].attn2 is None
    assert student.config.qk_norm == "rms_norm"


def test_from_sd3_on_meta_device():
    with torch.device("meta"):
        teacher = tiny_sd3("sd35")
    student = TinySRTransformer2DModel.from_sd3(teacher, [0, 3])
    assert student.device.type == "meta"
    out = student(torch.empty(1, 4, 8, 8, device="meta")).sample
    assert out.shape == (1, 4, 8, 8) and out.device.type == "meta"


def test_student_keeps_module_names_of_diffusers():
    teacher = tiny_sd3("sd3")
    student = TinySRTransformer2DModel.from_sd3(teacher, [0, 1], pooled_projections=torch.zeros(12))
    names = set(student.state_dict())
    for suffix in ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight", "attn.to_out.0.weight",
                   "ff.net.0.proj.weight", "ff.net.2.weight"):
        assert f"transformer_blocks.0.{suffix}" in names
        torch.testing.assert_close(
            student.state_dict()[f"transformer_blocks.1.{suffix}"], teacher.state_dict()[f"transformer_blocks.1.{suffix}"]
        )
    assert not any("context" in name or "add_" in name or "time_text" in name for name in names)


@pytest.mark.parametrize("fold", [False, True])
@torch.no_grad()
def test_save_and_load_round_trip(tmp_path, fold):
    teacher = tiny_sd3("sd35")
    student = TinySRTransformer2DModel.from_sd3(teacher, [0, 2, 3], pooled_projections=torch.randn(12))
    if fold:
        student.fold_modulation()
    latents = torch.randn(1, 4, 10, 14)
    expected = student(latents).sample
    student.save_pretrained(tmp_path)
    loaded = TinySRTransformer2DModel.from_pretrained(tmp_path)
    assert loaded.config.modulation_folded == fold
    assert torch.equal(loaded(latents).sample, expected)


@torch.no_grad()
def test_bfloat16_student_follows_teacher_dtype():
    teacher = tiny_sd3("sd3")
    pooled = torch.randn(1, 12)
    latents = torch.randn(1, 4, 8, 8)
    reference = sd3_reference(teacher, latents, pooled, [0, 3])
    student = TinySRTransformer2DModel.from_sd3(teacher.to(torch.bfloat16), [0, 3], pooled_projections=pooled)
    assert student.dtype == torch.bfloat16
    output = student(latents.bfloat16()).sample
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), reference, rtol=0.05, atol=0.05)


def _randomize_lora_(model):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


@torch.no_grad()
def test_lora_adapter_on_student_merges_and_then_folds():
    student = TinySRTransformer2DModel.from_sd3(tiny_sd3("sd3"), [0, 2], pooled_projections=torch.randn(12))
    latents = torch.randn(1, 4, 8, 8)
    base = student(latents).sample
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_out"]
    student.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    lora_layers = [name for name, _ in student.named_modules() if name.endswith("lora_A")]
    assert len(lora_layers) == 2 * 6 + 1
    _randomize_lora_(student)
    adapted = student(latents).sample
    assert not torch.allclose(adapted, base)

    with pytest.raises(ValueError, match="LoRA"):
        student.fold_modulation()
    student.fuse_lora()
    student.unload_lora()
    assert not any("lora" in name for name in student.state_dict())
    torch.testing.assert_close(student(latents).sample, adapted, rtol=1e-5, atol=1e-5)
    student.fold_modulation()
    torch.testing.assert_close(student(latents).sample, adapted, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_gives_same_gradients():
    student = TinySRTransformer2DModel.from_sd3(tiny_sd3("sd3"), [0, 1, 2], pooled_projections=torch.randn(12))
    student.train()
    latents = torch.randn(1, 4, 8, 8)

    def gradients():
        student.zero_grad()
        student(latents).sample.square().mean().backward()
        return [p.grad.clone() for p in student.parameters()]

    plain = gradients()
    student.enable_gradient_checkpointing()
    for expected, actual in zip(plain, gradients()):
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(qk_norm="batch_norm"), "qk_norm"),
        (dict(num_layers=0), "num_layers"),
        (dict(num_layers=2, dual_attention_layers=(2,)), "dual_attention_layers"),
        (dict(num_layers=2, source_layers=(0,)), "source_layers"),
        (dict(patch_size=0), "patch_size"),
    ],
)
def test_bad_config_values_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        TinySRTransformer2DModel(attention_head_dim=8, num_attention_heads=2, **config)


def test_bad_from_sd3_arguments_are_named():
    teacher = tiny_sd3("sd3")
    pooled = torch.zeros(12)
    with pytest.raises(ValueError, match="out of range"):
        TinySRTransformer2DModel.from_sd3(teacher, [0, 4], pooled_projections=pooled)
    with pytest.raises(ValueError, match="duplicates"):
        TinySRTransformer2DModel.from_sd3(teacher, [1, 1], pooled_projections=pooled)
    with pytest.raises(ValueError, match="empty"):
        TinySRTransformer2DModel.from_sd3(teacher, [], pooled_projections=pooled)
    with pytest.raises(ValueError, match=r"must be layer indices \(integers\), got \[0\.5, 1\]"):
        TinySRTransformer2DModel.from_sd3(teacher, [0.5, 1], pooled_projections=pooled)  # not silently layer 0
    with pytest.raises(ValueError, match="pooled_projections"):
        TinySRTransformer2DModel.from_sd3(teacher, [0], pooled_projections=torch.zeros(5))
    with pytest.raises(TypeError, match="SD3Transformer2DModel"):
        TinySRTransformer2DModel.from_sd3(torch.nn.Linear(2, 2))
    teacher.add_adapter(LoraConfig(r=2, target_modules=["norm1.linear"]))
    with pytest.raises(ValueError, match="merge"):
        TinySRTransformer2DModel.from_sd3(teacher, [0], pooled_projections=pooled)


def test_bad_latents_are_named():
    student = TinySRTransformer2DModel.from_sd3(tiny_sd3("sd3"), [0], pooled_projections=torch.zeros(12))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        student(torch.randn(1, 4, 9, 8))
    with pytest.raises(ValueError, match="at most 48"):
        student(torch.randn(1, 4, 50, 8))
    with pytest.raises(ValueError, match="shape"):
        student(torch.randn(1, 3, 8, 8))
