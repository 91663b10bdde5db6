"""The training configuration: one dataclass, loaded from a stage's YAML, overridable from the command line.

Every field is a command-line option (`--key value` or `key=value`); the fields of two sections are
`degradation.<field>` (the Real-ESRGAN degradation, `DegradationConfig`) and `prune.<field>` (the prune stage's
search, `pruning.config.MaskLearnerConfig`). Values are parsed as YAML (`keep_layers=[0,2,5]`) and coerced to the
field's type, so `learning_rate=1e-4` is a float even though YAML 1.1 reads it as a string.
"""

import argparse
import math
import sys
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Optional, Sequence

import yaml

from pruning.config import MaskLearnerConfig
from tinysr_diffusers.training_utils.degradations import DegradationConfig


STAGES = ("teacher", "vae_encoder", "vae_decoder", "prune", "latent", "pixel")
LATENT_STAGES = ("teacher", "prune", "latent")  # the stages that can train from a latent cache
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")
# What a resume may change and still be the same run: its length, the optimiser's settings (applied over the
# checkpoint's) and bookkeeping. Every other setting (models, data, crops, batch, seed, losses, LoRA, EMA, pruning,
# degradation, precision) defines the run.
RESUMABLE_SETTINGS = (
    "max_steps", "learning_rate", "disc_learning_rate", "prune.gate_learning_rate", "lr_scheduler", "lr_warmup_steps",
    "weight_decay", "max_grad_norm", "num_workers", "output_dir", "resume_from_checkpoint", "overwrite_output_dir",
    "checkpointing_steps", "checkpoints_total_limit", "logging_steps", "sample_steps", "report_to",
    "cache_epochs", "cache_shard_size", "cache_teacher_latents",
)
# The fields of a MaskLearnerConfig that are the training run's own settings (field -> TrainConfig field): the prune
# stage takes them from the run, and its `prune` section holds every other field.
PRUNE_RUN_SETTINGS = {
    "max_steps": "max_steps", "learning_rate": "learning_rate", "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm", "lora_rank": "lora_rank", "seed": "seed", "log_every": "logging_steps",
    "checkpointing_steps": "checkpointing_steps", "checkpoints_total_limit": "checkpoints_total_limit",
    "report_to": "report_to",
}  # fmt: skip
SECTIONS = {"degradation": DegradationConfig, "prune": MaskLearnerConfig}


