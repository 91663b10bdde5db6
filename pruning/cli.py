"""`tinysr-prune`: score layers with a pruning method, learn a TinySR/TinyFusion mask, export the pruned transformer.

    tinysr-prune space --layers 24 --keep 12 --block-size 4
    tinysr-prune score --teacher PATH --data LATENTS --method shortgpt --keep 12 --output decision.json
    accelerate launch -m pruning.cli learn --teacher PATH --data LATENTS --keep 12 --output-dir runs/tinysr
    tinysr-prune export --teacher PATH --decision runs/tinysr/pruning.json --output pruned [--push-to-hub user/repo]

`--teacher` is a local folder or a Hub repo id: an `SD3Transformer2DModel` (a pipeline folder's `transformer`
subfolder is found on its own, and a TSD-SR pipeline's stored prompt is used unless `--prompt-embeds` /
`--pooled-projections` are given) or a `TinySRTransformer2DModel`. `--data` is a safetensors file or folder of shards with
`lr_latents`, `hr_latents` and optionally `teacher_latents` (see `pruning.data`).
"""

import argparse
import ast
import importlib
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .config import LOSS_KINDS, NEXT_RULES, SEARCHES, MaskLearnerConfig


if TYPE_CHECKING:
    import torch


PROGRAM = "tinysr-prune"
DTYPES = ("float32", "bfloat16", "float16")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_LEARNER_FIELDS = {spec.name: spec for spec in fields(MaskLearnerConfig)}


class _LazyChoices:
    """The names in `module.attribute`, imported only when argparse checks a value (the option's `metavar` keeps
    argparse from listing them while it builds the parser): `--help` and `space` import no torch."""

    def __init__(self, module: str, attribute: str):
        self.module, self.attribute = module, attribute

    def _names(self) -> Sequence[str]:
        return list(getattr(importlib.import_module(self.module, __package__), self.attribute))

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()


# ----------------------------------------------------------------------------------------------------- loading
def _model_location(path: str, subfolder: Optional[str]) -> tuple[str, Optional[str]]:
    """Resolve `--teacher`: a local model folder (or pipeline folder with `transformer/`), or a Hub repo id."""
    local = Path(path)
    if local.exists():
        if (
            subfolder is None
            and not (local / "config.json").is_file()
            and (local / "transformer" / "config.json").is_file()
        ):
            subfolder = "transformer"
        folder = local / subfolder if subfolder else local
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"Teacher folder {folder} has no config.json: not a diffusers model folder.")
        return str(local), subfolder
    if not _REPO_ID.match(path):
        raise FileNotFoundError(f"Teacher path {path!r} does not exist (and is not a Hub repo id such as 'org/name').")
    return path, subfolder


def _model_class(path: str, subfolder: Optional[str]) -> type:
    from diffusers import SD3Transformer2DModel

    from tinysr_diffusers import TinySRTransformer2DModel

    config = SD3Transformer2DModel.load_config(path, subfolder=subfolder)
    name = config.get("_class_name")
    classes = {cls.__name__: cls for cls in (SD3Transformer2DModel, TinySRTransformer2DModel)}
    if name not in classes:
        raise ValueError(f"{path} holds a {name}, not an SD3Transformer2DModel or TinySRTransformer2DModel.")
    return classes[name]


def _teacher_layers(args: argparse.Namespace) -> int:
    """Number of layers, read from the config alone (errors about the keep count come before loading weights)."""
    from diffusers import SD3Transformer2DModel

    path, subfolder = _model_location(args.teacher, args.subfolder)
    try:
        config = SD3Transformer2DModel.load_config(path, subfolder=subfolder)
    except OSError as error:  # not a local folder: the Hub could not be reached or has no such repo
        raise FileNotFoundError(f"--teacher {args.teacher!r} is not a local folder and could not be loaded from the "
                                f"Hub: {error}") from None
    return int(config["num_layers"])


def load_teacher(args: argparse.Namespace):
    import torch

    path, subfolder = _model_location(args.teacher, args.subfolder)
    cls = _model_class(path, subfolder)
    return cls.from_pretrained(path, subfolder=subfolder, torch_dtype=getattr(torch, args.dtype)).eval()


