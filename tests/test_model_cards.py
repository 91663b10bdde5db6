"""Model cards: `push_to_hub` of each pipeline uploads the saved layout plus a card filled from the model (hub client
replaced by local fakes), and the pruned-transformer card reports only figures it is given, with their commands.
Cards are read from the object given (no pipeline classes imported by `hub.model_cards`); the wheel's templates are
checked in `test_wheel.py`."""

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard

import tinysr_diffusers.hub.model_cards as model_cards
from tests.test_loading import _files, hub  # noqa: F401 - `hub` is the fake-Hub fixture
from tests.tiny_pipelines import tiny_teacher
from tinysr_diffusers import TinySRPipeline
from tinysr_diffusers.hub.model_cards import (
    NOT_MEASURED,
    SD3_BASE_MODEL,
    SD3_LICENSE_LINK,
    pipeline_card,
    pruned_transformer_card,
    read_template,
)


def _check_metadata(card: ModelCard, *tags: str) -> None:
    data = card.data
    assert data.library_name == "diffusers" and data.pipeline_tag == "image-to-image"
    assert data.base_model == SD3_BASE_MODEL
    licence = (data.license, data.license_name, data.license_link)
    assert licence == ("other", "stabilityai-ai-community", SD3_LICENSE_LINK)
    assert {"super-resolution", "tinysr", *tags} <= set(data.tags)
    assert "Stability AI Community License" in card.text


@pytest.mark.parametrize("kind", ["student", "teacher"])
def test_push_to_hub_uploads_the_layout_and_a_filled_card(hub, tmp_path, kind):  # noqa: F811
    teacher = tiny_teacher()
    pipe = TinySRPipeline.from_teacher(teacher, keep_layers=[1, 3]) if kind == "student" else teacher
    pipe.save_pretrained(tmp_path / "saved")
    pipe.push_to_hub("user/tiny-sr")

    (upload,) = hub.uploads
    files = dict(upload["files"])
    card = ModelCard(files.pop("README.md").decode())
    assert files == _files(tmp_path / "saved")  # exactly the saved layout besides the card
    assert 'DiffusionPipeline.from_pretrained("user/tiny-sr", trust_remote_code=True)' in card.text
    assert NOT_MEASURED in card.text  # no figure was measured for this checkpoint
    if kind == "student":
        _check_metadata(card, "pruned")
        assert "source block indices [1, 3]" in card.text and "Pruning method: not recorded" in card.text
        assert "VAE: AutoencoderKL." in card.text  # the teacher's VAE, shared
    else:
        _check_metadata(card, "tsd-sr")
        assert "`prompt_embeddings/`" in card.text and "Prompt: `a test prompt`" in card.text


def test_pruned_transformer_card_reports_given_measurements_with_commands(hub):  # noqa: F811 - no network
    student = TinySRPipeline.from_teacher(tiny_teacher(), keep_layers=[0, 2]).transformer
    measured = {"module MACs at 512x512": ("0.12 G", "python -m benchmarks.architecture")}
    card = pruned_transformer_card(
        student, "user/pruned", pruning_method="learned depth pruning", measurements=measured
    )
    _check_metadata(card, "pruned")
    assert "Kept 2 of the source transformer's blocks: [0, 2]." in card.text
    assert "Method: learned depth pruning." in card.text
    assert "| module MACs at 512x512 | 0.12 G | `python -m benchmarks.architecture` |" in card.text
    assert NOT_MEASURED not in card.text
    assert "from tinysr_diffusers import TinySRTransformer2DModel" in card.text


def test_model_cards_import_no_pipeline_module():
    """No import ring: the pipelines import `hub.model_cards`, which reads what it prints from the pipeline given."""
    tree = ast.parse(Path(model_cards.__file__).read_text(encoding="utf-8"))
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert imported and not [name for name in imported if "pipelines" in name]


def test_pipeline_card_reads_any_object_with_the_pipeline_attributes(hub):  # noqa: F811 - no network
    student = TinySRPipeline.from_teacher(tiny_teacher(), keep_layers=[0, 2])
    duck = SimpleNamespace(transformer=student.transformer, vae=student.vae, timestep=1000.0)
    card = pipeline_card(duck, "user/duck", pruning_method="learned depth pruning")
    _check_metadata(card, "pruned")
    assert "`SimpleNamespace`" in card.text and "source block indices [0, 2]" in card.text
    assert "Pruning method: learned depth pruning." in card.text and "modulation cached at t = 1000." in card.text


def test_templates_are_the_model_cards_package_files():
    folder = Path(__file__).resolve().parents[1] / "model_cards"
    for name in ("tinysr_pipeline.md", "teacher_pipeline.md", "pruned_transformer.md"):
        assert read_template(name) == (folder / name).read_text(encoding="utf-8")
