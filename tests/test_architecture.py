"""The paper's parameter and MAC figures, counted from the configs on the meta device."""

import pytest
import torch

from benchmarks.architecture import measure, to_markdown
from tinysr_diffusers.evaluation.profiling import count_parameters, module_macs, total_flops
from tinysr_diffusers.evaluation.reference_configs import sd3_medium_transformer, tinysr_transformer


def test_module_macs_counts_linear_and_conv_only():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 4 * 4, 5))
    x = torch.zeros(2, 3, 4, 4)
    expected = 2 * 8 * 16 * 3 * 9 + 2 * 128 * 5
    assert module_macs(lambda: model(x), model) == expected
    assert total_flops(lambda: model(x)) >= 2 * expected


def test_total_flops_counts_attention_on_cpu():
    q = torch.zeros(1, 2, 16, 8)
    flops = total_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert flops == 2 * (2 * 16 * 16 * 8) * 2  # scores and values, 2 FLOPs per MAC


def test_count_parameters_counts_shared_parameters_once():
    layer = torch.nn.Linear(3, 3)
    assert count_parameters([layer, layer]) == 12


def test_paper_figures_are_reproduced_within_one_percent():
    rows = {row.name: row for row in measure()}
    checked = 0
    for row in rows.values():
        if row.paper_params_m is not None:
            assert row.params / 1e6 == pytest.approx(row.paper_params_m, rel=0.01), row.name
            checked += 1
        if row.paper_macs_g is not None:
            assert row.macs / 1e9 == pytest.approx(row.paper_macs_g, rel=0.01), row.name
            checked += 1
    assert checked == 11
    assert "| TSD-SR total" in to_markdown(list(rows.values()))


def test_per_block_figures_of_sd3_medium():
    """SD3-medium's per-layer parameters: image stream 28,325,376, context stream 28,325,376, adaLN 28,329,984."""
    teacher = sd3_medium_transformer()
    block = teacher.transformer_blocks[0]
    student = tinysr_transformer(teacher, keep_layers=[0, 23])
    assert count_parameters(student.transformer_blocks[0]) == 28_325_376
    assert count_parameters([block.norm1.linear, block.norm1_context.linear]) == 28_329_984
    assert count_parameters(block) == 2 * 28_325_376 + 28_329_984
    assert teacher.transformer_blocks[23].context_pre_only
