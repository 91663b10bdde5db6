"""training/distill.py used carelessly or against it: no checkpoint pickle runs, another run's folder is refused, a
NaN leaves a good checkpoint, resumed optimiser settings apply, bad numbers, folders and damaged checkpoints get one
line, the export gathers shards."""

import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tests.payloads import Payload
from tests.test_training import PRUNE, _transformer_state, argv_for, config_for, make_assets
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


def _main_error(monkeypatch, config) -> str:
    """What `training/distill.py` prints when it stops on `config`."""
    import training.distill as distill

    monkeypatch.setattr(distill, "load_config", lambda argv: config)
    with pytest.raises(SystemExit) as error:
        main([])
    return str(error.value)


def test_refused_folders_give_one_line(assets, tmp_path, monkeypatch):
    common = ["hr_size=64", "max_steps=1"]
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    assert _main_error(monkeypatch, config_for(assets, "latent", a_file, *common)) == (
        f"error: output_dir {a_file} is a file, not a folder; choose another output_dir.")
    assert a_file.read_text() == "mine"

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "photo.png").write_bytes(b"mine")
    assert _main_error(monkeypatch, config_for(assets, "latent", photos, *common)) == (
        f"error: output_dir {photos} is not empty and has no run.json (contents: photo.png); choose another "
        f"output_dir, or set overwrite_output_dir=true to replace it.")
    assert os.listdir(photos) == ["photo.png"]

    teacher = tmp_path / "teacher"
    shutil.copytree(assets["teacher"], teacher)
    (teacher / "model_index.json").unlink()
    message = _main_error(monkeypatch, config_for(assets, "latent", tmp_path / "out", *common, f"teacher={teacher}"))
    assert message.startswith("error: ") and "model_index.json" in message and "\n" not in message


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_data_byte(path: Path) -> None:
    """Change one byte of the largest tensor in a `torch.save` archive: it still loads, only its CRC tells."""
    with zipfile.ZipFile(path) as archive:
        tensors = [info for info in archive.infolist() if "/data/" in info.filename]
    record = max(tensors, key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    start = record.header_offset  # a zip local header: 30 bytes, then the name and the extra field
    name_length, extra_length = struct.unpack("<HH", data[start + 26:start + 30])
    data[start + 30 + name_length + extra_length] ^= 1
    path.write_bytes(bytes(data))


def _empty(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.mkdir()


EMA_RUN = ["max_steps=4", "checkpointing_steps=2", "hr_size=64", "lora_rank=0", "ema_decay=0.5"]


@pytest.fixture(scope="module")
def ema_run(assets, tmp_path_factory):
    """A 4-step run with EMA (checkpoint-2 and checkpoint-4) and its result."""
    out = tmp_path_factory.mktemp("ema") / "run"
    return out, train(config_for(assets, "latent", out, *EMA_RUN))


@pytest.mark.parametrize("damage, file, problem", [
    (_truncate, "model.safetensors", "model.safetensors: Error while deserializing header"),
    (_truncate, "ema.safetensors", "ema.safetensors: Error while deserializing header"),
    (_truncate, "optimizer.bin", "optimizer.bin: File is not a zip file"),
    (_flip_a_data_byte, "optimizer.bin", "optimizer.bin: its record optimizer/data/"),
    (_truncate, "random_states_0.pkl", "random_states_0.pkl: File is not a zip file"),  # accelerate would skip it
    (Path.unlink, "scheduler.bin", "FileNotFoundError: [Errno 2] No such file or directory: '{checkpoint}/scheduler"),
    (_empty, None, "it holds no files"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_one_before_it(assets, ema_run, tmp_path, monkeypatch, damage,
                                                                   file, problem):
    """Checkpoints are written atomically, so a damaged one was changed since: resuming it stops with one line (no
    traceback, no training from a half-loaded or silently altered state) that names the checkpoint to resume from."""
    out = tmp_path / "damaged"
    shutil.copytree(ema_run[0], out, ignore=shutil.ignore_patterns("final"))
    checkpoint = out / "checkpoint-4"
    damage(checkpoint / file if file else checkpoint)
    message = _main_error(monkeypatch, config_for(assets, "latent", out, *EMA_RUN, "resume_from_checkpoint=latest"))
    assert message.startswith(f"error: Checkpoint {checkpoint} is damaged ({problem.format(checkpoint=checkpoint)}")
    assert message.endswith(f"): resume from the one before it, {out / 'checkpoint-2'}, or delete it and resume "
                            f"from latest.") and "\n" not in message
    # As it says: without checkpoint-4, `latest` resumes checkpoint-2 exactly.
    shutil.rmtree(checkpoint)
    resumed = train(config_for(assets, "latent", out, *EMA_RUN, "resume_from_checkpoint=latest"))
    assert resumed["losses"] == ema_run[1]["losses"][2:]


def test_a_damaged_prune_checkpoint_is_refused(assets, tmp_path):
    """The prune stage (`pruning.MaskLearner`) checks the same way; here its only checkpoint's progress.json."""
    out = tmp_path / "prune"
    train(config_for(assets, "prune", out, *PRUNE, "max_steps=2"))
    checkpoint = out / "checkpoints" / "checkpoint-2"
    (checkpoint / "progress.json").write_text('{"step": 2, "hist')
    with pytest.raises(ValueError, match=f"^Checkpoint {re.escape(str(checkpoint))} is damaged \\(progress.json: "
                                         f"Unterminated string .*\\): there is no earlier one: delete it to start the "
                                         f"run from step 0\\.$"):
        train(config_for(assets, "prune", out, *PRUNE, "max_steps=4", "resume_from_checkpoint=latest"))


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


def test_the_command_reports_a_non_finite_loss_in_one_line(assets, tmp_path, monkeypatch):
    import training.distill as distill

    real = distill.generator_loss
    monkeypatch.setattr(distill, "generator_loss", lambda *a, **k: (lambda loss, terms, outputs: (
        loss * float("nan"), terms, outputs))(*real(*a, **k)))
    argv = argv_for(assets, "latent", tmp_path / "out", "hr_size=64", "max_steps=2")
    with pytest.raises(SystemExit, match=r"^error: .*'loss': nan") as stop:
        main(argv)
    assert "\n" not in str(stop.value)


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
