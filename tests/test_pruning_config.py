"""One MaskLearnerConfig: `tinysr-prune learn` and the training prune stage build the same one from the same input."""

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from pruning.cli import build_parser, learner_config
from pruning.config import DEFAULT_LORA_TARGETS, MaskLearnerConfig
from training.config import PRUNE_RUN_SETTINGS, load_config


ROOT = Path(__file__).resolve().parents[1]
CLI_REQUIRED = ["learn", "--teacher", "t", "--data", "d", "--output-dir", "o"]
TRAINING_REQUIRED = ["stage=prune", "teacher=t", "train_data=[x]"]
# The run's own settings, given to each entry point under its own names.
CLI_RUN = ["--max-steps", "7", "--learning-rate", "1e-3", "--weight-decay", "0.01", "--max-grad-norm", "0.5",
           "--lora-rank", "4", "--seed", "3", "--log-every", "2", "--checkpointing-steps", "5",
           "--checkpoints-total-limit", "2", "--report-to", "tensorboard"]
TRAINING_RUN = ["max_steps=7", "learning_rate=1e-3", "weight_decay=0.01", "max_grad_norm=0.5", "lora_rank=4",
                "seed=3", "logging_steps=2", "checkpointing_steps=5", "checkpoints_total_limit=2",
                "report_to=tensorboard"]
SEARCH = {  # every field of the search, set to something other than its default: (command line, training)
    "keep": (["--keep", "4"], ["prune.keep=4"]),
    "block_size": (["--block-size", "2"], ["prune.block_size=2"]),
    "search": (["--search", "tinyfusion"], ["prune.search=tinyfusion"]),
    "delta": (["--delta", "2"], ["prune.delta=2"]),
    "gate_learning_rate": (["--gate-learning-rate", "1e-2"], ["prune.gate_learning_rate=1e-2"]),
    "lora_alpha": (["--lora-alpha", "8"], ["prune.lora_alpha=8"]),
    "lora_target_modules": (["--lora-target-modules", "to_q", "to_v"], ["prune.lora_target_modules=[to_q, to_v]"]),
    "tau": (["--tau", "2", "0.5"], ["prune.tau=[2, 0.5]"]),
    "scale": (["--scale", "10", "50"], ["prune.scale=[10, 50]"]),
    "ema_decay": (["--ema-decay", "0.9"], ["prune.ema_decay=0.9"]),
    "skip_pruned_layers": (["--skip-pruned-layers"], ["prune.skip_pruned_layers=true"]),
    "next_rule": (["--next-rule", "marginal"], ["prune.next_rule=marginal"]),
    "per_sample_masks": (["--per-batch-masks"], ["prune.per_sample_masks=false"]),
    "loss": (["--loss", "l1_perceptual"], ["prune.loss=l1_perceptual"]),
    "task_weight": (["--task-weight", "0.5"], ["prune.task_weight=0.5"]),
    "distill_weight": (["--distill-weight", "2"], ["prune.distill_weight=2"]),
    "perceptual_weight": (["--perceptual-weight", "0.25"], ["prune.perceptual_weight=0.25"]),
}


def _both(cli: list, training: list) -> tuple[MaskLearnerConfig, MaskLearnerConfig]:
    command = learner_config(build_parser().parse_args([*CLI_REQUIRED, *CLI_RUN, *cli]))
    stage = load_config([*TRAINING_REQUIRED, *TRAINING_RUN, *training]).mask_learner_config()
    return command, stage


def test_every_field_has_one_home_in_each_entry_point():
    assert set(SEARCH) | set(PRUNE_RUN_SETTINGS) == {spec.name for spec in fields(MaskLearnerConfig)}
    assert not set(SEARCH) & set(PRUNE_RUN_SETTINGS)


def test_learn_and_the_prune_stage_share_the_search_defaults():
    command, stage = _both(["--keep", "4"], ["prune.keep=4"])
    assert command == stage
    assert command.lora_target_modules == DEFAULT_LORA_TARGETS  # the authors' prune list, adaLN `linear` included
    defaults = MaskLearnerConfig(keep=4)
    assert all(getattr(command, name) == getattr(defaults, name) for name in SEARCH)


def test_learn_and_the_prune_stage_build_the_same_config_from_the_same_settings():
    command, stage = _both(sum((cli for cli, _ in SEARCH.values()), []), sum((t for _, t in SEARCH.values()), []))
    assert command == stage
    defaults = MaskLearnerConfig(keep=1, search="tinyfusion")  # whose default is one mask per sample
    assert [name for name in SEARCH if getattr(command, name) == getattr(defaults, name)] == ["search"]
    assert (command.max_steps, command.log_every, command.report_to, command.gate_learning_rate) == (
        7, 2, "tensorboard", 1e-2)


def test_the_stage_yaml_is_the_command_lines_search():
    stage = load_config(["--config", str(ROOT / "training/configs/prune.yaml"), "report_to=none"])
    command = learner_config(build_parser().parse_args(
        [*CLI_REQUIRED, "--keep", "12", "--max-steps", "100000", "--learning-rate", "5e-5", "--checkpointing-steps",
         "2000", "--log-every", "100"]))
    assert stage.mask_learner_config() == command


def test_the_prune_section_refuses_the_runs_settings_and_unknown_keys(tmp_path):
    def load(section: str):
        path = tmp_path / "prune.yaml"
        path.write_text(f"stage: prune\nteacher: t\ntrain_data: [x]\nprune: {section}\n")
        return load_config(["--config", str(path)])

    with pytest.raises(ValueError, match=r"prune.log_every \(set logging_steps\), prune.max_steps \(set max_steps\)"):
        load("{keep: 4, max_steps: 3, log_every: 2}")
    with pytest.raises(ValueError, match=r"Unknown mask-learning settings \['gates'\]"):
        load("{keep: 4, gates: 2}")
    with pytest.raises(ValueError, match="needs `keep`"):
        load("{}")
    with pytest.raises(ValueError, match=r"prune: `tau` must be \(start, end\), got \[1, 2, 3\]"):
        load("{keep: 4, tau: [1, 2, 3]}")
    with pytest.raises(ValueError, match="prune.ema_decay: expected float"):
        load("{keep: 4, ema_decay: high}")
    with pytest.raises(ValueError, match="prune must be a mapping"):
        load("4")
    assert load("{keep: 4, gate_learning_rate: 1e-2}").mask_learner_config().gate_learning_rate == 0.01  # YAML 1.1


def test_the_config_module_imports_no_torch():
    """Loaded on its own (the `pruning` package's `__init__` is not this module's to make light)."""
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('config', 'pruning/config.py'); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); print(sorted({'torch', 'diffusers'} & "
            "set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
