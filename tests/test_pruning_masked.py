"""The masked forward against diffusers' own SD3 forward (`skip_layers`) and an explicit reference loop."""

import pytest
import torch
from diffusers.hooks import HookRegistry

from pruning.masked import MaskedTransformer
from tinysr_diffusers import TinySRTransformer2DModel

from .pruning_models import conditioning, latents, tiny_sd3


def _diffusers(transformer, x, cond, skip=None):
    batch = x.shape[0]
    return transformer(
        x,
        encoder_hidden_states=cond["encoder_hidden_states"].expand(batch, -1, -1),
        pooled_projections=cond["pooled_projections"].reshape(1, -1).expand(batch, -1),
        timestep=torch.full((batch,), 1000.0),
        skip_layers=skip,
    ).sample


def _reference(transformer, x, cond, mask):
    """The masked forward written out: h = m * block(h) + (1 - m) * h on both streams (independent of the hooks)."""
    batch = x.shape[0]
    hidden = transformer.pos_embed(x)
    temb = transformer.time_text_embed(
        torch.full((batch,), 1000.0), cond["pooled_projections"].reshape(1, -1).expand(batch, -1)
    )
    context = transformer.context_embedder(cond["encoder_hidden_states"].expand(batch, -1, -1))
    for m, block in zip(mask, transformer.transformer_blocks):
        new_context, new_hidden = block(hidden, context, temb)
        hidden = m * new_hidden + (1 - m) * hidden
        context = None if new_context is None else m * new_context + (1 - m) * context
    hidden = transformer.proj_out(transformer.norm_out(hidden, temb))
    p, c = transformer.config.patch_size, transformer.out_channels
    h, w = x.shape[-2] // p, x.shape[-1] // p
    return torch.einsum("nhwpqc->nchpwq", hidden.reshape(batch, h, w, p, p, c)).reshape(batch, c, h * p, w * p)


@pytest.mark.parametrize("kind", ["sd3", "sd3.5"])
@pytest.mark.parametrize("tokens", [0, 3])
@pytest.mark.parametrize("keep", [[0, 2, 3, 5], [1, 4, 6, 7], [7], list(range(8))])
def test_hard_mask_equals_diffusers_skip_layers(kind, tokens, keep):
    transformer = tiny_sd3(kind)
    cond = conditioning(transformer, tokens)
    x = latents()
    mask = torch.zeros(8)
    mask[keep] = 1
    skip = [layer for layer in range(8) if layer not in keep]
    with torch.no_grad():
        expected = _diffusers(transformer, x, cond, skip)
        with MaskedTransformer(transformer, **cond) as masked:
            assert torch.equal(masked(x, mask), expected)
            assert torch.equal(masked.predict_clean(x, mask), x - expected)


@pytest.mark.parametrize("kind", ["sd3", "sd3.5"])
def test_soft_and_per_sample_masks(kind):
    transformer = tiny_sd3(kind)
    cond = conditioning(transformer)
    x = latents(batch=3)
    soft = torch.tensor([0.3, 1.0, 0.0, 0.7, 1.0, 0.5, 0.0, 0.9])
    per_sample = torch.tensor([[1, 0, 1, 0, 1, 1, 0, 0], [0.2, 1, 0, 1, 0, 0.5, 1, 1], [0, 0, 0, 0, 0, 0, 0, 1.0]])
    with torch.no_grad():
        reference = _reference(transformer, x, cond, soft)  # before the hooks are installed
    with torch.no_grad(), MaskedTransformer(transformer, **cond) as masked:
        assert torch.allclose(masked(x, soft), reference, atol=1e-6)
        rows = masked(x, per_sample)
        for i in range(3):
            assert torch.allclose(rows[i : i + 1], masked(x[i : i + 1], per_sample[i]), atol=1e-6)


def test_layers_masked_out_for_the_whole_batch_are_not_computed():
    transformer = tiny_sd3("sd3.5")
    calls = []
    for index, block in enumerate(transformer.transformer_blocks):
        block.attn.register_forward_pre_hook(lambda module, args, index=index: calls.append(index))
    mask = torch.tensor([[1, 0, 0, 1, 0, 0, 0, 0.5], [0, 0, 1, 1, 0, 0, 0, 0]])
    with torch.no_grad(), MaskedTransformer(transformer) as masked:
        masked(latents(), mask)
        assert calls == [0, 2, 3, 7]
        calls.clear()
        masked.skip_masked_layers = False
        masked(latents(), mask)
        assert calls == list(range(8))


def test_tinysr_student_masks_match_a_smaller_student():
    source = tiny_sd3("sd3.5")
    pooled = conditioning(source)["pooled_projections"]
    student = TinySRTransformer2DModel.from_sd3(source, [0, 1, 3, 4, 6, 7], pooled_projections=pooled)
    smaller = TinySRTransformer2DModel.from_sd3(source, [1, 4, 7], pooled_projections=pooled)
    x = latents()
    with torch.no_grad(), MaskedTransformer(student) as masked:
        assert torch.equal(masked(x, torch.tensor([0, 1, 0, 1, 0, 1.0])), smaller(x).sample)
        assert torch.equal(masked(x), student(x).sample)
        with pytest.raises(ValueError, match="no text conditioning"):
            MaskedTransformer(student, pooled_projections=pooled)


def test_gradient_checkpointing_and_backward():
    transformer = tiny_sd3("sd3")
    transformer.enable_gradient_checkpointing()
    transformer.train()
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1.0], requires_grad=True)
    with MaskedTransformer(transformer) as masked:
        masked(latents(), mask).pow(2).mean().backward()
    assert (
        mask.grad is not None and torch.all(mask.grad[[1, 4, 6]] == 0) and torch.all(mask.grad[[0, 2, 3, 5, 7]] != 0)
    )


def test_remove_restores_the_plain_model_and_errors_are_clear():
    transformer = tiny_sd3("sd3")
    cond = conditioning(transformer)
    x = latents()
    with torch.no_grad():
        before = _diffusers(transformer, x, cond)
        masked = MaskedTransformer(transformer, **cond)
        with pytest.raises(ValueError, match="has 8 layers"):
            masked(x, torch.ones(7))
        with pytest.raises(ValueError, match="3 rows for a batch of 2"):
            masked(x, torch.ones(3, 8))
        masked(x, torch.zeros(8))
        masked.remove()
        assert torch.equal(_diffusers(transformer, x, cond), before)
    assert all(
        HookRegistry.check_if_exists_or_initialize(b).get_hook("tinysr_layer_mask") is None
        for b in transformer.transformer_blocks
    )
    with pytest.raises(ValueError, match="pooled_projections"):
        MaskedTransformer(transformer, pooled_projections=torch.zeros(5))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        MaskedTransformer(transformer, encoder_hidden_states=torch.zeros(1, 3, 5))
    with pytest.raises(TypeError, match="SD3Transformer2DModel"):
        MaskedTransformer(torch.nn.Linear(2, 2))
