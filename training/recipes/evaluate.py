"""The mini recipe's evaluation: held-out photos through bicubic, TAEF2 (ceiling), the teacher and TinySR, plus the
parameters, MACs and CPU latency of teacher and student measured in the same run.

    python -m training.recipes.mini --only evaluate     (writes <output_dir>/evaluate/results.{json,md})
"""

import statistics
import time
from pathlib import Path

import torch

METRICS = ["psnr", "ssim", "lpips", "dists", "niqe"]
LATENCY_SIDE = 128  # LR side of the latency measurement: a 512x512 output
LATENCY_REPEATS = 5


def efficiency(teacher, student, lr: torch.Tensor) -> dict:
    """Parameters, module MACs and median CPU latency at a 512x512 output, teacher and student interleaved."""
    from tinysr_diffusers.evaluation.profiling import count_parameters, module_macs

    pipes = {"teacher": teacher, "tinysr": student}
    rows = {}
    for name, pipe in pipes.items():  # one pass counts the MACs and warms the pipeline up
        pipe.set_progress_bar_config(disable=True)
        macs = module_macs(lambda p=pipe: p(lr, output_type="pt"), torch.nn.ModuleList([pipe.transformer, pipe.vae]))
        rows[name] = {"parameters": count_parameters([pipe.transformer, pipe.vae]),
                      "transformer_parameters": count_parameters(pipe.transformer), "macs": macs}
    latencies = {name: [] for name in pipes}
    for _ in range(LATENCY_REPEATS):  # interleaved, so that machine noise hits both alike
        for name, pipe in pipes.items():
            start = time.perf_counter()
            pipe(lr, output_type="pt")
            latencies[name].append(time.perf_counter() - start)
    for name, row in rows.items():
        row["latency_s"] = statistics.median(latencies[name])
    rows["speedup"] = rows["teacher"]["latency_s"] / rows["tinysr"]["latency_s"]
    return rows


def reconstruct(vae, hr: torch.Tensor) -> torch.Tensor:
    """The VAE's reconstruction of an image in [0, 1] (reflect-padded to a multiple of 8, cropped back)."""
    from tinysr_diffusers.image_processing import reflect_pad_to_multiple

    padded = reflect_pad_to_multiple(hr, 8) * 2 - 1
    return ((vae.decode(vae.encode(padded).latents).sample + 1) / 2)[..., : hr.shape[-2], : hr.shape[-1]]


def evaluate_mini(out: Path, folder: Path, color_fix: str) -> dict:
    """Score the run in `out` into `folder`; teacher and TinySR both with `color_fix` (the recipe's), so that the
    two differ only by what the recipe trained."""
    from tinysr_diffusers import TinySRAutoencoder, TinySRPipeline, TSDSRPipeline
    from tinysr_diffusers.evaluation.profiling import cpu_model
    from tinysr_diffusers.evaluation.scoring import load_image, save_image, score
    from tinysr_diffusers.image_processing import bicubic_upscale
    from tinysr_diffusers.utils import atomic_write_text, write_json

    torch.manual_seed(0)
    hr_dir, lr_dir = out / "data" / "heldout" / "hr", out / "data" / "heldout" / "lr"
    names = sorted(p.stem for p in hr_dir.glob("*.png"))
    teacher = TSDSRPipeline.from_pretrained(out / "teacher")
    student = TinySRPipeline.from_pretrained(out / "export", dtype=torch.float32)
    taef2 = TinySRAutoencoder.from_pretrained(out / "taef2").eval()
    methods = {
        "bicubic": lambda lr, hr: bicubic_upscale(lr, 4),
        "taef2 (HR reconstruction)": lambda lr, hr: reconstruct(taef2, hr),
        "teacher": lambda lr, hr: teacher(lr, output_type="pt", color_fix=color_fix).images,
        "tinysr": lambda lr, hr: student(lr, output_type="pt", color_fix=color_fix).images,
    }
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)
    files = {method: {} for method in methods}
    with torch.no_grad():
        for name in names:
            lr, hr = load_image(lr_dir / f"{name}.png"), load_image(hr_dir / f"{name}.png")
            for method, fn in methods.items():
                path = folder / method.split(" ")[0] / f"{name}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_image(fn(lr, hr), path)
                files[method][name] = path
    hr_files = {name: hr_dir / f"{name}.png" for name in names}
    results = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "photos": names, "color_fix": color_fix,
               "quality": {}}
    for method, sr_files in files.items():
        status, per_image = score(sr_files, hr_files, METRICS, torch.device("cpu"), allow_download=False)
        results["quality"][method] = {
            "mean": {name: status[name].get("value") for name in METRICS},
            "per_image": {row["image"]: row["scores"] for row in per_image},
        }
    crop = load_image(lr_dir / f"{names[0]}.png")[..., :LATENCY_SIDE, :LATENCY_SIDE]
    with torch.no_grad():
        results["efficiency"] = efficiency(teacher, student, crop)
    write_json(folder / "results.json", results)
    atomic_write_text(folder / "results.md", results_markdown(results))
    return results


