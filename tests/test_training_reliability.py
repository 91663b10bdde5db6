"""training/distill.py used carelessly or against it: no checkpoint pickle runs, another run's folder is refused, a
NaN leaves a good checkpoint, resumed optimiser settings apply, bad numbers get one line, the export gathers shards."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tests.payloads import Payload
from tests.test_training import _transformer_state, config_for, make_assets
from training.config import load_config
from training.distill import NonFiniteLossError, main, train


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("reliability"))


def test_ema_resume_reads_no_pickle_and_is_exact(assets, tmp_path):
    common = ["max_steps=4", "checkpointing_steps=2", "hr_size=64", "lora_rank=0", "ema_decay=0.5"]
    full = train(config_for(assets, "latent", tmp_path / "full", *common))
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "killed" / "checkpoint-2")
    planted = tmp_path / "killed" / "checkpoint-2" / "custom_checkpoint_0.pkl"
    torch.save(Payload(tmp_path / "pwned"), planted)  # what accelerate's register_for_checkpointing unpickles
    resume = config_for(assets, "latent", tmp_path / "killed", *common, "resume_from_checkpoint=latest")
    with pytest.raises(Exception) as error:
        train(resume)
    assert not (tmp_path / "pwned").exists()
    assert "custom_checkpoint_0.pkl: a pickle, which could run code, is never loaded" in str(error.value)
    planted.unlink()
    assert [path.name for path in planted.parent.glob("*.pkl")] == ["random_states_0.pkl"]  # EMA: ema.safetensors
    resumed = train(resume)
    assert resumed["losses"] == full["losses"][2:]
    expected, actual = _transformer_state(full["export"]), _transformer_state(resumed["export"])  # the EMA weights
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_output_dir_of_another_run_is_refused_unless_overwritten(assets, tmp_path):
    out = tmp_path / "out"
    common = ["hr_size=64", "checkpointing_steps=2"]
    first = train(config_for(assets, "latent", out, *common, "max_steps=2"))
    before = sorted(os.listdir(out))
    with pytest.raises(FileExistsError, match=r"holds another run \(run.json differs in seed: 3 -> 4\); choose "
                                              r"another output_dir, or set overwrite_output_dir=true"):
        train(config_for(assets, "latent", out, *common, "max_steps=2", "seed=4", "resume_from_checkpoint=latest"))
    with pytest.raises(FileExistsError, match="holds checkpoints of this run: resume it"):
        train(config_for(assets, "latent", out, *common, "max_steps=2"))
    assert sorted(os.listdir(out)) == before and len(first["losses"]) == 2

    # The same run, resumed with more steps and another learning rate, goes on under its run id.
    resumed = train(config_for(assets, "latent", out, *common, "max_steps=3", "learning_rate=5e-4",
                               "resume_from_checkpoint=latest"))
    assert (resumed["step"], len(resumed["losses"]), resumed["run_id"]) == (3, 1, first["run_id"])

    # overwrite_output_dir: the previous run's outputs go, other files stay.
    (out / "notes.txt").write_text("mine")
    other = train(config_for(assets, "latent", out, *common, "max_steps=1", "seed=4", "overwrite_output_dir=true"))
    assert other["run_id"] != first["run_id"]
    assert sorted(os.listdir(out)) == ["checkpoint-1", "final", "notes.txt", "run.json"]

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "photo.png").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="is not empty and has no run.json \\(contents: photo.png\\)"):
        train(config_for(assets, "latent", foreign, *common, "max_steps=1", "resume_from_checkpoint=latest"))
    assert os.listdir(foreign) == ["photo.png"]


def test_non_finite_loss_keeps_the_last_checkpoint_with_a_finite_loss(assets, tmp_path, monkeypatch):
    import training.distill as distill

    real, calls = distill.generator_loss, []

    def poisoned(*args, **kwargs):  # step 5, the first on the weights of checkpoint-4, gives NaN
        loss, terms, outputs = real(*args, **kwargs)
        calls.append(None)
        return (loss * float("nan") if len(calls) == 5 else loss), terms, outputs

    out = tmp_path / "out"
    common = ["hr_size=64", "max_steps=6", "checkpointing_steps=2", "checkpoints_total_limit=1"]
    monkeypatch.setattr(distill, "generator_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=f"at step 5 .*'loss': nan.*the last good checkpoint is "
                                                 f"{out / 'checkpoint-2'}\\. Lower the learning rate"):
        train(config_for(assets, "latent", out, *common))
    # checkpoint-2 outlived the limit until checkpoint-4 was good, which it never was: `latest` is checkpoint-2.
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4.nonfinite", "run.json"]
    monkeypatch.setattr(distill, "generator_loss", real)
    resumed = train(config_for(assets, "latent", out, *common, "resume_from_checkpoint=latest"))
    assert resumed["step"] == 6 and len(resumed["losses"]) == 4
    assert sorted(os.listdir(out)) == ["checkpoint-4.nonfinite", "checkpoint-6", "final", "run.json"]


def test_resume_applies_the_configured_learning_rate_and_schedule(assets, tmp_path, caplog):
    out = tmp_path / "out"
    common = ["hr_size=64", "checkpointing_steps=2", "lr_scheduler=linear", "lr_warmup_steps=1"]
    train(config_for(assets, "latent", out, *common, "max_steps=2"))  # learning_rate=1e-3, decayed to 0 at step 2
    used = []
    handle = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: used.append(
        optimizer.param_groups[0]["lr"]))
    try:
        with caplog.at_level("INFO"):
            train(config_for(assets, "latent", out, *common, "max_steps=4", "learning_rate=5e-4",
                             "resume_from_checkpoint=latest"))
    finally:
        handle.remove()
    # 5e-4 on the 4-step schedule: one warm-up step, then linear decay, at steps 3 and 4
    assert used == pytest.approx([5e-4 * 2 / 3, 5e-4 / 3], rel=1e-12)
    assert "Resumed the optimiser with the configured settings" in caplog.text


@pytest.mark.parametrize("argv, message", [
    (["learning_rate=-1e-3"], "learning_rate must not be negative, got -0.001"),
    (["--learning_rate", "-1e-3"], "learning_rate must not be negative, got -0.001"),
    (["learning_rate=.nan"], "learning_rate must be a finite number, got nan"),
    (["max_grad_norm=.inf"], "max_grad_norm must be a finite number, got inf"),
])
def test_bad_numbers_give_one_line(argv, message):
    args = ["--config", str(ROOT / "training/configs/latent.yaml"), *argv]
    with pytest.raises(ValueError) as error:
        load_config(args)
    assert str(error.value) == f"Invalid training configuration: {message}"
    if argv[0].startswith("learning_rate=-"):
        with pytest.raises(SystemExit, match=f"^error: Invalid training configuration: {message}$"):
            main(args)


def test_export_gathers_sharded_weights_through_get_state_dict(assets, tmp_path, monkeypatch):
    """Under FSDP or DeepSpeed a process holds a shard: the export is what `accelerator.get_state_dict` gathers,
    loaded into an unsharded copy. Here the gather is simulated (this process's weights + 1)."""
    import training.distill as distill
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    common = ["hr_size=64", "max_steps=2", "checkpointing_steps=2", "lora_rank=0"]
    plain = _transformer_state(train(config_for(assets, "latent", tmp_path / "plain", *common))["export"])
    monkeypatch.setattr(distill, "SHARDED", (DistributedType.NO,))
    real = Accelerator.get_state_dict
    monkeypatch.setattr(Accelerator, "get_state_dict", lambda self, model, unwrap=True: {
        name: value + 1 for name, value in real(self, model, unwrap).items()})
    gathered = _transformer_state(train(config_for(assets, "latent", tmp_path / "sharded", *common))["export"])
    assert plain.keys() == gathered.keys() and all(torch.equal(gathered[k], plain[k] + 1) for k in plain)
    with pytest.raises(ValueError, match="ema_decay averages whole weights"):
        train(config_for(assets, "latent", tmp_path / "ema", *common, "ema_decay=0.5"))
