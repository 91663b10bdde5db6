"""`tinysr-prune` end to end on a tiny saved teacher and a latent file, and its error messages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import save_file

from pruning.cli import main
from pruning.data import LatentPairDataset, latent_loader
from pruning.masked import MaskedTransformer
from tinysr_diffusers import TinySRTransformer2DModel

from .pruning_models import conditioning, latents, tiny_sd3


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A pipeline-like folder (`transformer/` inside), fixed embeddings and a latent-pair file."""
    root = tmp_path_factory.mktemp("cli")
    teacher = tiny_sd3("sd3.5")
    teacher.save_pretrained(root / "pipeline" / "transformer")
    cond = conditioning(teacher, tokens=3)
    torch.save(cond["encoder_hidden_states"][0], root / "prompt_embeds.pt")
    torch.save(cond["pooled_projections"], root / "pool_embeds.pt")
    x = latents(batch=16, seed=7)
    with torch.no_grad(), MaskedTransformer(teacher, **cond) as masked:
        hr = masked.predict_clean(x)
    save_file({"lr_latents": x, "hr_latents": hr}, root / "latents.safetensors")
    return root


def _embeddings(root):
    return ["--prompt-embeds", str(root / "prompt_embeds.pt"), "--pooled-projections", str(root / "pool_embeds.pt")]


def test_space(capsys):
    assert main(["space", "--layers", "24", "--keep", "12"]) == 0
    out = capsys.readouterr().out
    assert "2,704,156" in out and "46,656 (1.73%)" in out and "314,432 (11.63%)" in out


