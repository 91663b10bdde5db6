from .pipeline_one_step_sr import OneStepSRPipeline
from .pipeline_tinysr import TinySRPipeline
from .pipeline_tsdsr import TSDSRPipeline


__all__ = ["OneStepSRPipeline", "TSDSRPipeline", "TinySRPipeline"]
