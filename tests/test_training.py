"""training/distill.py on tiny models and real photos (CPU): every stage learns, resume is exact, export loads."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from diffusers import DiffusionPipeline
from tests.tiny_pipelines import photo, tiny_teacher, tiny_tinysr_vae
from tinysr_diffusers import TinySRPipeline
from training.config import load_config
from tinysr_diffusers.training_utils.degradations import RealESRGANDegradation
from tinysr_diffusers.training_utils.perceptual import LPIPS
from training.data import random_crop
from training.discriminator import PatchDiscriminator
from training.distill import NonFiniteLossError, generator_loss, main, train
from training.latents import make_batch
from training.models import load_teacher
from training.stages import STAGE_CLASSES


ROOT = Path(__file__).resolve().parents[1]
TINY_VAE = "{encoder_block_out_channels: [8, 8, 8, 8], decoder_block_out_channels: [8, 8, 8, 8], " \
           "num_encoder_blocks: [1, 1, 1, 1], num_decoder_blocks: [1, 1, 1, 1]}"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("training"))


def make_assets(root: Path) -> dict:
    """A saved tiny teacher, photos (and one corrupt file) and a tiny student VAE in `root`."""
    teacher = root / "teacher"
    tiny_teacher().save_pretrained(teacher)
    images = root / "images"
    images.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        photo(name).save(images / f"{name}.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    student_vae = root / "student_vae"
    tiny_tinysr_vae().save_pretrained(student_vae)
    return {"root": root, "teacher": str(teacher), "images": str(images), "student_vae": str(student_vae)}


def config_for(assets, stage, output_dir, *extra):
    return load_config(argv_for(assets, stage, output_dir, *extra))


def argv_for(assets, stage, output_dir, *extra):
    """The command line of a tiny training run on the test assets."""
    args = [
        f"stage={stage}", f"teacher={assets['teacher']}", f"train_data=[{assets['images']}]",
        f"output_dir={output_dir}", "hr_size=128", "batch_size=2", "report_to=none", "lpips_net=alex",
        "sample_steps=0", "learning_rate=1e-3", "disc_learning_rate=1e-3", "lora_rank=4", "seed=3",
        f"vae_config={TINY_VAE}", "keep_layers=[0,2]", f"student_vae={assets['student_vae']}",
    ]
    return args + list(extra)


def test_config_yaml_overrides_and_errors(tmp_path):
    config = load_config(["--config", str(ROOT / "training/configs/pixel.yaml"), "--max_steps", "7",
                          "learning_rate=2e-5", "degradation.noise_range=[1, 5]"])
    assert (config.stage, config.max_steps, config.learning_rate) == ("pixel", 7, 2e-5)
    assert (config.latent_weight, config.lpips_weight, config.gan_weight, config.seed) == (5.0, 1.0, 0.3, 80)
    assert config.degradation["noise_range"] == [1, 5]
    bare = tmp_path / "bare.yaml"
    bare.write_text("stage: latent\nteacher: t\ntrain_data: [x]\nkeep_layers: [0]\nmixed_precision: no\n")
    assert load_config(["--config", str(bare)]).mixed_precision == "no"  # not YAML 1.1's False
    assert load_config(["--config", str(bare), "mixed_precision=no", "report_to=none"]).mixed_precision == "no"
    with pytest.raises(ValueError, match="hr_size must be a positive multiple of 64.*\n.*batch_size"):
        load_config(["--config", str(ROOT / "training/configs/latent.yaml"), "hr_size=100", "batch_size=0"])
    with pytest.raises(ValueError, match="max_steps: expected int"):
        load_config(["--config", str(ROOT / "training/configs/latent.yaml"), "max_steps=ten"])
    with pytest.raises(ValueError, match="prune: Unknown search 'random'.*\n.*gradient_accumulation_steps=1"):
        load_config(["--config", str(ROOT / "training/configs/prune.yaml"), "prune.search=random",
                     "gradient_accumulation_steps=2"])
    with pytest.raises(ValueError, match="or latent_cache for the prune stage"):
        load_config(["--config", str(ROOT / "training/configs/prune.yaml"), "train_data=null"])
    with pytest.raises(ValueError, match="dataset_streaming needs dataset_name"):
        load_config(["--config", str(ROOT / "training/configs/latent.yaml"), "dataset_streaming=true"])
    with pytest.raises(ValueError, match="degradation: .*noise_range"):
        load_config(["--config", str(ROOT / "training/configs/latent.yaml"), "degradation.noise_range=[5, 1]"])
    with pytest.raises(SystemExit):  # argparse: unrecognized arguments
        load_config(["--config", str(ROOT / "training/configs/latent.yaml"), "degradation.no_such=1"])
    with pytest.raises(SystemExit):  # no abbreviations: `ema` is not silently ema_decay
        load_config(["--config", str(ROOT / "training/configs/latent.yaml"), "ema=0.5"])
    with pytest.raises(ValueError, match="checkpoints_total_limit must be positive"):
        load_config(["--config", str(ROOT / "training/configs/latent.yaml"), "checkpoints_total_limit=0"])
    # The value after `--key` is taken as it is, `=` included.
    assert load_config(["--config", str(ROOT / "training/configs/latent.yaml"), "--output_dir", "runs/lr=1e-4",
                        "max_steps=3"]).output_dir == "runs/lr=1e-4"
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: latent\nlerning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown settings \\['lerning_rate'\\]"):
        load_config(["--config", str(bad)])
    for stage in ("vae_encoder", "vae_decoder", "prune", "latent", "pixel"):
        assert load_config(["--config", str(ROOT / f"training/configs/{stage}.yaml")]).stage == stage


def test_help_documents_every_setting(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--resume_from_checkpoint", "--lora_rank", "--gan_weight", "--degradation.noise_range", "prune"):
        assert option in text


@pytest.mark.parametrize("stage", ["teacher", "vae_encoder", "vae_decoder", "latent", "pixel"])
def test_stage_lowers_its_loss_on_a_fixed_batch(assets, tmp_path, stage):
    gan = stage in ("vae_decoder", "pixel")
    extra = ["lpips_weight=1", "gan_weight=0.1"] if gan else []
    if stage == "teacher":  # full training of the teacher transformer, LPIPS on 4x4-latent windows of 1 sample
        extra = ["lora_rank=0", "lpips_weight=0.1", "decode_crop=4", "decode_samples=1"]
    if stage == "pixel":  # what stage 2 adds to stage 1: LPIPS on the decoded student images, alone (the latent
        # MSE, which pulls against it here, is the latent stage's). Through the frozen random tiny VAE, LoRA hardly
        # moves LPIPS in 8 steps; full fine-tuning lowers it by about a quarter.
        extra += ["latent_weight=0", "lora_rank=0"]
    config = config_for(assets, stage, tmp_path, *extra)
    torch.manual_seed(0)
    teacher = load_teacher(config)
    stage_ = STAGE_CLASSES[stage](config, teacher)
    model = stage_.trainable().train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    # LoRA (rank 4) needs larger steps than the VAEs.
    optimizer = torch.optim.Adam(params, lr=1e-2 if stage.startswith("vae") or stage == "teacher" else 5e-2)
    crops = [random_crop(photo(name), 64, torch.Generator().manual_seed(0)) for name in ("astronaut", "coffee")]
    hr = torch.stack(crops)
    batch = make_batch(hr, RealESRGANDegradation(), torch.Generator().manual_seed(0))
    lpips = LPIPS("alex") if gan or stage == "teacher" else None
    discriminator = PatchDiscriminator(channels=8, num_layers=2) if gan else None
    losses = []
    for _ in range(8):
        generator = torch.Generator().manual_seed(0)
        loss, terms, _ = generator_loss(stage_, model, batch, generator, lpips, discriminator)
        losses.append(loss.item() - (config.gan_weight * terms["gan"].item() if gan else 0.0))  # GAN term excluded
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.9 * losses[0], losses


def test_pixel_stage_loss_and_gradients_equal_an_independent_computation(assets, tmp_path):
    """Stage 2's terms, written out from the pipelines' parts: the latent MSE between the student's and the teacher's
    one-step estimates from the teacher VAE's posterior mode, LPIPS and the generator's GAN term on the student VAE's
    decoding of the student's estimate; the same values and the same gradients in the trained weights."""
    config = config_for(assets, "pixel", tmp_path, "latent_weight=3", "lpips_weight=0.5", "gan_weight=0.2")
    teacher = load_teacher(config)
    stage = STAGE_CLASSES["pixel"](config, teacher)
    model = stage.trainable().train()
    params = [p for p in model.parameters() if p.requires_grad]
    crops = [random_crop(photo(name), 64, torch.Generator().manual_seed(0)) for name in ("astronaut", "coffee")]
    batch = make_batch(torch.stack(crops), RealESRGANDegradation(), torch.Generator().manual_seed(0))
    lpips = LPIPS("alex")
    discriminator = PatchDiscriminator(channels=8, num_layers=2)
    with torch.no_grad():  # spectral norm's first power iteration; eval then keeps its weights for both computations
        discriminator(batch["hr"])
    discriminator.eval()
    loss, terms, _ = generator_loss(stage, model, batch, torch.Generator().manual_seed(0), lpips, discriminator)

    student = stage.student
    assert not (teacher.config.use_shift_factor or student.config.use_shift_factor)  # latents are only scaled
    with torch.no_grad():
        z_low = teacher.vae.encode(batch["lr_up"]).latent_dist.mode() * teacher.vae.config.scaling_factor
        z_teacher = z_low - teacher.sigma * teacher.predict_velocity(z_low)
    z_student = z_low - student.sigma * model(z_low).sample
    fake = student.vae.decode(z_student / student.vae.config.scaling_factor).sample
    expected = {"latent": F.mse_loss(z_student, z_teacher), "lpips": lpips(fake, batch["hr"]).mean(),
                "gan": -discriminator(fake).mean()}
    assert sorted(terms) == sorted(expected)
    torch.testing.assert_close(loss, 3 * expected["latent"] + 0.5 * expected["lpips"] + 0.2 * expected["gan"])
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value)
        assert terms[name].requires_grad, name  # e.g. not from detached images
        actual = torch.autograd.grad(terms[name], params, retain_graph=True)
        wanted = torch.autograd.grad(value, params, retain_graph=True)
        assert any(gradient.abs().max() > 0 for gradient in wanted), name  # every term reaches the transformer
        for gradient, reference in zip(actual, wanted):
            torch.testing.assert_close(gradient, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


def _transformer_state(folder):
    return TinySRPipeline.from_pretrained(folder).transformer.state_dict()


def test_resume_equals_uninterrupted_and_export_upscales(assets, tmp_path, caplog):
    # 5 files (one corrupt) in batches of 2: 3 batches an epoch, so 4 steps cross an epoch boundary.
    common = ["stage=latent", "max_steps=4", "checkpointing_steps=2", "hr_size=64", "lr_scheduler=linear",
              "lr_warmup_steps=1"]
    with caplog.at_level("WARNING"):
        full = train(config_for(assets, "latent", tmp_path / "full", *common))
    assert any("Skipping corrupt image" in record.message and "broken.png" in record.message
               for record in caplog.records)
    assert sorted(os.listdir(tmp_path / "full")) == ["checkpoint-2", "checkpoint-4", "final", "run.json"]

    # A run killed after its step-2 checkpoint resumes into the same 4-step run (schedule included).
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "killed" / "checkpoint-2")
    resumed = train(config_for(assets, "latent", tmp_path / "killed", *common, "resume_from_checkpoint=latest"))
    assert resumed["step"] == 4
    assert resumed["losses"] == full["losses"][2:]
    # linear decay after one warm-up step from learning_rate=1e-3, the scheduler state restored on resume
    assert full["learning_rates"] == pytest.approx([1e-3, 2e-3 / 3, 1e-3 / 3, 0.0])
    assert resumed["learning_rates"] == full["learning_rates"][2:]
    expected, actual = _transformer_state(full["export"]), _transformer_state(resumed["export"])
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert not any("lora" in name for name in expected)  # LoRA merged into the exported weights

    pipe = DiffusionPipeline.from_pretrained(full["export"], trust_remote_code=True)
    assert type(pipe).__name__ == "TinySRPipeline"
    pipe.set_progress_bar_config(disable=True)
    image = pipe(photo("chelsea", (24, 16)), output_type="pil").images[0]
    assert image.size == (96, 64)