def load_vae(path: str):
    """A `TinySRAutoencoder` or any diffusers autoencoder (`AutoencoderKL`, `AutoencoderTiny`) from a folder."""
    import diffusers

    from tinysr_diffusers import TinySRAutoencoder

    if not Path(path).exists() and not _REPO_ID.match(path):
        raise FileNotFoundError(f"VAE path {path!r} does not exist.")
    name = TinySRAutoencoder.load_config(path).get("_class_name")
    cls = TinySRAutoencoder if name == "TinySRAutoencoder" else getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "decode"):
        raise ValueError(f"{path} holds a {name}, not an autoencoder.")
    return cls.from_pretrained(path).eval()


def load_tensor(path: Optional[str]) -> Optional["torch.Tensor"]:
    """A tensor from a `.pt` file or a single-tensor `.safetensors` file (e.g. the release's `pool_embeds.pt`)."""
    import torch
    from safetensors.torch import load_file

    if path is None:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"Embedding file {path} does not exist.")
    if path.endswith(".safetensors"):
        tensors = load_file(path)
        if len(tensors) != 1:
            raise ValueError(f"{path} holds {sorted(tensors)}: give a file with exactly one tensor.")
        return next(iter(tensors.values()))
    tensor = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{path} does not hold a tensor (got {type(tensor).__name__}).")
    return tensor


def _pipeline_prompt(args: argparse.Namespace) -> Optional[tuple["torch.Tensor", "torch.Tensor"]]:
    """The stored prompt of a TSD-SR pipeline given as `--teacher` (its `prompt_embeddings/`), if it has one."""
    import torch

    from tinysr_diffusers import PromptEmbeddings

    path, subfolder = _model_location(args.teacher, args.subfolder)
    if subfolder != "transformer":
        return None
    if Path(path).exists() and not (Path(path) / "prompt_embeddings" / "config.json").is_file():
        return None
    try:
        embeddings = PromptEmbeddings.from_pretrained(path, subfolder="prompt_embeddings")
    except OSError:  # a Hub repo without prompt embeddings
        return None
    print(f"Conditioning on the prompt embeddings stored in {args.teacher} (prompt_embeddings/).", file=sys.stderr)
    with torch.no_grad():
        return embeddings(1)


def _conditioning(args: argparse.Namespace, teacher) -> dict[str, Any]:
    """The fixed SD3 conditioning: `--prompt-embeds` / `--pooled-projections`, else a TSD-SR pipeline's stored prompt."""
    from tinysr_diffusers import TinySRTransformer2DModel

    if isinstance(teacher, TinySRTransformer2DModel):
        if args.prompt_embeds or args.pooled_projections:
            raise ValueError("A TinySR teacher takes no prompt or pooled embeddings (they are cached in the model).")
        return {}
    prompt, pooled = load_tensor(args.prompt_embeds), load_tensor(args.pooled_projections)
    if prompt is None and pooled is None:
        prompt, pooled = _pipeline_prompt(args) or (None, None)
    return dict(encoder_hidden_states=prompt, pooled_projections=pooled, timestep=args.timestep)


def _import_object(spec: str) -> Any:
    """`package.module:attribute` -> the object (for `--perceptual-loss`)."""
    module, _, attribute = spec.partition(":")
    if not module or not attribute:
        raise ValueError(f"--perceptual-loss must look like 'package.module:callable', got {spec!r}.")
    target = getattr(importlib.import_module(module), attribute)
    return target() if isinstance(target, type) else target


def _parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects key=value, got {pair!r}.")
        try:
            options[key.replace("-", "_")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key.replace("-", "_")] = value
    return options


def _parse_layers(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in re.split(r"[,\s]+", text.strip()) if v]
    except ValueError:
        raise ValueError(f"{name} must be integers separated by commas, got {text!r}.") from None


