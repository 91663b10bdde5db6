"""The training stages, one module each; `STAGE_CLASSES` maps a `stage` setting to the `Stage` that
`training/distill.py` trains (`prune` runs `pruning.MaskLearner` instead: `training.stages.prune.train_prune`)."""

from training.stages.base import Stage
from training.stages.latent import LatentStage
from training.stages.pixel import PixelStage
from training.stages.teacher import TeacherStage
from training.stages.vae import VAEDecoderStage, VAEEncoderStage


STAGE_CLASSES: dict[str, type[Stage]] = {"teacher": TeacherStage, "vae_encoder": VAEEncoderStage,
                                         "vae_decoder": VAEDecoderStage, "latent": LatentStage, "pixel": PixelStage}