def test_non_finite_loss_stops_with_a_checkpoint(assets, tmp_path):
    teacher = tiny_teacher()
    with torch.no_grad():
        teacher.transformer.proj_out.weight.fill_(float("nan"))
    teacher.save_pretrained(tmp_path / "nan_teacher")
    config = config_for(assets, "latent", tmp_path / "out", f"teacher={tmp_path / 'nan_teacher'}", "max_steps=3",
                        "hr_size=64")
    # The initial weights gave the NaN: there is no good state to save (see test_training_reliability).
    with pytest.raises(NonFiniteLossError, match="at step 1 .*'loss': nan.*no checkpoint has a finite loss yet"):
        train(config)
    assert sorted(os.listdir(tmp_path / "out")) == ["run.json"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["latent", "pixel", "prune"])
def test_two_process_ddp_run(assets, tmp_path, stage):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "training/distill.py",
        "--config", f"training/configs/{stage}.yaml", f"teacher={assets['teacher']}",
        f"train_data=[{assets['images']}]", f"output_dir={tmp_path / 'ddp'}", "hr_size=64", "batch_size=1",
        "max_steps=2", "checkpointing_steps=1", "report_to=none", "lora_rank=4", "mixed_precision=no",
        *(["prune.keep=2", "prune.block_size=2"] if stage == "prune" else
          ["keep_layers=[0,2]", f"student_vae={assets['student_vae']}", "student=null", "lpips_net=alex"]),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MULTI_CPU, 2 process(es)" in result.stdout + result.stderr
    if stage != "prune":  # pixel: LPIPS + PatchGAN, two optimizers under DDP
        assert sorted(os.listdir(tmp_path / "ddp")) == ["checkpoint-1", "checkpoint-2", "final", "run.json"]
    else:
        assert sorted(os.listdir(tmp_path / "ddp" / "checkpoints")) == ["checkpoint-1", "checkpoint-2"]
        assert (tmp_path / "ddp" / "pruning.json").is_file()
    assert TinySRPipeline.from_pretrained(tmp_path / "ddp" / "final").transformer.config.num_layers == 2