# --------------------------------------------------------------------------------------------------- commands
def learner_config(args: argparse.Namespace) -> MaskLearnerConfig:
    """The `learn` command's [`MaskLearnerConfig`]: the options given, the config's defaults for the others."""
    return MaskLearnerConfig.from_dict({name: value for name, value in vars(args).items() if name in _LEARNER_FIELDS})


def run_space(args: argparse.Namespace) -> None:
    from .search_space import SearchSpace

    print(SearchSpace.from_keep(args.layers, args.keep, args.block_size, args.delta).summary())


def run_score(args: argparse.Namespace) -> None:
    import torch

    from .data import latent_loader
    from .masked import MaskedTransformer
    from .methods import get_method
    from .methods.base import check_keep
    from .search_space import SearchSpace

    num_layers = _teacher_layers(args)
    if args.num_batches is not None and args.num_batches < 1:
        raise ValueError(f"--num-batches must be positive (or left out for all batches), got {args.num_batches}.")
    check_keep(args.keep, num_layers)
    options = _parse_options(args.option)
    method = get_method(args.method, **options)
    if args.method in SEARCHES:
        search = MaskLearnerConfig.from_dict({"keep": args.keep, "search": args.method, **options})
        SearchSpace.from_keep(num_layers, search.keep, search.block_size, search.delta)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_teacher(args).to(device)
    loader = latent_loader(args.data, args.batch_size, shuffle=False)
    batches = [batch for _, batch in zip(range(args.num_batches), loader)] if args.num_batches else loader
    with MaskedTransformer(teacher, **_conditioning(args, teacher)) as masked:
        decision = method.decide(masked, batches, args.keep)
    decision.save(args.output)
    print(f"{args.method}: keep {decision.keep_layers} -> {args.output}")


def run_learn(args: argparse.Namespace) -> None:
    from .data import latent_loader
    from .learner import MaskLearner
    from .losses import DecodedPerceptualLoss
    from .search_space import SearchSpace

    config = learner_config(args)
    num_layers = _teacher_layers(args)
    SearchSpace.from_keep(num_layers, config.keep, config.block_size, config.delta)
    if config.loss == "l1_perceptual" and not args.perceptual_loss:
        raise ValueError("--loss l1_perceptual needs --perceptual-loss package.module:callable (and usually --vae).")
    perceptual = None
    if args.perceptual_loss:
        perceptual = _import_object(args.perceptual_loss)
        if args.vae:
            perceptual = DecodedPerceptualLoss.from_vae(load_vae(args.vae), perceptual)
    teacher = load_teacher(args)
    learner = MaskLearner(
        teacher, config, output_dir=args.output_dir, perceptual_loss=perceptual, **_conditioning(args, teacher)
    )
    if perceptual is not None and args.vae:
        perceptual.to(learner.accelerator.device)
    loader = latent_loader(args.data, args.batch_size, shuffle=True)
    decision = learner.train(loader, resume_from=args.resume_from)
    if learner.accelerator.is_main_process:
        print(f"{config.search}: keep {decision.keep_layers} -> {Path(args.output_dir) / 'pruning.json'}")


def run_export(args: argparse.Namespace) -> None:
    from diffusers import SD3Transformer2DModel

    from .decision import PruningDecision
    from .export import export_pruned, push_to_hub

    num_layers = _teacher_layers(args)
    given = [args.decision is not None, args.keep_layers is not None, args.mask is not None]
    if sum(given) != 1:
        raise ValueError("Give exactly one of --decision, --keep-layers or --mask.")
    if args.decision:
        decision = PruningDecision.load(args.decision)
    elif args.keep_layers is not None:
        decision = PruningDecision("manual", num_layers, _parse_layers(args.keep_layers, "--keep-layers"))
    else:
        mask = _parse_layers(args.mask, "--mask")
        if len(mask) != num_layers:
            raise ValueError(f"The mask has {len(mask)} entries but the transformer has {num_layers} layers.")
        decision = PruningDecision.from_mask("manual", mask)
    if decision.num_layers != num_layers:
        raise ValueError(f"The decision is for {decision.num_layers} layers but the transformer has {num_layers}.")
    teacher = load_teacher(args)
    if not isinstance(teacher, SD3Transformer2DModel):
        raise ValueError("Export starts from an SD3Transformer2DModel (a TinySR student is already pruned).")
    folder = export_pruned(
        teacher,
        decision,
        args.output,
        format=args.format,
        pooled_projections=load_tensor(args.pooled_projections),
        timestep=args.timestep,
        overwrite=args.overwrite,
    )
    print(f"Exported {len(decision.keep_layers)} of {num_layers} layers ({args.format}) -> {folder}")
    if args.push_to_hub:
        url = push_to_hub(folder, args.push_to_hub, token=args.token, private=args.private)
        print(f"Uploaded to {url}")


