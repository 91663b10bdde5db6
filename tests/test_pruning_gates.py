"""Local gates (TinyFusion) and inter-block gates (TinySR): sampling, gradients, conservation, decisions."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from pruning.inter_block import (
    InterBlockGates,
    apply_operators,
    corrosion,
    expansion,
    neighbour_table,
    next_patterns,
)
from pruning.local_gates import LinearSchedule, LocalGates
from pruning.masked import MaskedTransformer
from pruning.search_space import SearchSpace, local_patterns

from .pruning_models import conditioning, latents, tiny_sd3


SPACE = SearchSpace.from_keep(8, 4, 4)


def test_schedule_endpoints():
    schedule = LinearSchedule(4.0, 0.1, 101)
    assert schedule(0) == 4.0 and schedule(100) == pytest.approx(0.1) and schedule(50) == pytest.approx(2.05)
    assert schedule(500) == pytest.approx(0.1)
    assert LinearSchedule(100.0, 100.0, 1)(0) == 100.0


def test_relaxed_set_operations_are_exact_on_binary_masks():
    for a, b in itertools.product(itertools.product((0.0, 1.0), repeat=4), repeat=2):
        a, b = torch.tensor(a), torch.tensor(b)
        assert torch.equal(expansion(a, b), torch.maximum(a, b))
        assert torch.equal(corrosion(a, b), torch.minimum(a, b))


@pytest.mark.parametrize("block, keep, delta", [(4, 2, 1), (4, 1, 1), (6, 3, 2), (5, 2, 1)])
def test_every_operator_conserves_the_pair_total(block, keep, delta):
    patterns = local_patterns(block, keep)
    neighbours = neighbour_table(patterns, delta)
    combos = [
        (a, b, int(na), int(nb))
        for a, b in itertools.product(range(len(patterns)), repeat=2)
        for na, nb in itertools.product(neighbours[a].nonzero().flatten(), neighbours[b].nonzero().flatten())
    ]
    index = torch.tensor(combos).T  # every (cur_a, cur_b, next_a, next_b), batched along dim 1
    current, candidate = patterns[index[:2]], patterns[index[2:]]
    expected = [(keep - delta, keep + delta), (keep, keep), (keep + delta, keep - delta)]
    for op in range(3):
        mask = apply_operators(current, candidate, F.one_hot(torch.tensor([op]), 3))
        assert torch.all((mask == 0) | (mask == 1))
        sums = mask.sum(-1)
        assert torch.all(sums[0] == expected[op][0]) and torch.all(sums[1] == expected[op][1])
    soft = apply_operators(current, candidate, torch.softmax(torch.randn(1, 3), -1))
    assert torch.allclose(soft.sum((0, 2)), torch.tensor(2.0 * keep))  # conserved for any operator weights


def test_sampled_masks_keep_the_layout():
    space = SearchSpace.from_keep(24, 12, 4)
    gates = InterBlockGates(space)
    with torch.no_grad():
        gates.local.logits.normal_(std=0.02)
        gates.pair_logits.normal_(std=0.02)
    local = LocalGates(space)
    for _ in range(50):
        mask = gates(tau=1.0, scale=100.0).reshape(space.num_pairs, 2, 4)
        assert torch.all(mask.sum((1, 2)) == 4)
        assert set(mask.sum(-1).flatten().tolist()) <= {1.0, 2.0, 3.0}
        assert torch.all(local(1.0, 100.0).reshape(-1, 4).sum(-1) == 2)


def test_odd_block_count_keeps_the_last_block_static():
    gates = InterBlockGates(SearchSpace.from_keep(12, 6, 4))
    for _ in range(20):
        assert gates(1.0, 1.0)[8:].sum() == 2


@pytest.mark.parametrize("gates_type", [LocalGates, InterBlockGates])
@pytest.mark.parametrize("skip", [True, False])
def test_gradients_reach_every_gate(gates_type, skip):
    torch.manual_seed(0)
    transformer = tiny_sd3("sd3.5")
    gates = gates_type(SPACE)
    x, target = latents(seed=3), latents(seed=4)
    with MaskedTransformer(transformer, **conditioning(transformer), skip_masked_layers=skip) as masked:
        for _ in range(3):  # a few samples: one sample only reaches the gates of what it sampled through
            loss = F.mse_loss(masked.predict_clean(x, gates(tau=1.0, scale=1.0)), target)
            loss.backward()
    for name, parameter in gates.named_parameters():
        assert parameter.grad is not None, name
        assert torch.all(parameter.grad.abs().sum(-1) > 0), f"{name}: a block or pair received no gradient"


def test_decisions_are_deterministic_and_break_ties_by_lowest_index():
    space = SearchSpace.from_keep(8, 4, 4)
    local, inter = LocalGates(space), InterBlockGates(space)
    assert local.decide().tolist() == [1, 1, 0, 0, 1, 1, 0, 0]  # all logits equal: first pattern, (0, 1)
    # untrained gates: equal pair logits keep T_0, so the decision is the static 2:4 mask of the local gates
    assert inter.decide().tolist() == [1, 1, 0, 0, 1, 1, 0, 0]
    assert inter.operators().tolist() == [1]
    with torch.no_grad():
        inter.ema_pair_logits.copy_(torch.tensor([[0.7, 0.7, 0.2]]))  # T_-1 ties T_0: still T_0
    assert inter.operators().tolist() == [1]
    with torch.no_grad():
        inter.ema_pair_logits.copy_(torch.tensor([[0.7, 0.1, 0.7]]))  # T_-1 ties T_+1 without T_0: the lowest
    assert inter.operators().tolist() == [0]
    # T_-1: next of (0,1) among (0,2),(0,3),(1,2),(1,3) -> (0,2) by lowest index: C = {0}, E = {0,1,2}
    assert inter.decide().tolist() == [1, 0, 0, 0, 1, 1, 1, 0]
    with torch.no_grad():
        inter.local.ema_logits.normal_()
        inter.ema_pair_logits.normal_()
    decisions = []
    for seed in range(5):
        torch.manual_seed(seed)
        inter(1.0, 1.0)  # sampling with random ties must not touch the decision
        decisions.append(inter.decide().tolist())
    assert all(d == decisions[0] for d in decisions) and sum(decisions[0]) == 4


def test_decision_follows_the_moving_average():
    gates = InterBlockGates(SPACE, ema_decay=0.5)
    with torch.no_grad():
        gates.local.logits[:, 5] = 1.0  # pattern (2, 3) in both blocks
        gates.pair_logits[:, 1] = 1.0  # T_0
    assert gates.decide(ema=False).tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert gates.decide(ema=True).tolist() != [0, 0, 1, 1, 0, 0, 1, 1]
    gates.update_ema()
    assert torch.allclose(gates.local.ema_logits[:, 5], torch.tensor(0.5))
    assert gates.decide(ema=True).tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    details = gates.decision_details(scale=1.0)
    assert details["operators"] == ["T0"] and details["patterns"] == [5, 5]


@pytest.mark.parametrize("gates_type", [LocalGates, InterBlockGates])
def test_keep_probabilities_match_sampling(gates_type):
    torch.manual_seed(0)
    gates = gates_type(SearchSpace.from_keep(8, 4, 4))
    with torch.no_grad():
        for parameter in gates.parameters():
            parameter.normal_()  # distinct logits: `next` is the same in training and in the exact marginal
    expected = gates.keep_probabilities(scale=1.0, ema=False)
    samples = torch.stack([gates(tau=1.0, scale=1.0).detach() for _ in range(1500)])
    assert torch.allclose(samples.mean(0), expected, atol=0.05)
    assert expected.sum().item() == pytest.approx(4.0, abs=1e-5)


def test_confidence_is_the_scaled_softmax_of_the_decided_pattern():
    """Logits log(w) give softmax(logits * scale) = w**scale / sum(w**scale): the confidences are known fractions."""
    gates = InterBlockGates(SPACE, ema_decay=0.5)
    weights = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 4.0], [3.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    with torch.no_grad():
        gates.local.logits.copy_(weights.log())
        gates.pair_logits.copy_(torch.tensor([[1.0, 2.0, 1.0]]).log())
    local = gates.local
    assert torch.allclose(local.confidence(1.0, ema=False), torch.tensor([4 / 10, 3 / 8]))
    assert torch.allclose(local.confidence(2.0, ema=False), torch.tensor([16 / 24, 9 / 14]))
    assert torch.allclose(local.confidence(2.0), torch.tensor([1 / 6, 1 / 6]))  # the EMA has not moved yet
    gates.update_ema()  # EMA = 0.5 * log(w): at scale 2, softmax gives w / sum(w) again
    details = gates.decision_details(scale=2.0)
    assert details["patterns"] == [5, 0]
    assert details["confidence"] == pytest.approx([4 / 10, 3 / 8])
    assert details["operators"] == ["T0"] and details["operator_confidence"] == pytest.approx([2 / 4])


def test_next_rules_disagree_where_the_paper_text_and_the_code_do():
    """cur = (0, 1); pattern probabilities (.25, .30, 0, .20, .25, 0) over (0,1) (0,2) (0,3) (1,2) (1,3) (2,3): the
    authors' code takes the best overlapping pattern (0, 2) (corrosion keeps layer 0); the paper's marginal rule
    keeps layer 1 (marginal .70 > .55) and adds layer 2 (.50 > .25): (1, 2)."""
    patterns = local_patterns(4, 2)
    probabilities = torch.tensor([[0.25, 0.30, 1e-9, 0.20, 0.25, 1e-9]])
    logits = probabilities.log()  # softmax(logits * 1) = the probabilities
    neighbours, current = neighbour_table(patterns, 1), torch.tensor([0])
    by_pattern = next_patterns(logits, current, neighbours, False, "pattern")
    by_marginal = next_patterns(logits, current, neighbours, False, "marginal", patterns, scale=1.0)
    assert patterns[by_pattern[0]].tolist() == [1, 0, 1, 0]
    assert patterns[by_marginal[0]].tolist() == [0, 1, 1, 0]
    assert corrosion(patterns[0], patterns[by_marginal[0]]).tolist() == [0, 1, 0, 0]
    # saturated marginals (scale 100): inside cur, layer 0 (marginal 1 - 2e-13) beats layer 1 (1 - 2e-9); outside it,
    # layer 3 (2e-9) beats layer 2 (9e-14). In float32 both pairs tie and would fall back to index order.
    saturated = torch.tensor([[0.0, -0.3, -0.2, -1.0, -1.0, -1.0]])
    chosen = next_patterns(saturated, current, neighbours, False, "marginal", patterns, scale=100.0)
    assert patterns[chosen[0]].tolist() == [1, 0, 0, 1]
    draws = {tuple(patterns[next_patterns(saturated, current, neighbours, True, "marginal", patterns, 100.0)[0]]
                   .tolist()) for _ in range(30)}
    assert draws == {(1, 0, 0, 1)}  # no real tie: random tie-breaking must not change it
    with pytest.raises(ValueError, match="next rule"):
        InterBlockGates(SPACE, next_rule="magic")


@pytest.mark.parametrize("gates_type", [LocalGates, InterBlockGates])
def test_per_sample_masks_keep_the_layout_and_differ(gates_type):
    torch.manual_seed(0)
    space = SearchSpace.from_keep(16, 8, 4)
    gates = gates_type(space)
    masks = gates(tau=1.0, scale=1.0, num_samples=32)
    assert masks.shape == (32, 16) and torch.all((masks == 0) | (masks == 1))
    assert torch.all(masks.reshape(32, space.num_pairs, 8).sum(-1) == 4)  # every pair keeps 4
    assert len({tuple(row.tolist()) for row in masks}) > 1  # independent draws
    if gates_type is LocalGates:
        assert torch.all(masks.reshape(32, -1, 4).sum(-1) == 2)
    masks.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.parameters())