def _help(text: str, default: Any = MISSING, **kwargs):
    return field(default=default, metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """All settings of `training/distill.py`; the stage YAMLs in `training/configs/` hold the paper's values."""

    stage: str = _help(f"Training stage, one of {STAGES}.", None)
    teacher: str = _help("Folder (or Hub id) of the TSDSRPipeline teacher.", None)
    student: Optional[str] = _help("TinySRPipeline folder to start from (the pruning export); default: prune the "
                                   "teacher to `keep_layers` with TinySRPipeline.from_teacher.", None)
    keep_layers: Optional[list] = _help("Teacher blocks the student keeps when `student` is not given.", None)
    student_vae: Optional[str] = _help("TinySRAutoencoder folder for the student; default: a new one built from "
                                       "`vae_config` (vae stages) or the student pipeline's VAE.", None)
    vae_config: dict = _help("TinySRAutoencoder config for a new student VAE (latent channels follow the teacher).",
                             None, )
    output_dir: str = _help("Where checkpoints, logs and the exported model go.", "tinysr-training")

    train_data: Optional[list] = _help("Local image folders (searched recursively).", None)
    dataset_name: Optional[str] = _help("A `datasets` image dataset (name or path) instead of folders.", None)
    pair_data: Optional[str] = _help("A folder of (LR, target, HR) crop shards (`python -m training.recipes.peer`'s "
                                     "targets): image stages learn to map each LR to its target instead of degrading "
                                     "HR crops.", None)
    pair_hr_mix: float = _help("pair_data: the fraction of the HR crop mixed into each target (pixel space).", 0.0)
    dataset_config: Optional[str] = _help("Configuration name of `dataset_name`.", None)
    dataset_split: str = _help("Split of `dataset_name`.", "train")
    image_column: str = _help("Image column of `dataset_name`.", "image")
    dataset_streaming: bool = _help("Stream `dataset_name` instead of downloading it first; a resume then re-reads "
                                    "the stream up to the checkpoint.", False)
    latent_cache: Optional[str] = _help("Folder of pre-encoded latents (`training/cache_latents.py`): the prune and "
                                        "latent stages train from it instead of images. For cache_latents.py: the "
                                        "folder to write.", None)
    cache_epochs: int = _help("cache_latents.py: passes over the images (new crops and degradations each).", 1)
    cache_shard_size: int = _help("cache_latents.py: samples per safetensors shard.", 1024)
    cache_teacher_latents: bool = _help("cache_latents.py: also store the teacher transformer's estimates; false "
                                        "for a cache of VAE latents only (the teacher stage's, or one that serves "
                                        "every teacher on the same VAE: the estimates are then computed per step).",
                                        True)
    hr_size: int = _help("Side of the random HR crops (LR crops are hr_size / 4).", 512)
    num_workers: int = _help("DataLoader worker processes.", 0)

    batch_size: int = _help("Batch size per process.", 8)
    gradient_accumulation_steps: int = _help("Batches accumulated per optimizer step.", 1)
    max_steps: int = _help("Optimizer steps to train.", 1000)
    learning_rate: float = _help("AdamW learning rate of the student.", 1e-4)
    lr_scheduler: str = _help(f"Learning-rate schedule of the student, one of {LR_SCHEDULERS} (diffusers' "
                              "get_scheduler); the prune stage takes only constant.", "constant")
    lr_warmup_steps: int = _help("Warm-up steps of lr_scheduler.", 0)
    disc_learning_rate: float = _help("AdamW learning rate of the discriminator (GAN stages).", 5e-6)
    weight_decay: float = _help("AdamW weight decay.", 1e-2)
    max_grad_norm: float = _help("Gradient clipping norm (0 disables).", 1.0)
    mixed_precision: str = _help(f"One of {MIXED_PRECISION}; `accelerate launch --mixed_precision` overrides.", "no")
    cast_teacher: bool = _help("Keep the frozen teacher transformer in the mixed-precision dtype (fp16/bf16) to halve "
                               "its memory; false keeps it in float32.", True)
    seed: int = _help("Seed of initialisation, crops, shuffling and degradations.", 80)

    lora_rank: int = _help("LoRA rank of the student transformer (peft); 0 = full fine-tuning.", 64)
    lora_target_modules: list = _help("Module names that get LoRA adapters (the prune stage's are "
                                      "prune.lora_target_modules).", None)
    ema_decay: float = _help("EMA decay of the trained weights (0 disables); the export uses the EMA weights.", 0.0)

    latent_weight: float = _help("Weight of the latent MSE (distillation, or L2 for vae_decoder).", 1.0)
    lpips_weight: float = _help("Weight of the LPIPS loss (pixel, vae_decoder).", 0.0)
    gan_weight: float = _help("Weight of the generator's GAN loss (pixel, vae_decoder).", 0.0)
    lpips_net: str = _help("LPIPS backbone: alex or vgg.", "vgg")
    pixel_weight: float = _help("teacher, pixel: weight of the MSE between the decoded outputs and their targets (PSNR "
                                "lives in pixel space: a latent MSE alone can lower it).", 0.0)
    decode_crop: int = _help("teacher: the LPIPS and pixel terms decode a random square window of this many latent "
                             "pixels per sample (with a 2-pixel margin); 0 decodes whole latents.", 0)
    decode_samples: int = _help("teacher: the LPIPS and pixel terms decode the first N samples of a batch (0: all).", 0)
    disc_channels: int = _help("Width of the first PatchGAN discriminator layer.", 64)
    disc_layers: int = _help("Strided layers of the PatchGAN discriminator.", 3)

    student_encodes: bool = _help("pixel: the student's own VAE encodes the LR input (as at inference), so the "
                                  "transformer learns around its encoder's errors; the target stays the teacher's "
                                  "estimate from the teacher's latents. False: both from the teacher's latents.", False)

    checkpointing_steps: int = _help("Save the full training state every N optimizer steps.", 1000)
    checkpoints_total_limit: Optional[int] = _help("Keep at most this many checkpoints (None keeps all).", None)
    resume_from_checkpoint: Optional[str] = _help("A checkpoint folder, or `latest` in output_dir. The settings a "
                                                  "resume may change (the rest define the run, see training/run.py "
                                                  f"`claim_output_dir`): {RESUMABLE_SETTINGS}.", None)
    overwrite_output_dir: bool = _help("Train into an output_dir that holds another run: its checkpoints, logs and "
                                       "export are deleted first.", False)
    logging_steps: int = _help("Log losses every N steps.", 10)
    sample_steps: int = _help("Log sample images every N steps (0 disables).", 500)
    report_to: str = _help("accelerate tracker (tensorboard) or `none`.", "tensorboard")

    degradation: dict = _help("Real-ESRGAN degradation parameters (fields of DegradationConfig).", None)
    prune: dict = _help("prune: the search, fields of pruning.MaskLearnerConfig (`keep` required) but the run's own "
                        f"settings {sorted(PRUNE_RUN_SETTINGS)}, which come from this config's "
                        f"{sorted(set(PRUNE_RUN_SETTINGS.values()))}.", None)

    def __post_init__(self):
        self.vae_config = dict(self.vae_config or {})
        self.degradation = dict(self.degradation or {})
        self.prune = dict(self.prune or {})
        if self.lora_target_modules is None:
            self.lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]

    def validate(self) -> "TrainConfig":
        """Raise a ValueError naming every problem of the configuration."""
        problems = [f"{spec.name} must be a finite number, got {getattr(self, spec.name)}" for spec in fields(self)
                    if isinstance(getattr(self, spec.name), float) and not math.isfinite(getattr(self, spec.name))]
        if self.stage not in STAGES:
            problems.append(f"stage must be one of {STAGES}, got {self.stage!r}")
        if not self.teacher:
            problems.append("teacher (a TSDSRPipeline folder) is required")
        from_cache = bool(self.latent_cache) and self.stage in LATENT_STAGES
        if not from_cache and not self.train_data and not self.dataset_name and not self.pair_data:
            problems.append("give train_data (image folders), dataset_name or pair_data"
                            + (f", or latent_cache for the {self.stage} stage" if self.stage in LATENT_STAGES else ""))
        if not 0 <= self.pair_hr_mix <= 1:
            problems.append(f"pair_hr_mix must be in [0, 1], got {self.pair_hr_mix}")
        if self.pair_data and (self.train_data or self.dataset_name):
            problems.append("give pair_data or train_data / dataset_name, not both")
        if self.dataset_streaming and not self.dataset_name:
            problems.append("dataset_streaming needs dataset_name")
        if self.hr_size <= 0 or self.hr_size % 64:
            problems.append(f"hr_size must be a positive multiple of 64, got {self.hr_size}")
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "checkpointing_steps",
                     "logging_steps"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("learning_rate", "disc_learning_rate", "lora_rank", "sample_steps", "latent_weight",
                     "lpips_weight", "gan_weight", "max_grad_norm", "weight_decay", "num_workers", "decode_crop",
                     "pixel_weight", "decode_samples"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            problems.append(f"lr_scheduler must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.lr_warmup_steps < 0:
            problems.append(f"lr_warmup_steps must not be negative, got {self.lr_warmup_steps}")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.lpips_net not in ("alex", "vgg"):
            problems.append(f"lpips_net must be alex or vgg, got {self.lpips_net!r}")
        if self.stage in ("latent", "pixel") and not self.student and self.keep_layers is None:
            problems.append("the student needs `student` (a TinySRPipeline folder) or `keep_layers`")
        if self.stage == "prune":
            problems += self._prune_problems()
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit <= 0:
            problems.append(f"checkpoints_total_limit must be positive (or null to keep all), got "
                            f"{self.checkpoints_total_limit}")
        for name in ("cache_epochs", "cache_shard_size"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        try:
            DegradationConfig.from_dict(self.degradation)
        except (TypeError, ValueError) as error:
            problems.append(f"degradation: {error}")
        if len(problems) == 1:
            raise ValueError(f"Invalid training configuration: {problems[0]}")
        if problems:
            raise ValueError("Invalid training configuration:\n  - " + "\n  - ".join(problems))
        return self

    def mask_learner_config(self) -> MaskLearnerConfig:
        """The prune stage's search: the `prune` section, and this run's own settings (`PRUNE_RUN_SETTINGS`)."""
        misplaced = sorted(set(self.prune) & set(PRUNE_RUN_SETTINGS))
        if misplaced:
            names = ", ".join(f"prune.{name} (set {PRUNE_RUN_SETTINGS[name]})" for name in misplaced)
            raise ValueError(f"the run's own settings do not go into the prune section: {names}")
        run = {name: getattr(self, key) for name, key in PRUNE_RUN_SETTINGS.items()}
        run["report_to"] = None if self.report_to == "none" else self.report_to
        return MaskLearnerConfig.from_dict({**self.prune, **run})

    def _prune_problems(self) -> list[str]:
        problems = []
        try:
            self.mask_learner_config()
        except (TypeError, ValueError) as error:
            problems.append(f"prune: {error}")
        if self.gradient_accumulation_steps != 1:
            problems.append("the prune stage takes one batch per step: set gradient_accumulation_steps=1")
        if self.ema_decay:
            problems.append("ema_decay averages trained weights; the prune stage's gates use prune.ema_decay")
        if self.lr_scheduler != "constant" or self.lr_warmup_steps:
            problems.append("the prune stage's gates follow the tau/scale schedules: keep lr_scheduler=constant and "
                            "lr_warmup_steps=0")
        if not self.lora_rank:
            problems.append("the prune stage trains LoRA adapters with the gates: lora_rank must be positive")
        return problems

    def to_dict(self) -> dict:
        return asdict(self)


def _field_names(cls) -> set[str]:
    return {spec.name for spec in fields(cls)}


def _field_type(cls, name: str):
    hint = typing.get_type_hints(cls)[name]
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union else hint


def _coerce(value: Any, kind, name: str) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(kind) or kind
    try:
        if origin is bool:
            if isinstance(value, str):
                raise ValueError
            return bool(value)
        if origin is str and isinstance(value, bool):  # YAML 1.1 reads `no` / `yes` as booleans
            return "yes" if value else "no"
        if origin in (int, float, str):
            if origin is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return origin(value)
        if origin in (list, tuple):
            if not isinstance(value, (list, tuple)):
                value = [value]
            return list(value)
        if origin is dict and not isinstance(value, dict):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {getattr(kind, '__name__', kind)}, got {value!r}") from None
    return value


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accelerate launch training/distill.py",
        allow_abbrev=False,  # `ema=0.5` must not silently set ema_decay
        description="Train a TinySR stage (training/README.md). Options override the --config YAML; `key=value` works "
        "like `--key value`; values are YAML (`keep_layers=[0,2]`, `student=null`). Stages: vae_encoder, vae_decoder, "
        "prune (mask learning with the pruning package), latent (stage 1), pixel (stage 2).",
    )
    parser.add_argument("--config", help="Stage YAML, e.g. training/configs/latent.yaml.")
    for spec in fields(TrainConfig):
        if spec.name in SECTIONS:
            continue
        default = spec.default if spec.default is not MISSING else None
        parser.add_argument(f"--{spec.name}", default=argparse.SUPPRESS, metavar="VALUE",
                            help=f"{spec.metadata['help']} (default: {default!r})")
    for spec in fields(DegradationConfig):
        parser.add_argument(f"--degradation.{spec.name}", default=argparse.SUPPRESS, metavar="VALUE",
                            help=f"Real-ESRGAN degradation (default: {spec.default!r})")
    for spec in fields(MaskLearnerConfig):
        if spec.name not in PRUNE_RUN_SETTINGS:
            default = "required" if spec.default is MISSING else f"default: {spec.default!r}"
            parser.add_argument(f"--prune.{spec.name}", default=argparse.SUPPRESS, metavar="VALUE",
                                help=f"prune: mask learning, see pruning.MaskLearnerConfig ({default})")
    return parser


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _normalise_argv(argv: Sequence[str]) -> list[str]:
    """`key=value` -> `--key=value`; `--key=value` stays for argparse, and so does the value after a `--key`
    (`--output_dir runs/lr=1e-4`). A negative number after a `--key` is joined to it (`--key=-1e-3`): argparse would
    read `-1e-3` as an option and report the value missing."""
    out = []
    for token in argv:
        is_value = bool(out) and out[-1].startswith("--") and "=" not in out[-1]
        if is_value and token.startswith("-") and _is_number(token):
            out[-1] += f"={token}"
        elif not is_value and not token.startswith("-") and "=" in token:
            key, value = token.split("=", 1)
            out.append(f"--{key}={value}")
        else:
            out.append(token)
    return out


def load_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """The config of a command line: the `--config` YAML, then the overrides, validated."""
    parser = build_parser()
    args = vars(parser.parse_args(_normalise_argv(sys.argv[1:] if argv is None else argv)))
    values: dict = {}
    path = args.pop("config", None)
    if path:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(values).__name__}.")
    known = {spec.name for spec in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}; see --help.")
    for section in SECTIONS:
        given = values.get(section) or {}
        if not isinstance(given, dict):
            raise ValueError(f"{path}: {section} must be a mapping of settings, got {given!r}.")
        values[section] = dict(given)
    for key, text in args.items():
        section, _, name = key.rpartition(".")
        target, cls = (values[section], SECTIONS[section]) if section else (values, TrainConfig)
        target[name] = _parse_value(text)
        if isinstance(target[name], bool) and name in _field_names(cls) and _field_type(cls, name) is str:
            target[name] = text  # as written: `mixed_precision=no` is the string "no", not YAML 1.1's False
    for key in list(values):
        if key not in SECTIONS:
            values[key] = _coerce(values[key], _field_type(TrainConfig, key), key)
    prune = values["prune"]  # the degradation's own from_dict reads its values; unknown keys are reported later
    for name in set(prune) & _field_names(MaskLearnerConfig):
        prune[name] = _coerce(prune[name], _field_type(MaskLearnerConfig, name), f"prune.{name}")
    return TrainConfig(**values).validate()