# ----------------------------------------------------------------------------------------------------- parser
def _add_teacher(parser: argparse.ArgumentParser, conditioning: bool = True) -> None:
    parser.add_argument("--teacher", required=True, help="Local folder or Hub repo id of the transformer to prune.")
    parser.add_argument("--subfolder", default=None, help="Subfolder of the model (default: auto 'transformer').")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="Weights dtype to load.")
    if conditioning:
        parser.add_argument(
            "--prompt-embeds", help="Tensor file (tokens, joint_attention_dim): fixed prompt embeddings."
        )
    parser.add_argument("--pooled-projections", help="Tensor file (pooled_projection_dim,): fixed pooled embedding.")
    parser.add_argument("--timestep", type=float, default=1000.0, help="Timestep of the one-step recipe.")


def _add_learner_option(parser, flag: str, text: str = "", **kwargs) -> None:
    """A `learn` option for the [`MaskLearnerConfig`] field of its name. Left out, the config's default applies, so
    `learn` and the training prune stage share one set of defaults."""
    name = kwargs.get("dest", flag.lstrip("-").replace("-", "_"))
    if kwargs.get("action") not in ("store_true", "store_false"):
        text = f"{text} (default: {_LEARNER_FIELDS[name].default!r})".strip()
    parser.add_argument(flag, default=argparse.SUPPRESS, help=text or None, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    space = commands.add_parser("space", help="Sizes of the full, static and DIA search spaces.")
    space.add_argument("--layers", type=int, required=True)
    space.add_argument("--keep", type=int, required=True)
    space.add_argument("--block-size", type=int, default=_LEARNER_FIELDS["block_size"].default)
    space.add_argument("--delta", type=int, default=_LEARNER_FIELDS["delta"].default)
    space.set_defaults(run=run_space)

    score = commands.add_parser("score", help="Decide which layers to keep with one method of the paper's Table 2.")
    _add_teacher(score)
    score.add_argument("--data", required=True, help="Latent pairs (safetensors file or folder) for calibration.")
    score.add_argument("--method", required=True, choices=_LazyChoices(".methods", "METHODS"), metavar="METHOD",
                       help="Pruning method of `pruning.methods.METHODS`, e.g. shortgpt, tinysr.")
    score.add_argument("--keep", type=int, required=True, help="Number of layers to keep.")
    score.add_argument("--batch-size", type=int, default=8)
    score.add_argument("--num-batches", type=int, default=None, help="Calibration batches to use (default: all).")
    score.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="Method option (repeat).")
    score.add_argument("--device", default=None, help="Device (default: cuda if available, else cpu).")
    score.add_argument("--output", required=True, help="Decision JSON to write.")
    score.set_defaults(run=run_score)

    learn = commands.add_parser("learn", help="Learn a TinySR / TinyFusion mask (run under `accelerate launch`).")
    _add_teacher(learn)
    learn.add_argument("--data", required=True, help="Latent pairs (safetensors file or folder of shards).")
    learn.add_argument("--keep", type=int, required=True, help="Number of layers to keep (the paper: 12 of 24).")
    _add_learner_option(learn, "--block-size", type=int)
    _add_learner_option(learn, "--delta", type=int)
    _add_learner_option(learn, "--search", choices=SEARCHES)
    _add_learner_option(learn, "--max-steps", type=int)
    learn.add_argument("--batch-size", type=int, default=8, help="Per-process batch size.")
    _add_learner_option(learn, "--learning-rate", type=float)
    _add_learner_option(learn, "--gate-learning-rate", "None: 10x --learning-rate.", type=float)
    _add_learner_option(learn, "--weight-decay", type=float)
    _add_learner_option(learn, "--max-grad-norm", type=float)
    _add_learner_option(learn, "--lora-rank", type=int)
    _add_learner_option(learn, "--lora-alpha", "None: the rank.", type=int)
    _add_learner_option(learn, "--lora-target-modules", "Module names LoRA adapts.", nargs="+", metavar="NAME")
    _add_learner_option(learn, "--tau", type=float, nargs=2, metavar=("START", "END"))
    _add_learner_option(learn, "--scale", type=float, nargs=2, metavar=("START", "END"))
    _add_learner_option(learn, "--ema-decay", type=float)
    pruned = learn.add_mutually_exclusive_group()
    _add_learner_option(
        pruned, "--skip-pruned-layers", "Ablation (the paper's text): do not compute the layers a sampled mask "
        "prunes; their masks then get no gradient. Default: every layer is computed and mixed by its mask.",
        action="store_true",
    )
    _add_learner_option(pruned, "--compute-pruned-layers", "Compute every layer while learning (the default).",
                        action="store_false", dest="skip_pruned_layers")
    _add_learner_option(learn, "--next-rule", "Expansion-Corrosion's next pattern: 'pattern' (the authors' code) or "
                        "'marginal' (the paper's text).", choices=NEXT_RULES)
    samples = learn.add_mutually_exclusive_group()
    _add_learner_option(samples, "--per-sample-masks", "One mask per sample (TinyFusion; the default for "
                        "--search tinyfusion).", action="store_true", dest="per_sample_masks")
    _add_learner_option(samples, "--per-batch-masks", "One mask per batch (the default for --search tinysr).",
                        action="store_false", dest="per_sample_masks")
    _add_learner_option(learn, "--loss", choices=LOSS_KINDS)
    _add_learner_option(learn, "--task-weight", type=float)
    _add_learner_option(learn, "--distill-weight", type=float)
    _add_learner_option(learn, "--perceptual-weight", type=float)
    learn.add_argument("--perceptual-loss", help="package.module:callable taking (prediction, target) images/latents.")
    learn.add_argument("--vae", help="VAE folder: decode latents before the perceptual loss.")
    _add_learner_option(learn, "--seed", type=int)
    _add_learner_option(learn, "--log-every", type=int)
    _add_learner_option(learn, "--checkpointing-steps", type=int)
    _add_learner_option(learn, "--checkpoints-total-limit", type=int)
    learn.add_argument("--resume-from", default=None, help="'latest' (a new run if none is complete) or a checkpoint.")
    _add_learner_option(learn, "--report-to", "accelerate tracker, e.g. tensorboard.")
    learn.add_argument("--output-dir", required=True)
    learn.set_defaults(run=run_learn)

    export = commands.add_parser("export", help="Write the pruned transformer (SD3 checkpoint or TinySR student).")
    _add_teacher(export, conditioning=False)
    export.add_argument("--decision", help="Decision JSON from `score` or `learn`.")
    export.add_argument("--keep-layers", help="Comma-separated layer indices to keep.")
    export.add_argument("--mask", help="Comma-separated 0/1 per layer.")
    export.add_argument("--format", choices=_LazyChoices(".export", "EXPORT_FORMATS"), default="sd3", metavar="FORMAT",
                        help="sd3 (an SD3Transformer2DModel checkpoint) or tinysr (a TinySRTransformer2DModel).")
    export.add_argument("--output", required=True, help="Folder to create.")
    export.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty output folder.")
    export.add_argument("--push-to-hub", metavar="REPO_ID", help="Upload the exported folder to this Hub repo.")
    export.add_argument("--private", action="store_true", default=None)
    export.add_argument("--token", default=None)
    export.set_defaults(run=run_export)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, KeyError, OSError) as error:  # OSError: missing files, existing outputs, the Hub
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"{PROGRAM} {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