@pytest.mark.parametrize("block_size", ["0", "-2"])
def test_space_refuses_a_block_size_below_one(capsys, block_size):
    assert main(["space", "--layers", "8", "--keep", "4", "--block-size", block_size]) == 2
    assert capsys.readouterr().err == f"tinysr-prune space: error: The block size must be a positive integer, got " \
                                      f"{block_size}.\n"


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["space", "--help"], ["space", "--layers", "24", "--keep", "12"]],
    ids=["help", "space-help", "space"],
)
def test_space_and_help_import_no_torch(argv):
    """The space sizes are combinatorics: `tinysr-prune space` starts in a fraction of the time torch takes to load.
    A fresh interpreter, since this test process has imported torch long ago."""
    code = (
        "import json, sys\n"
        "from pruning.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(json.dumps([name for name in ('torch', 'diffusers') if name in sys.modules]))"
    )
    result = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_score_learn_export(workspace, capsys):
    root = workspace
    teacher = ["--teacher", str(root / "pipeline")]
    assert (
        main(
            [
                "score",
                *teacher,
                *_embeddings(root),
                "--data",
                str(root / "latents.safetensors"),
                "--method",
                "shortgpt",
                "--keep",
                "4",
                "--batch-size",
                "4",
                "--output",
                str(root / "shortgpt.json"),
            ]
        )
        == 0
    )
    scored = json.loads((root / "shortgpt.json").read_text())
    assert scored["method"] == "shortgpt" and len(scored["keep_layers"]) == 4 and len(scored["scores"]) == 8

    assert (
        main(
            [
                "score",
                *teacher,
                "--data",
                str(root / "latents.safetensors"),
                "--method",
                "random-min",
                "--option",
                "num_candidates=3",
                "--keep",
                "3",
                "--num-batches",
                "1",
                "--output",
                str(root / "random.json"),
            ]
        )
        == 0
    )
    assert len(json.loads((root / "random.json").read_text())["details"]["candidates"]) == 3

    run = root / "learn"
    args = [
        "learn",
        *teacher,
        *_embeddings(root),
        "--data",
        str(root / "latents.safetensors"),
        "--keep",
        "4",
        "--max-steps",
        "4",
        "--batch-size",
        "4",
        "--lora-rank",
        "2",
        "--log-every",
        "2",
        "--checkpointing-steps",
        "2",
        "--output-dir",
        str(run),
    ]
    assert main(args) == 0
    learned = json.loads((run / "pruning.json").read_text())
    assert learned["method"] == "tinysr" and (run / "keep_probabilities.png").is_file()
    assert (run / "checkpoints" / "checkpoint-4" / "gates.safetensors").is_file()
    assert main(args[:-1] + [str(run), "--resume-from", "latest"]) == 0  # already done: resumes at step 4, stops

    assert main(["export", *teacher, "--decision", str(run / "pruning.json"), "--output", str(root / "sd3")]) == 0
    pruned, info = SD3Transformer2DModel.from_pretrained(root / "sd3", output_loading_info=True)
    assert pruned.config.num_layers == 4 and not any(info.values())
    assert (
        main(
            [
                "export",
                *teacher,
                "--keep-layers",
                "0,2,5",
                "--format",
                "tinysr",
                "--pooled-projections",
                str(root / "pool_embeds.pt"),
                "--output",
                str(root / "student"),
            ]
        )
        == 0
    )
    assert TinySRTransformer2DModel.from_pretrained(root / "student").config.source_layers == [0, 2, 5]
    assert main(["export", *teacher, "--mask", "1,0,0,1,0,0,0,1", "--output", str(root / "masked")]) == 0
    assert json.loads((root / "masked" / "pruning.json").read_text())["keep_layers"] == [0, 3, 7]
    assert "Exported" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["learn", "--keep", "5"], "impossible with blocks of 4"),
        (["export", "--mask", "1,0,1"], "The mask has 3 entries but the transformer has 8 layers"),
        (["export", "--keep-layers", "0,9"], "out of range"),
        (["export"], "exactly one of --decision, --keep-layers or --mask"),
        (["score", "--method", "tinysr", "--keep", "3"], "impossible with blocks of 4"),
        (
            [
                "score",
                "--method",
                "tinysr",
                "--keep",
                "4",
                "--option",
                "max_steps=2",
                "--option",
                "lora_rank=2",
                "--option",
                "block_size=3",
            ],
            "impossible with blocks of 3",
        ),
        (
            ["score", "--method", "shortgpt", "--keep", "4", "--prompt-embeds", "missing.pt"],
            "missing.pt does not exist",
        ),
        (["score", "--method", "shortgpt", "--keep", "9"], "Cannot keep 9 of 8 layers"),
        (["score", "--method", "shortgpt", "--keep", "4", "--option", "steps=3"], "Invalid options ['steps']"),
        (["score", "--method", "tinysr", "--keep", "4", "--option", "steps=3"], "Unknown tinysr options ['steps']"),
        (["score", "--method", "shortgpt", "--keep", "4", "--num-batches", "0"], "--num-batches must be positive"),
    ],
)
def test_clear_errors(workspace, capsys, args, message):
    root = workspace
    command, rest = args[0], args[1:]
    extra = {
        "learn": ["--data", str(root / "latents.safetensors"), "--output-dir", str(root / "unused")],
        "export": ["--output", str(root / "unused")],
        "score": ["--data", str(root / "latents.safetensors"), "--output", str(root / "unused.json")],
    }[command]
    assert main([command, "--teacher", str(root / "pipeline"), *rest, *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("keep", [[0.5, 1], [True, False], ["0", "1"]])
def test_export_refuses_a_decision_whose_layers_are_not_integers(workspace, capsys, tmp_path, keep):
    decision = tmp_path / "pruning.json"
    decision.write_text(json.dumps({"method": "manual", "num_layers": 8, "keep_layers": keep}))
    output = tmp_path / "out"
    assert main(["export", "--teacher", str(workspace / "pipeline"), "--decision", str(decision),
                 "--output", str(output)]) == 2
    assert capsys.readouterr().err == (f"tinysr-prune export: error: `keep_layers` must be a list of integers, got "
                                       f"{keep!r}.\n")
    assert not output.exists()


def test_teacher_and_method_errors(workspace, capsys, tmp_path):
    data = ["--data", str(workspace / "latents.safetensors")]
    assert (
        main(
            [
                "score",
                "--teacher",
                str(tmp_path / "nowhere"),
                *data,
                "--method",
                "shortgpt",
                "--keep",
                "4",
                "--output",
                "x.json",
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    # A relative path that does not exist reads like a Hub repo id; offline, the Hub cannot be reached: one clear line.
    export = ["export", "--keep-layers", "0", "--output", str(tmp_path / "o")]
    assert main(["export", "--teacher", "runs/missing", *export[1:]]) == 2
    error = capsys.readouterr().err
    assert "--teacher 'runs/missing' is not a local folder and could not be loaded from the Hub" in error
    assert main(["export", "--teacher", str(tmp_path), "--keep-layers", "0", "--output", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            [
                "score",
                "--teacher",
                str(workspace / "pipeline"),
                *data,
                "--method",
                "magic",
                "--keep",
                "4",
                "--output",
                "x.json",
            ]
        )
    assert "invalid choice: 'magic'" in capsys.readouterr().err


def test_latent_data_reader(tmp_path):
    x, y = latents(batch=5, seed=1), latents(batch=5, seed=2)
    save_file({"lr_latents": x[:3], "hr_latents": y[:3]}, tmp_path / "a.safetensors")
    save_file({"lr_latents": x[3:], "hr_latents": y[3:]}, tmp_path / "b.safetensors")
    dataset = LatentPairDataset(tmp_path)
    assert (
        len(dataset) == 5
        and torch.equal(dataset[4]["hr_latents"], y[4])
        and torch.equal(dataset[1]["lr_latents"], x[1])
    )
    assert len(list(latent_loader(tmp_path, batch_size=2))) == 2
    save_file({"lr_latents": x}, tmp_path / "c.safetensors")
    with pytest.raises(KeyError, match="hr_latents"):
        LatentPairDataset(tmp_path)


@pytest.mark.slow
def test_learn_with_two_processes(workspace, tmp_path):
    """`accelerate launch` with two processes (gloo DDP on CPU): both train, rank 0 writes the decision."""
    root = workspace
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "pruning.cli",
        "learn",
        "--teacher",
        str(root / "pipeline"),
        "--data",
        str(root / "latents.safetensors"),
        "--keep",
        "4",
        "--max-steps",
        "4",
        "--batch-size",
        "2",
        "--lora-rank",
        "2",
        "--log-every",
        "2",
        "--checkpointing-steps",
        "4",
        "--output-dir",
        str(tmp_path / "ddp"),
    ]
    # no ACCELERATE_USE_CPU: without a GPU the learner asks accelerate for a gloo (MULTI_CPU) group itself
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("tinysr: keep") == 1  # one main process
    decision = json.loads((tmp_path / "ddp" / "pruning.json").read_text())
    assert len(decision["keep_layers"]) == 4
    checkpoint = tmp_path / "ddp" / "checkpoints" / "checkpoint-4"
    assert {"random_states_0.pkl", "random_states_1.pkl", "gates.safetensors"} <= {
        p.name for p in checkpoint.iterdir()
    }


def test_perceptual_loss_through_a_vae(workspace, tmp_path):
    """`--loss l1_perceptual --perceptual-loss module:callable --vae DIR`: latents decoded by the VAE, then compared."""
    from tinysr_diffusers import TinySRAutoencoder

    torch.manual_seed(0)
    small = dict(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4, num_encoder_blocks=(1,) * 4)
    TinySRAutoencoder(latent_channels=4, num_decoder_blocks=(1,) * 4, **small).save_pretrained(tmp_path / "vae")
    module = tmp_path / "toy_perceptual.py"
    module.write_text(
        "import torch\n\ncalls = []\n\ndef distance(a, b):\n    calls.append(a.shape)\n    return (a - b).abs().mean()\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        args = [
            "learn",
            "--teacher",
            str(workspace / "pipeline"),
            "--data",
            str(workspace / "latents.safetensors"),
            "--keep",
            "4",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--lora-rank",
            "2",
            "--loss",
            "l1_perceptual",
            "--perceptual-loss",
            "toy_perceptual:distance",
            "--vae",
            str(tmp_path / "vae"),
            "--output-dir",
            str(tmp_path / "run"),
        ]
        assert main(args) == 0
        import toy_perceptual

        # once per step, against the HR target only (the authors' loss), on decoded RGB images
        assert len(toy_perceptual.calls) == 2 and toy_perceptual.calls[0][1] == 3
        assert main(args[:-1] + [str(tmp_path / "other"), "--perceptual-loss", "toy_perceptual"]) == 2
    finally:
        sys.path.remove(str(tmp_path))


def test_a_tsdsr_pipeline_teacher_brings_its_stored_prompt(tmp_path, capsys):
    from pruning.cli import _conditioning, build_parser, load_teacher
    from tests.tiny_pipelines import tiny_teacher

    pipeline = tiny_teacher()
    pipeline.save_pretrained(tmp_path / "tsdsr")
    args = build_parser().parse_args(
        ["score", "--teacher", str(tmp_path / "tsdsr"), "--data", "unused", "--method", "shortgpt", "--keep", "2",
         "--output", "unused.json"]
    )
    teacher = load_teacher(args)
    conditioning = _conditioning(args, teacher)
    prompt, pooled = pipeline.prompt_embeddings(1)
    assert torch.equal(conditioning["encoder_hidden_states"], prompt)
    assert torch.equal(conditioning["pooled_projections"], pooled)
    assert "prompt embeddings stored in" in capsys.readouterr().err
    # explicit embeddings win; a bare transformer folder has no stored prompt
    torch.save(torch.zeros_like(pooled[0]), tmp_path / "pooled.pt")
    args.pooled_projections = str(tmp_path / "pooled.pt")
    assert torch.equal(_conditioning(args, teacher)["pooled_projections"], torch.zeros_like(pooled[0]))
    args.pooled_projections, args.teacher = None, str(tmp_path / "tsdsr" / "transformer")
    assert _conditioning(args, teacher)["encoder_hidden_states"] is None


def test_score_and_learn_in_bfloat16(workspace, tmp_path):
    """float32 cached latents feed a model loaded with --dtype bfloat16."""
    common = ["--teacher", str(workspace / "pipeline"), "--dtype", "bfloat16", *_embeddings(workspace),
              "--data", str(workspace / "latents.safetensors"), "--keep", "4"]
    assert main(["score", *common, "--method", "shortgpt", "--output", str(tmp_path / "shortgpt.json")]) == 0
    assert len(json.loads((tmp_path / "shortgpt.json").read_text())["keep_layers"]) == 4
    assert main(["learn", *common, "--max-steps", "2", "--lora-rank", "2", "--output-dir", str(tmp_path / "run")]) == 0
    assert len(json.loads((tmp_path / "run" / "pruning.json").read_text())["keep_layers"]) == 4
