from typing import TYPE_CHECKING

from ..import_utils import install_lazy_module


if TYPE_CHECKING:
    from .pipeline_one_step_sr import OneStepSRPipeline
    from .pipeline_onnx_tinysr import OnnxTinySRPipeline
    from .pipeline_tinysr import TinySRPipeline
    from .pipeline_tsdsr import TSDSRPipeline

# Lazy, as the package namespace: a pipeline module (and torch) is imported when its class is used, and
# `onnx_folder` (standard library only) is read by the command line at start-up.
_import_structure = {
    "pipeline_one_step_sr": ["OneStepSRPipeline"],
    "pipeline_onnx_tinysr": ["OnnxTinySRPipeline"],
    "pipeline_tinysr": ["TinySRPipeline"],
    "pipeline_tsdsr": ["TSDSRPipeline"],
}
install_lazy_module(__name__, _import_structure)
