# Imported together rather than lazily: `OneStepSRPipeline.from_pretrained` accepts any subclass a folder names, found
# among the subclasses already imported. The package namespace above defers all of them until a pipeline is used.
from .pipeline_one_step_sr import OneStepSRPipeline
from .pipeline_onnx_tinysr import OnnxTinySRPipeline  # onnxruntime itself loads with an exported folder
from .pipeline_tinysr import TinySRPipeline
from .pipeline_tsdsr import TSDSRPipeline


__all__ = ["OneStepSRPipeline", "OnnxTinySRPipeline", "TSDSRPipeline", "TinySRPipeline"]
