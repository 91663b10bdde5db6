"""Export: renumbered SD3 checkpoints that load cleanly and equal the masked model; TinySR students; Hub upload."""

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel
from huggingface_hub import ModelCard

import pruning.export as export_module
from pruning.decision import PruningDecision
from pruning.export import export_pruned, prune_sd3, push_to_hub
from pruning.masked import MaskedTransformer
from tinysr_diffusers import TinySRTransformer2DModel
from tinysr_diffusers.utils import atomic_directory, write_json

from tinysr_diffusers.hub.model_cards import SD3_BASE_MODEL

from .pruning_models import conditioning, latents, tiny_sd3
from .test_loading import hub  # noqa: F401 - the fake-Hub fixture (no network)


@pytest.mark.parametrize("kind", ["sd3", "sd3.5"])
@pytest.mark.parametrize("keep", [[0, 2, 3, 5], [1, 4, 6, 7], [6], [0, 7], list(range(8))])
def test_sd3_export_loads_cleanly_and_equals_the_masked_model(tmp_path, kind, keep):
    source = tiny_sd3(kind)
    cond = conditioning(source, tokens=3)  # both streams matter: the last kept block's text input must be exact
    decision = PruningDecision("test", 8, keep, scores=[float(i) for i in range(8)])
    export_pruned(source, decision, tmp_path / "pruned")

    pruned, info = SD3Transformer2DModel.from_pretrained(tmp_path / "pruned", output_loading_info=True)
    assert all(not v for v in info.values()), info
    assert pruned.config.num_layers == len(keep)
    assert pruned.transformer_blocks[-1].context_pre_only
    dual = source.config.dual_attention_layers
    assert list(pruned.config.dual_attention_layers) == [i for i, layer in enumerate(keep) if layer in dual]
    x = latents()
    with torch.no_grad():
        with MaskedTransformer(source, **cond) as masked:
            expected = masked(x, decision.mask)
        with MaskedTransformer(pruned, **cond) as masked:
            assert torch.allclose(masked(x), expected, atol=1e-6)
        # Independently: diffusers' own forward of the export equals diffusers' source with the other layers skipped.
        assert torch.allclose(pruned(x, **_sd3_inputs(cond, x)).sample, _skipping(source, decision, cond, x), atol=1e-6)

    record = json.loads((tmp_path / "pruned" / "pruning.json").read_text())
    assert record["keep_layers"] == keep and record["method"] == "test" and record["format"] == "sd3"
    assert record["scores"] == [float(i) for i in range(8)]
    assert (
        record["source_config"]["num_layers"] == 8
        and record["source_config"]["_class_name"] == "SD3Transformer2DModel"
    )


def _sd3_inputs(cond: dict, x: torch.Tensor) -> dict:
    batch = x.shape[0]
    return dict(encoder_hidden_states=cond["encoder_hidden_states"].expand(batch, -1, -1),
                pooled_projections=cond["pooled_projections"].expand(batch, -1), timestep=torch.full((batch,), 1000.0))


def _skipping(source: SD3Transformer2DModel, decision: PruningDecision, cond: dict, x: torch.Tensor) -> torch.Tensor:
    return source(x, **_sd3_inputs(cond, x), skip_layers=decision.pruned_layers).sample


@torch.no_grad()
def test_last_block_conversion_is_needed():
    """The last kept block's text-stream modulation must be re-ordered into the continuous norm's (scale, shift):
    with the source rows copied as they are, the export no longer equals the source with the other layers skipped."""
    source = tiny_sd3("sd3")
    cond, x = conditioning(source, tokens=3), latents()
    decision = PruningDecision("test", 8, [0, 3])
    pruned = prune_sd3(source, decision.keep_layers)
    expected = _skipping(source, decision, cond, x)
    assert torch.allclose(pruned(x, **_sd3_inputs(cond, x)).sample, expected, atol=1e-6)
    linear = pruned.transformer_blocks[1].norm1_context.linear
    linear.weight.copy_(source.transformer_blocks[3].norm1_context.linear.weight[: 2 * source.inner_dim])
    linear.bias.copy_(source.transformer_blocks[3].norm1_context.linear.bias[: 2 * source.inner_dim])
    assert not torch.allclose(pruned(x, **_sd3_inputs(cond, x)).sample, expected, atol=1e-4)


