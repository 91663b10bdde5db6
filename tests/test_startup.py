"""Start-up: the lazy namespaces import torch only when a model or pipeline is used, and `--help` is quiet.

Each check runs in a fresh interpreter, since this test process has imported torch long ago.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest


REPOSITORY = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "peft", "bitsandbytes", "pyiqa")
PUBLIC_CLASSES = {
    "OneStepSRPipeline",
    "PromptEmbeddings",
    "TSDSRPipeline",
    "TinySRAutoencoder",
    "TinySRPipeline",
    "TinySRTransformer2DModel",
}


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPOSITORY, capture_output=True, text=True, timeout=300
    )


def _last_json_line(result: subprocess.CompletedProcess):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_loads_torch_only_when_a_class_is_used():
    code = f"""
import json, sys
heavy = {HEAVY!r}
import tinysr_diffusers, pruning
report = {{"on_import": [name for name in heavy if name in sys.modules], "all": tinysr_diffusers.__all__}}
report["version"] = tinysr_diffusers.__version__
report["listed"] = sorted(set(tinysr_diffusers.__all__) - set(dir(tinysr_diffusers)))
namespace = {{}}
exec("from tinysr_diffusers import *", namespace)  # what the shims of a saved pipeline folder do
report["torch_after_use"] = "torch" in sys.modules
report["star"] = {{name: namespace[name].__module__ for name in namespace if not name.startswith("__")}}
print(json.dumps(report))
"""
    report = _last_json_line(_python(code))
    assert report["on_import"] == []
    assert report["version"] == "0.1.0"
    assert set(report["all"]) == PUBLIC_CLASSES and report["listed"] == []
    assert report["torch_after_use"]
    assert set(report["star"]) == PUBLIC_CLASSES
    assert all(module.startswith("tinysr_diffusers.") for module in report["star"].values())


def test_models_namespace_resolves_its_classes_on_use():
    code = """
import json, sys
from tinysr_diffusers import models
before = "torch" in sys.modules
from tinysr_diffusers.models import TinySRAutoencoder
import tinysr_diffusers
print(json.dumps([before, TinySRAutoencoder is tinysr_diffusers.TinySRAutoencoder, TinySRAutoencoder.__module__]))
"""
    before, same, module = _last_json_line(_python(code))
    assert before is False
    assert same
    assert module == "tinysr_diffusers.models.autoencoder_tinysr"


def test_base_pipeline_loads_a_saved_folder_in_a_fresh_process(tmp_path):
    """`OneStepSRPipeline.from_pretrained` picks the subclass the folder names, which must be importable by then."""
    from tests.tiny_pipelines import tiny_student

    tiny_student().save_pretrained(tmp_path)
    code = """
import sys
from tinysr_diffusers import OneStepSRPipeline
print(type(OneStepSRPipeline.from_pretrained(sys.argv[1])).__name__)
"""
    result = _python(code, str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "TinySRPipeline"


def test_unknown_names_raise_attribute_error():
    result = _python("import tinysr_diffusers; tinysr_diffusers.NoSuchPipeline")
    assert result.returncode == 1
    assert "AttributeError: module 'tinysr_diffusers' has no attribute 'NoSuchPipeline'" in result.stderr


@pytest.mark.parametrize("argv", [["--help"], ["upscale", "--help"]], ids=["tinysr", "tinysr-upscale"])
def test_help_is_quiet_and_imports_no_torch(argv):
    entry_point = "import sys; from tinysr_diffusers.cli import main; sys.exit(main())"  # the console script
    result = _python(entry_point, *argv)
    assert result.returncode == 0
    assert result.stderr == ""
    assert result.stdout.startswith("usage: tinysr")

    code = f"""
import json, sys
from tinysr_diffusers.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))
"""
    assert _last_json_line(_python(code, *argv)) == []