def test_pixel_stage_full_finetune_ema_accumulation_and_tensorboard(assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = config_for(assets, "pixel", tmp_path / "out", "hr_size=64", "max_steps=2", "gradient_accumulation_steps=2",
                        "lora_rank=0", "ema_decay=0.5", "lpips_weight=1", "gan_weight=0.3", "report_to=tensorboard",
                        "logging_steps=1", "sample_steps=1", "checkpointing_steps=5")
    result = train(config)
    assert result["step"] == 2 and sorted(os.listdir(tmp_path / "out")) == ["checkpoint-2", "final", "logs", "run.json"]
    (run,) = list((tmp_path / "out" / "logs").iterdir())
    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    assert {"loss", "loss/latent", "loss/lpips", "loss/gan", "loss/discriminator"} <= set(events.Tags()["scalars"])
    assert "samples/lr_output_hr" in events.Tags()["images"]
    assert [event.step for event in events.Scalars("loss")] == [1, 2]
    # Full fine-tuning changed the transformer itself (no adapters), and the export holds the EMA weights.
    exported = _transformer_state(result["export"])
    start = TinySRPipeline.from_teacher(load_teacher(config), [0, 2]).transformer.state_dict()
    assert any(not torch.equal(exported[name], start[name]) for name in start)
    # The export holds the EMA shadow weights of the last checkpoint, not the raw trained weights saved beside them.
    from safetensors.torch import load_file

    checkpoint = tmp_path / "out" / "checkpoint-2"
    ema_state = load_file(checkpoint / "ema.safetensors")
    raw = load_file(checkpoint / "model.safetensors")
    names = [name for name, _ in TinySRPipeline.from_pretrained(result["export"]).transformer.named_parameters()]
    assert len(names) == len(ema_state)  # every parameter trained (no LoRA), in parameter order
    for index, name in enumerate(names):
        assert torch.equal(exported[name], ema_state[f"shadow_params.{index}"]), name
    assert any(not torch.equal(raw[name], exported[name]) for name in names)


def test_accelerate_config_examples_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for path in sorted((ROOT / "training/accelerate_configs").glob("*.yaml")):
        kinds[path.stem] = str(load_config_from_file(str(path)).distributed_type)
    assert sorted(kinds.values()) == ["DistributedType.DEEPSPEED", "DistributedType.FSDP", "DistributedType.MULTI_GPU"]


def test_latest_checkpoint_ignores_unfinished_ones(tmp_path):
    from tinysr_diffusers.utils import resolve_checkpoint

    # A kill during save_state leaves `.checkpoint-N.tmp`; resuming takes the newest complete checkpoint.
    for name in ("checkpoint-2", "checkpoint-10", ".checkpoint-12.tmp", "checkpoint-11.tmp", "final"):
        (tmp_path / name).mkdir()
    assert resolve_checkpoint(tmp_path, "latest") == str(tmp_path / "checkpoint-10")
    assert resolve_checkpoint(tmp_path / "empty", "latest") is None  # a new run
    with pytest.raises(FileNotFoundError, match="checkpoint-3"):
        resolve_checkpoint(tmp_path, tmp_path / "checkpoint-3")
    with pytest.raises(ValueError, match="expected a name checkpoint-<step>"):
        resolve_checkpoint(tmp_path, tmp_path / "final")


def test_datasets_image_dataset_gives_seeded_crops_and_skips_corrupt_images(assets, caplog):
    from training.data import build_dataset

    config = config_for(assets, "latent", assets["root"] / "unused", f"dataset_name={assets['images']}", "hr_size=64")
    dataset = build_dataset(config)
    assert dataset.hf_dataset is not None and len(dataset) == 5
    with caplog.at_level("WARNING"):
        crops = [dataset[index] for index in range(len(dataset))]
    # The corrupt image (broken.png) is logged and replaced by a crop of the next one in file order: full batches.
    assert "Skipping corrupt image" in caplog.text
    assert all(crop.shape == (3, 64, 64) and 0 <= crop.min() <= crop.max() <= 1 for crop in crops)
    again = [dataset[index] for index in range(len(dataset))]
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    dataset.epoch = 1
    assert not all(torch.equal(a, b) for a, b in zip(crops, (dataset[i] for i in range(len(dataset)))))


PRUNE = ["prune.keep=2", "prune.block_size=2", "prune.scale=[1,1]", "prune.tau=[1,0.5]", "logging_steps=1",
         "checkpointing_steps=2", "weight_decay=0", "hr_size=64"]


def test_prune_stage_learns_a_mask_resumes_and_exports_the_student(assets, tmp_path):
    full = train(config_for(assets, "prune", tmp_path / "full", *PRUNE, "max_steps=4"))
    decision = full["decision"]
    assert full["step"] == 4 and len(decision.keep_layers) == 2
    names = sorted(os.listdir(tmp_path / "full"))
    assert names == ["checkpoints", "final", "keep_probabilities.jsonl", "keep_probabilities.png", "pruning.json",
                     "run.json"]
    student = TinySRPipeline.from_pretrained(full["export"])
    assert student.transformer.config.source_layers == decision.keep_layers
    # The student's blocks are the teacher's kept blocks (the search's LoRA is not merged).
    teacher = load_teacher(config_for(assets, "prune", tmp_path / "unused", *PRUNE)).transformer
    layer = decision.keep_layers[-1]
    expected = teacher.transformer_blocks[layer].attn.to_q.weight
    assert torch.equal(student.transformer.transformer_blocks[-1].attn.to_q.weight, expected)

    # A run killed after its step-2 checkpoint (the schedules span max_steps, so it is the same 4-step run).
    shutil.copytree(tmp_path / "full" / "checkpoints" / "checkpoint-2", tmp_path / "killed" / "checkpoints" / "checkpoint-2")
    resumed = train(config_for(assets, "prune", tmp_path / "killed", *PRUNE, "max_steps=4",
                               "resume_from_checkpoint=latest"))
    assert resumed["step"] == 4 and resumed["decision"].keep_layers == decision.keep_layers
    # A run killed while writing its first checkpoint left only the unfinished `.checkpoint-2.tmp`: it starts anew.
    (tmp_path / "early" / "checkpoints" / ".checkpoint-2.tmp").mkdir(parents=True)
    train(config_for(assets, "prune", tmp_path / "early", *PRUNE, "max_steps=4", "resume_from_checkpoint=latest"))
    logged = [(tmp_path / run / "keep_probabilities.jsonl").read_text() for run in ("full", "killed", "early")]
    assert logged[0] == logged[1] == logged[2]  # same losses, masks and keep probabilities at every step


def test_prune_stage_lowers_its_loss_on_a_fixed_batch(assets, tmp_path):
    import json

    from training.cache_latents import cache_latents

    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "coffee"):
        photo(name).save(images / f"{name}.png")
    cache = tmp_path / "cache"  # two samples: with batch_size=2 every step sees the same batch
    cache_latents(config_for(assets, "latent", tmp_path / "unused", f"train_data=[{images}]", "hr_size=64",
                             f"latent_cache={cache}"))
    train(config_for(assets, "prune", tmp_path / "prune", *PRUNE, f"latent_cache={cache}", "train_data=null",
                     "max_steps=8", "learning_rate=5e-2", "checkpointing_steps=100"))
    log = (tmp_path / "prune" / "keep_probabilities.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in log]
    assert len(losses) == 8 and losses[-1] < 0.99 * losses[0], losses


def test_latent_cache_feeds_the_prune_and_latent_stages(assets, tmp_path):
    from safetensors import safe_open
    from training.cache_latents import cache_latents

    cache = tmp_path / "cache"
    config = config_for(assets, "latent", tmp_path / "unused", "hr_size=64", f"latent_cache={cache}",
                        "cache_epochs=2", "cache_shard_size=3")
    cache_latents(config)
    info = (cache / "cache.json").read_text()
    assert '"samples": 10' in info  # 5 files (the corrupt one replaced by the next photo) x 2 epochs
    shards = sorted(cache.glob("*.safetensors"))
    assert len(shards) >= 2 and not (tmp_path / "cache.tmp").exists()  # shards of >= 3 samples
    with safe_open(str(shards[0]), framework="pt") as handle:
        assert sorted(handle.keys()) == ["hr_latents", "lr_latents", "teacher_latents"]
        assert tuple(handle.get_tensor("lr_latents").shape[1:]) == (16, 8, 8)
    with pytest.raises(FileExistsError, match="already exists"):
        cache_latents(config)

    # The cached teacher latents are the teacher's one-step estimate of the cached LR latents.
    teacher = load_teacher(config)
    with safe_open(str(shards[0]), framework="pt") as handle:
        lr, target = handle.get_tensor("lr_latents"), handle.get_tensor("teacher_latents")
    with torch.no_grad():
        estimate = lr - teacher.sigma * teacher.predict_velocity(lr)  # the recipe's step, written out
    torch.testing.assert_close(estimate, target, rtol=1e-4, atol=1e-5)

    latent = train(config_for(assets, "latent", tmp_path / "latent", f"latent_cache={cache}", "train_data=null",
                              "max_steps=6", "checkpointing_steps=6", "learning_rate=3e-2"))
    assert latent["step"] == 6 and sum(latent["losses"][-2:]) < sum(latent["losses"][:2])
    pruned = train(config_for(assets, "prune", tmp_path / "prune", *PRUNE, f"latent_cache={cache}",
                              "train_data=null", "max_steps=2"))
    assert len(pruned["decision"].keep_layers) == 2
    with pytest.raises(ValueError, match="needs images"):
        train(config_for(assets, "pixel", tmp_path / "pixel", f"latent_cache={cache}", "max_steps=1"))


def test_vae_latent_cache_trains_the_teacher_and_then_its_students(assets, tmp_path):
    """A cache without teacher estimates (cache_teacher_latents=false) serves the teacher stage, whose export is a
    TSD-SR pipeline, and then the latent stage, which computes that teacher's estimates itself."""
    from safetensors import safe_open
    from tinysr_diffusers import TSDSRPipeline
    from training.cache_latents import cache_latents

    cache = tmp_path / "cache"
    cache_latents(config_for(assets, "teacher", tmp_path / "unused", "hr_size=64", f"latent_cache={cache}",
                             "cache_teacher_latents=false"))
    with safe_open(str(next(cache.glob("*.safetensors"))), framework="pt") as handle:
        assert sorted(handle.keys()) == ["hr_latents", "lr_latents"]
    result = train(config_for(assets, "teacher", tmp_path / "teacher", f"latent_cache={cache}", "train_data=null",
                              "hr_size=64", "lora_rank=0", "lpips_weight=0.1", "decode_crop=4", "max_steps=3",
                              "checkpointing_steps=3"))
    teacher = TSDSRPipeline.from_pretrained(result["export"])
    before = load_teacher(config_for(assets, "teacher", tmp_path / "unused"))
    changed = [name for name, tensor in teacher.transformer.state_dict().items()
               if not torch.equal(tensor, before.transformer.state_dict()[name])]
    assert changed and all(p.dtype == torch.float32 for p in teacher.transformer.parameters())
    latent = train(config_for(assets, "latent", tmp_path / "latent", f"teacher={result['export']}",
                              f"latent_cache={cache}", "train_data=null", "hr_size=64", "max_steps=2",
                              "checkpointing_steps=2"))
    assert latent["step"] == 2 and all(torch.isfinite(torch.tensor(latent["losses"])))


def test_streamed_dataset_resumes_like_an_uninterrupted_run(assets, tmp_path, caplog):
    common = [f"dataset_name={assets['images']}", "dataset_streaming=true", "train_data=null", "hr_size=64",
              "checkpointing_steps=2"]
    with caplog.at_level("WARNING"):
        full = train(config_for(assets, "latent", tmp_path / "full", *common, "max_steps=4"))
    assert "Skipping corrupt image" in caplog.text  # decoded by us: a corrupt file does not end the stream
    train(config_for(assets, "latent", tmp_path / "split", *common, "max_steps=2"))
    resumed = train(config_for(assets, "latent", tmp_path / "split", *common, "max_steps=4",
                               "resume_from_checkpoint=latest"))
    assert resumed["step"] == 4 and len(full["losses"]) == 4
    assert full["losses"][2:] == resumed["losses"]


@pytest.mark.parametrize("precision, cast", [("bf16", True), ("bf16", False), ("fp16", True)])
def test_mixed_precision_keeps_the_frozen_teacher_in_its_dtype_and_exports_float32(assets, tmp_path, monkeypatch,
                                                                                     caplog, precision, cast):
    import training.distill as distill

    loaded = []
    monkeypatch.setattr(distill, "load_teacher", lambda config: loaded.append(load_teacher(config)) or loaded[-1])
    with caplog.at_level("WARNING"):
        result = train(config_for(assets, "latent", tmp_path / "out", "hr_size=64", "max_steps=3",
                                  "checkpointing_steps=1", "checkpoints_total_limit=2", f"mixed_precision={precision}",
                                  f"cast_teacher={str(cast).lower()}"))
    # accelerate runs fp16 on a CPU in float32: the teacher is not cast then, and the run says so.
    computes_bf16 = precision == "bf16" and cast
    assert loaded[0].transformer.dtype == (torch.bfloat16 if computes_bf16 else torch.float32)
    assert ("fp16 mixed precision needs a GPU" in caplog.text) == (precision == "fp16")
    assert loaded[0].vae.dtype == torch.float32  # a student may share the teacher's VAE
    assert TinySRPipeline.from_pretrained(result["export"]).transformer.dtype == torch.float32
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint-2", "checkpoint-3", "final", "run.json"]  # newest 2


def test_prune_stage_in_bf16_exports_the_teachers_full_precision_weights(assets, tmp_path):
    result = train(config_for(assets, "prune", tmp_path / "out", *PRUNE, "max_steps=1", "mixed_precision=bf16"))
    student = TinySRPipeline.from_pretrained(result["export"]).transformer
    teacher = load_teacher(config_for(assets, "prune", tmp_path / "unused", *PRUNE)).transformer
    layer = result["decision"].keep_layers[-1]
    assert student.dtype == torch.float32
    expected = teacher.transformer_blocks[layer].attn.to_q.weight
    assert torch.equal(student.transformer_blocks[-1].attn.to_q.weight, expected)


def test_gan_stage_accumulates_only_discriminator_loss_gradients(assets, tmp_path):
    """With gradient accumulation the discriminator steps once on the sum of its micro-batch losses' gradients;
    the generator's GAN term sends it none."""
    contributions, at_step, made = [], [], []

    def recording_discriminator(config):
        made.append(PatchDiscriminator(channels=8, num_layers=2))
        made[0].net[-1].weight.register_hook(lambda grad: contributions.append(grad.clone()))
        return made[0]

    def before_step(optimizer, args, kwargs):
        weight = made[0].net[-1].weight if made else None
        if any(p is weight for group in optimizer.param_groups for p in group["params"]):
            at_step.append(weight.grad.clone())

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        train(config_for(assets, "vae_decoder", tmp_path / "out", "hr_size=64", "batch_size=1", "max_steps=1",
                         "gradient_accumulation_steps=2", "lpips_weight=0", "gan_weight=1"),
              discriminator_factory=recording_discriminator)
    finally:
        handle.remove()
    assert len(contributions) == 2  # one backward of the discriminator loss per micro-batch, none from the generator
    assert len(at_step) == 1 and torch.allclose(at_step[0], contributions[0] + contributions[1])


def test_a_new_student_vae_lives_in_the_teachers_latent_space(assets, tmp_path):
    from training.stages.vae import new_student_vae

    config = config_for(assets, "vae_encoder", tmp_path, "student_vae=null")
    teacher = load_teacher(config).vae.config
    vae = new_student_vae(config, load_teacher(config)).config
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (
        teacher.latent_channels, teacher.scaling_factor, teacher.shift_factor)
    assert list(vae.encoder_block_out_channels) == [8, 8, 8, 8]  # vae_config applies on top


def test_pixel_stage_can_encode_with_the_students_own_vae(assets, tmp_path):
    """`student_encodes=true`: the transformer sees the student VAE's latents (as at inference), the target is the
    teacher's estimate from the teacher's own latents."""
    from training.latents import teacher_estimate

    seen = []
    for flag in ("false", "true"):
        config = config_for(assets, "pixel", tmp_path / flag, f"student_encodes={flag}")
        teacher = load_teacher(config)
        stage = STAGE_CLASSES["pixel"](config, teacher)
        model = stage.trainable()
        handle = model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
        hr = torch.stack([random_crop(photo("astronaut"), 64, torch.Generator().manual_seed(0))])
        batch = make_batch(hr, RealESRGANDegradation(), torch.Generator().manual_seed(0))
        with torch.no_grad():
            z_student, z_teacher = stage._latents(model, batch)
            # training takes the teacher VAE's (an AutoencoderKL's) posterior mode, not a sample
            teacher_latents = teacher.vae.encode(batch["lr_up"]).latent_dist.mode() * teacher.vae.config.scaling_factor
            student_latents = stage.student.encode_latents(batch["lr_up"])
        handle.remove()
        torch.testing.assert_close(z_teacher, teacher_estimate(teacher, teacher_latents))
        torch.testing.assert_close(seen[-1], student_latents if flag == "true" else teacher_latents)
    assert not torch.allclose(seen[0], seen[1])  # the two encoders differ


def test_pair_data_trains_image_stages_on_lr_target_pairs(assets, tmp_path):
    """`pair_data`: shards of (LR, target, HR) crops (the peer recipe's targets) replace degraded HR crops: the
    batches are the LR's bicubic upscale and the target with `pair_hr_mix` of the HR, cropped alike."""
    from training.data import PairShardDataset
    from training.latents import make_pair_batch

    rng = np.random.default_rng(0)
    folder = tmp_path / "pairs"
    folder.mkdir()
    for shard in range(2):
        lr = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
        target = lr.repeat(4, axis=1).repeat(4, axis=2)  # each target pixel is its LR pixel: crops must agree
        np.savez(folder / f"shard-{shard:05d}.npz", lr=lr, target=target, hr=255 - target)
    dataset = PairShardDataset(str(folder), 64, seed=1)
    assert len(dataset) == 6
    item = dataset[4]
    assert item["lr"].shape == (3, 16, 16) and item["target"].shape == item["hr"].shape == (3, 64, 64)
    torch.testing.assert_close(item["target"], item["lr"].repeat_interleave(4, 1).repeat_interleave(4, 2))
    batch = make_pair_batch({key: value[None] for key, value in item.items()}, hr_mix=0.25)
    torch.testing.assert_close(batch["hr"][0], (0.75 * item["target"] + 0.25 * item["hr"]) * 2 - 1)
    assert batch["lr_up"].shape == (1, 3, 64, 64)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[4]["lr"], item["lr"])  # another crop in another epoch
    with pytest.raises(ValueError, match="give pair_data or train_data"):
        config_for(assets, "pixel", tmp_path / "bad", f"pair_data={folder}")
    config = load_config([
        "stage=pixel", f"teacher={assets['teacher']}", f"pair_data={folder}", "pair_hr_mix=0.2",
        f"output_dir={tmp_path / 'out'}", "hr_size=64", "batch_size=2", "report_to=none", "lpips_net=alex",
        "sample_steps=0", "learning_rate=1e-3", "lora_rank=0", "seed=3", f"vae_config={TINY_VAE}",
        "keep_layers=[0,2]", f"student_vae={assets['student_vae']}", "max_steps=2", "gan_weight=0",
    ])
    assert train(config)["step"] == 2