@pytest.mark.parametrize("kind", ["sd3", "sd3.5"])
def test_tinysr_export_equals_the_masked_teacher_without_text(tmp_path, kind):
    source = tiny_sd3(kind)
    pooled = conditioning(source)["pooled_projections"]
    decision = PruningDecision("tinysr", 8, [1, 2, 4, 7])
    export_pruned(source, decision, tmp_path / "student", format="tinysr", pooled_projections=pooled)
    student = TinySRTransformer2DModel.from_pretrained(tmp_path / "student")
    assert student.config.source_layers == [1, 2, 4, 7]
    x = latents()
    with torch.no_grad(), MaskedTransformer(source, pooled_projections=pooled) as masked:
        assert torch.allclose(student(x).sample, masked(x, decision.mask), atol=1e-5)
    assert json.loads((tmp_path / "student" / "pruning.json").read_text())["format"] == "tinysr"


def test_export_never_overwrites_unless_asked(tmp_path):
    source = tiny_sd3("sd3")
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="already exists"):
        export_pruned(source, PruningDecision("m", 8, [0, 1]), target)
    assert (target / "keep.txt").read_text() == "user data"
    export_pruned(source, PruningDecision("m", 8, [0, 1]), target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "pruning.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind
    with pytest.raises(ValueError, match="for 6 layers"):
        export_pruned(source, PruningDecision("m", 6, [0, 1]), tmp_path / "other")
    with pytest.raises(ValueError, match="format"):
        export_pruned(source, PruningDecision("m", 8, [0, 1]), tmp_path / "other", format="onnx")


@pytest.mark.parametrize("keep", [[0.5, 1], [True, False], ["0", "1"], [1.0, 2], "01", 1])
def test_decision_refuses_layers_that_are_not_integers(keep):
    """`int()` would floor 0.5, read "1" and take True for 1: a mistyped decision would keep other layers."""
    with pytest.raises(ValueError, match=r"^`keep_layers` must be a list of integers, got "):
        PruningDecision("m", 8, keep)
    for num_layers in (8.0, "8", True):
        with pytest.raises(ValueError, match=r"^`num_layers` must be an integer, got "):
            PruningDecision("m", num_layers, [0])
    assert PruningDecision("m", 8, (3, torch.tensor(1))).keep_layers == [1, 3]  # any real integers


@pytest.mark.parametrize("format", ["sd3", "tinysr"])
def test_push_to_hub_uploads_the_folder_with_the_template_card(hub, tmp_path, monkeypatch, format):  # noqa: F811
    source = tiny_sd3("sd3")
    decision = PruningDecision("shortgpt", 8, [0, 2, 4, 6])
    folder = export_pruned(source, decision, tmp_path / "pruned", format=format)
    calls = {}

    def fake_create_repo(repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)

    def fake_upload_folder(*, repo_id, folder_path, commit_message, **kwargs):
        calls["upload"] = (repo_id, sorted(p.name for p in Path(folder_path).iterdir()), commit_message)
        calls["card"] = ModelCard((Path(folder_path) / "README.md").read_text())
        return "https://huggingface.co/user/pruned/commit/abc"

    monkeypatch.setattr(export_module, "create_repo", fake_create_repo)
    monkeypatch.setattr(export_module, "upload_folder", fake_upload_folder)
    url = push_to_hub(folder, "user/pruned", private=True)
    assert url.endswith("/commit/abc")
    assert calls["create"] == ("user/pruned", {"token": None, "private": True, "exist_ok": True})
    repo_id, files, message = calls["upload"]
    assert files == ["README.md", "config.json", "diffusion_pytorch_model.safetensors", "pruning.json"]
    assert "shortgpt" in message
    card = calls["card"]  # model_cards/pruned_transformer.md, filled from the folder
    assert card.data.library_name == "diffusers" and {"pruned", "tinysr"} <= set(card.data.tags)
    assert card.data.base_model == SD3_BASE_MODEL  # the source was not loaded from a Hub repo
    assert "Kept 4 of the source transformer's blocks: [0, 2, 4, 6]." in card.text
    assert "Method: shortgpt." in card.text
    model_class = SD3Transformer2DModel if format == "sd3" else TinySRTransformer2DModel
    assert f"{model_class.__name__}.from_pretrained(\"user/pruned\")" in card.text
    parameters = model_class.from_pretrained(folder).num_parameters()
    assert f"Parameters: {parameters / 1e6:,.2f} M." in card.text

    # a custom builder receives the folder and the pruning record
    push_to_hub(
        folder,
        "user/pruned",
        model_card=lambda path, record: f"---\nlicense: other\n---\nkept {record['keep_layers']}\n",
    )
    assert calls["card"].data.license == "other" and "kept [0, 2, 4, 6]" in calls["card"].text
    with pytest.raises(FileNotFoundError, match="pruning.json"):
        push_to_hub(tmp_path, "user/other")


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    with atomic_directory(tmp_path / "folder") as folder:
        (Path(folder) / "f.txt").write_text("x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o777 & ~mask
