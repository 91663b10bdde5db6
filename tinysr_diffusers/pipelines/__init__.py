import sys
from typing import TYPE_CHECKING

from ..import_utils import _LazyModule


# Lazy, as the package namespace: a pipeline module (and torch) is imported when its class is used, and
# `onnx_folder` (standard library only) is read by the command line at start-up.
_import_structure = {
    "pipeline_one_step_sr": ["OneStepSRPipeline"],
    "pipeline_onnx_tinysr": ["OnnxTinySRPipeline"],
    "pipeline_tinysr": ["TinySRPipeline"],
    "pipeline_tsdsr": ["TSDSRPipeline"],
}

if TYPE_CHECKING:
    from .pipeline_one_step_sr import OneStepSRPipeline
    from .pipeline_onnx_tinysr import OnnxTinySRPipeline
    from .pipeline_tinysr import TinySRPipeline
    from .pipeline_tsdsr import TSDSRPipeline
else:
    sys.modules[__name__] = _LazyModule(__name__, globals()["__file__"], _import_structure, module_spec=__spec__)
