"""Every method of the paper's Table 2 on one interface: valid masks of the requested size, with their evidence."""

import pytest
import torch

from pruning.data import as_latent_batch
from pruning.decision import PruningDecision
from pruning.masked import MaskedTransformer
from pruning.methods import BKSDM, METHODS, RandomMin, get_method, task_loss
from pruning.methods.base import evaluate

from .pruning_models import latents, planted_teacher, tiny_sd3


LEARNED_OPTIONS = dict(max_steps=6, lora_rank=2, log_every=3)


def _data(teacher, batches=2, batch=4):
    x = latents(batch=batches * batch, seed=5)
    with torch.no_grad(), MaskedTransformer(teacher) as masked:
        hr = masked.predict_clean(x)
    return [(x[i : i + batch], hr[i : i + batch]) for i in range(0, batches * batch, batch)]


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("kind", ["sd3", "sd3.5"])
def test_every_method_returns_a_valid_mask(name, kind):
    teacher = tiny_sd3(kind)
    options = {"tinysr": LEARNED_OPTIONS, "tinyfusion": LEARNED_OPTIONS, "random-min": {"num_candidates": 8}}.get(
        name, {}
    )
    method = get_method(name, **options)
    decision = method.decide(teacher, _data(teacher), keep=4)
    assert isinstance(decision, PruningDecision) and decision.method == name
    assert len(decision.keep_layers) == 4 and decision.num_layers == 8
    assert decision.keep_layers == sorted(set(decision.keep_layers))
    assert decision.mask.sum() == 4
    for values in (decision.scores, decision.probabilities):
        assert values is None or len(values) == 8
    assert all(not hasattr(b, "_diffusers_hook") or not b._diffusers_hook.hooks for b in teacher.transformer_blocks)


@pytest.mark.parametrize("name", ["flux-lite", "shortgpt", "sensitivity", "snapfusion"])
def test_score_methods_find_planted_identity_layers(name):
    """Identity layers change nothing: every scoring method must rank them last (score exactly 0 for the first three)."""
    teacher = planted_teacher("sd3.5", identity_layers=[1, 3, 4, 6])
    decision = get_method(name).decide(teacher, _data(teacher), keep=4)
    assert decision.keep_layers == [0, 2, 5, 7]
    if name != "snapfusion":
        assert all(abs(decision.scores[layer]) < 1e-6 for layer in [1, 3, 4, 6])


def test_random_min_keeps_its_best_candidate():
    teacher = tiny_sd3("sd3")
    data = _data(teacher)
    decision = RandomMin(num_candidates=12, seed=3).decide(teacher, data, keep=3)
    losses = [c["loss"] for c in decision.details["candidates"]]
    assert decision.details["best_loss"] == min(losses) and len(losses) == 12
    with torch.no_grad(), MaskedTransformer(teacher) as masked:
        assert evaluate(masked, [as_latent_batch(item) for item in data], decision.mask, task_loss) == pytest.approx(
            min(losses)
        )


def test_bk_sdm_pattern_and_a_masked_model_as_input():
    teacher = tiny_sd3("sd3", num_layers=24)
    with MaskedTransformer(teacher) as masked:
        decision = BKSDM().decide(masked, [], keep=12)
    assert decision.keep_layers == [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23]
    assert BKSDM().decide(teacher, [], keep=1).keep_layers == [0]


def test_clear_errors():
    teacher = tiny_sd3("sd3")
    with pytest.raises(ValueError, match="Unknown pruning method 'magic'"):
        get_method("magic")
    with pytest.raises(ValueError, match="Cannot keep 9 of 8"):
        get_method("shortgpt").decide(teacher, _data(teacher), keep=9)
    with pytest.raises(ValueError, match="impossible with blocks of 4"):
        get_method("tinysr", **LEARNED_OPTIONS).decide(teacher, _data(teacher), keep=3)
    with pytest.raises(ValueError, match="Unknown tinyfusion options"):
        get_method("tinyfusion", steps=3)
    with pytest.raises(ValueError, match="calibration data is empty"):
        get_method("sensitivity").decide(teacher, [], keep=4)