def quality_markdown(results: dict) -> str:
    rows = ["| Method | PSNR-Y (dB) ↑ | SSIM-Y ↑ | LPIPS ↓ | DISTS ↓ | NIQE ↓ |", "|---|---|---|---|---|---|"]
    for method, values in results["quality"].items():
        mean = values["mean"]
        rows.append(f"| {method} | {mean['psnr']:.2f} | {mean['ssim']:.4f} | {mean['lpips']:.4f} | "
                    f"{mean['dists']:.4f} | {mean['niqe']:.3f} |")
    return "\n".join(rows)


def efficiency_markdown(results: dict) -> str:
    eff = results["efficiency"]
    rows = [f"Efficiency at a 512x512 output on {results['cpu']} ({results['threads']} threads), median of "
            f"{LATENCY_REPEATS} interleaved runs (module MACs: Linear and Conv layers):", "",
            "| Model | Parameters | MACs | CPU latency (s) |", "|---|---|---|---|"]
    for name in ("teacher", "tinysr"):
        row = eff[name]
        rows.append(f"| {name} | {row['parameters'] / 1e6:.2f} M (transformer {row['transformer_parameters'] / 1e6:.2f}"
                    f" M) | {row['macs'] / 1e9:.1f} G | {row['latency_s']:.3f} |")
    rows += ["", f"Speed-up: {eff['speedup']:.2f}x."]
    return "\n".join(rows)


def aims_markdown(results: dict) -> str:
    """The recipe's aims (issue #11) against this run's figures, each marked met or missed: computed, not written."""
    quality = results["quality"]
    bicubic, teacher, tinysr = (quality[name]["mean"] for name in ("bicubic", "teacher", "tinysr"))
    lpips_drop = 1 - tinysr["lpips"] / bicubic["lpips"]
    aims = [
        ("PSNR-Y over bicubic", "+1.0 dB or more", f"{tinysr['psnr'] - bicubic['psnr']:+.2f} dB",
         tinysr["psnr"] - bicubic["psnr"] >= 1.0),
        ("LPIPS below bicubic", "20% or more", f"{lpips_drop:.0%}", lpips_drop >= 0.2),
        ("PSNR-Y behind the teacher", "0.5 dB or less", f"{teacher['psnr'] - tinysr['psnr']:.2f} dB",
         teacher["psnr"] - tinysr["psnr"] <= 0.5),
        ("LPIPS above the teacher", "0.02 or less", f"{tinysr['lpips'] - teacher['lpips']:.4f}",
         tinysr["lpips"] - teacher["lpips"] <= 0.02),
        ("CPU speed-up over the teacher", "2x or more", f"{results['efficiency']['speedup']:.2f}x",
         results["efficiency"]["speedup"] >= 2.0),
    ]
    rows = ["| Aim | Target | Measured | |", "|---|---|---|---|"]
    rows += [f"| {name} | {target} | {value} | {'met' if met else '**missed**'} |" for name, target, value, met in aims]
    return "\n".join(rows)


def results_markdown(results: dict) -> str:
    return "\n\n".join([quality_markdown(results), efficiency_markdown(results), aims_markdown(results),
                         f"Held-out photos: {', '.join(results['photos'])}; teacher and TinySR with the "
                         f"{results['color_fix']} colour fix.", ""])
