"""The `prune` stage: mask learning (docs/method.md, "Depth pruning") on the teacher's transformer with
`pruning.MaskLearner`, then the pruned `TinySRPipeline` of the kept teacher blocks in `output_dir/final`."""

import os

from accelerate.utils import DistributedDataParallelKwargs

from pruning import DecodedPerceptualLoss, MaskLearner, PruningDecision
from tinysr_diffusers import TinySRAutoencoder, TinySRPipeline
from tinysr_diffusers.training_utils.degradations import DegradationConfig, RealESRGANDegradation
from tinysr_diffusers.training_utils.perceptual import LPIPS
from training.config import TrainConfig
from training.latents import EncodedBatches
from training.models import cast_frozen_teacher, load_teacher
from training.run import build_data, claim_output_dir, export_final, make_accelerator


def train_prune(config: TrainConfig) -> dict:
    """The `prune` stage: mask learning on the teacher's transformer, then the pruned TinySRPipeline in `final/`."""
    accelerator = make_accelerator(
        config, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])  # skipped layers
    run_id = claim_output_dir(accelerator, config)
    with accelerator.main_process_first():  # diffusers copies the pipelines' code modules: one process at a time
        teacher = load_teacher(config).to(accelerator.device)
    prompt_embeds, pooled = teacher.prompt_embeddings(1)
    learner_config = config.mask_learner_config()
    perceptual = None
    if learner_config.loss == "l1_perceptual":
        lpips = LPIPS(config.lpips_net).to(accelerator.device)
        perceptual = DecodedPerceptualLoss(teacher.decode_latents,
                                           lambda fake, real: lpips(fake.float(), real.float()).mean())
    learner = MaskLearner(
        teacher.transformer, learner_config, encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
        timestep=teacher.timestep, perceptual_loss=perceptual, output_dir=config.output_dir, accelerator=accelerator,
    )  # the learner's student is a float32 copy of the teacher transformer made here
    cast_frozen_teacher(accelerator, config, teacher)
    dataset, loader = build_data(config, from_cache=bool(config.latent_cache))
    if config.latent_cache:
        data = loader  # MaskLearner shards it across processes
    else:
        degrade = RealESRGANDegradation(DegradationConfig.from_dict(config.degradation))
        data = EncodedBatches(accelerator.prepare(loader), dataset, teacher, degrade, config.seed, accelerator)
    decision: PruningDecision = learner.train(data, resume_from=config.resume_from_checkpoint)
    accelerator.print(f"{learner_config.search}: keep layers {decision.keep_layers} "
                      f"(-> {os.path.join(config.output_dir, 'pruning.json')})")
    # The student is cut from the teacher's full-precision weights (the search's LoRA is discarded, as in TinyFusion):
    # the learner's float32 copy of them, since the teacher itself may have been cast to the mixed-precision dtype.
    teacher.register_modules(transformer=learner.base_transformer())

    def save(folder: str) -> None:  # main process only
        student_vae = TinySRAutoencoder.from_pretrained(config.student_vae) if config.student_vae else None
        TinySRPipeline.from_teacher(teacher, decision.keep_layers, vae=student_vae).save_pretrained(folder)

    export = export_final(accelerator, config, save)
    return {"step": learner.progress.step, "export": export, "decision": decision, "run_id": run_id}
