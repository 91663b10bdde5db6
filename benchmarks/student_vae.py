"""The compressed student VAE beside TAEF2, the VAE it was distilled from: reconstruction quality and CPU time.

    python -m benchmarks.student_vae --hr runs/peer/data/heldout --vae student=runs/peer/vae_decoder \
        [--output benchmarks/results/peer/student_vae.md] [--repeats 5]

Quality: each held-out HR photo (PNG in `--hr`, cropped to a multiple of 8) encoded and decoded by each VAE, PSNR-Y and
LPIPS against the photo; and each `--vae`'s decoder on TAEF2's latents (what the pixel stage trains it for: decoding
the latent space the transformer writes into). Speed: encoder at a 512x512 input and decoder at a 512x512 output, in
channels_last as the CPU path runs them, interleaved, median of `--repeats`, with the CPU named.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from tinysr_diffusers.evaluation.profiling import cpu_model
from tinysr_diffusers.evaluation.scoring import crop_to_multiple, load_image

from .quality import list_images
from .reporting import command_line


MODULE = "benchmarks.student_vae"
TAEF2 = Path(__file__).resolve().parents[1] / "assets" / "taef2"
SIDE = 512  # the latency's image side: a 512x512 output, the reference


def load_vaes(paths: dict[str, str]) -> dict:
    from tinysr_diffusers import TinySRAutoencoder
    from tinysr_diffusers.hub.conversion import convert_taef2

    vaes = {"taef2": convert_taef2(TAEF2 / "taef2_encoder.pth", TAEF2 / "taef2_decoder.pth")}
    vaes.update({name: TinySRAutoencoder.from_pretrained(path) for name, path in paths.items()})
    return {name: vae.eval().to(memory_format=torch.channels_last) for name, vae in vaes.items()}


def quality(vaes: dict, hr_files: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Mean PSNR-Y and LPIPS per reconstruction: `<vae>` (its own encoder and decoder) and `<vae> decoder on TAEF2
    latents`."""
    from tinysr_diffusers.evaluation.metrics import create_metric

    psnr, lpips = create_metric("psnr", allow_download=False), create_metric("lpips", allow_download=False)
    scores: dict[str, list[tuple[float, float]]] = {}
    with torch.no_grad():
        for path in hr_files.values():
            hr = crop_to_multiple(load_image(path), 8)
            taef2_latents = vaes["taef2"].encode(hr * 2 - 1).latents
            outputs = {}
            for name, vae in vaes.items():
                outputs[name] = vae.decode(vae.encode(hr * 2 - 1).latents).sample
                if name != "taef2":
                    outputs[f"{name} decoder on TAEF2 latents"] = vae.decode(taef2_latents).sample
            for name, output in outputs.items():
                image = ((output + 1) / 2).clamp(0, 1)
                scores.setdefault(name, []).append((float(psnr(image, hr)), float(lpips(image, hr))))
    return {name: {"psnr": statistics.mean(s[0] for s in values), "lpips": statistics.mean(s[1] for s in values)}
            for name, values in scores.items()}


def latency(vaes: dict, repeats: int, side: int = SIDE) -> dict[str, dict[str, float]]:
    """Median seconds of each VAE's encoder (`side` x `side` input) and decoder (`side` x `side` output),
    interleaved."""
    image = torch.rand(1, 3, side, side).contiguous(memory_format=torch.channels_last) * 2 - 1
    latents = {name: vae.encode(image).latents for name, vae in vaes.items()}
    runs = {(name, part): (lambda vae=vae, part=part, z=latents[name]: vae.encode(image) if part == "encode"
                           else vae.decode(z)) for name, vae in vaes.items() for part in ("encode", "decode")}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    with torch.no_grad():
        for run in runs.values():
            run()
        for _ in range(repeats):
            for key, run in runs.items():
                start = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - start)
    medians: dict[str, dict[str, float]] = {}
    for (name, part), values in times.items():
        medians.setdefault(name, {})[part] = statistics.median(values)
    return medians


def to_markdown(results: dict) -> str:
    lines = [f"Command: `{results['command']}`", "", f"CPU: {results['cpu']}, {results['threads']} threads; "
             f"{len(results['photos'])} held-out photos.", "", "| Reconstruction | PSNR-Y ↑ | LPIPS ↓ |", "|---|---|---|"]
    lines += [f"| {name} | {m['psnr']:.2f} | {m['lpips']:.3f} |" for name, m in results["quality"].items()]
    side = results["side"]
    lines += ["", f"| VAE | parameters (M) | encode {side} px (s) | decode to {side} px (s) |", "|---|---|---|---|"]
    for name, seconds in results["latency_s"].items():
        lines.append(f"| {name} | {results['parameters'][name] / 1e6:.2f} | {seconds['encode']:.3f} | "
                     f"{seconds['decode']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    from tinysr_diffusers.utils import atomic_write_text, write_json

    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hr", required=True, type=Path, help="Folder of held-out HR photos (PNG).")
    parser.add_argument("--vae", action="append", default=[], metavar="NAME=PATH", required=True,
                        help="A TinySRAutoencoder folder to compare with TAEF2; repeatable.")
    parser.add_argument("--output", type=Path, default=Path("outputs/student_vae.md"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--side", type=int, default=SIDE, help=f"Image side of the latency (default {SIDE}).")
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.vae):
        parser.error("--vae takes NAME=PATH")
    vaes = load_vaes(dict(item.split("=", 1) for item in args.vae))
    hr_files = list_images(args.hr)
    results = {"command": command_line(MODULE, sys.argv[1:] if argv is None else argv), "cpu": cpu_model(),
               "threads": torch.get_num_threads(), "photos": list(hr_files), "quality": quality(vaes, hr_files),
               "side": args.side, "latency_s": latency(vaes, args.repeats, args.side),
               "parameters": {name: sum(p.numel() for p in vae.parameters()) for name, vae in vaes.items()}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output.with_suffix(".json"), results)
    atomic_write_text(args.output, to_markdown(results))
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
