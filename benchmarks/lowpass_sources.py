"""Where the low-frequency error of the bundled model comes from: each candidate source switched on or off
on the held-out photos, the low-pass error (RMS of G_8 * (output - clean)) beside PSNR.

    python benchmarks/lowpass_sources.py --data data/photos --crop 256 --out benchmarks/results/defaults/lowpass

A variant is BASE or BASE+MODIFIER. Bases (all with the true noise level, so the noise estimate is not a
factor; eta 0 unless named):
  noisy                 the noisy photo itself (also reported unclipped: the noise's own low frequencies)
  svnr-1                one network evaluation (x0_hat): the sampler plays no part
  svnr-4, svnr-N        4 steps, and ceil(max tau*) steps (the paper's count)
  svnr-4-eta1           the paper's posterior sampling
  clean-in              one evaluation on the clean photo at tiny noise (sigma_r 0.002): does the network
                        keep the coarse picture when there is nothing to remove?
Modifiers:
  tile64, tile128       in tiles of 64 / 128 px (64 = the training crops), blended as svnr denoise does
  localgn64             every GroupNorm's statistics over 64 x 64-px blocks (scaled per level) instead of the
                        whole photo: the training crops' statistics without tiling
Per variant it also writes the error's RMS per octave band (difference of Gaussians, sigma 1..32 px)
and the slope of the low-passed error against the low-passed clean photo minus 0.5 (a pull toward 0.5,
the EDM preconditioning's centre, gives a negative slope). `--save` keeps every output (npz), so that
corrections can be measured on them afterwards without running the network again.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from svnr_fast import PoissonGaussian, reference
from svnr_fast.app import denoise as denoise_module
from svnr_fast.app import metrics
from svnr_fast.app.conditioning import TOP_UP_OFFSET
from svnr_fast.app.data import load_rgb
from svnr_fast.app.denoise import default_model
from svnr_fast.app.evaluation.runner import centre_crop, image_files, noise_seed
from svnr_fast.nn import GroupNormSpatialFiLM
from svnr_fast.sampling import default_steps, sample

LEVELS = ((0.02, 0.05), (0.05, 0.10), (0.10, 0.20))
BANDS = (1, 2, 4, 8, 16, 32)


def local_group_norm(x, groups, weight, bias, eps, block):
    B, C, H, W = x.shape
    if H % block or W % block:
        raise ValueError(f"local GroupNorm needs sizes divisible by {block}, got {H}x{W}")
    v = x.float().reshape(B, groups, C // groups, H // block, block, W // block, block)
    mean = v.mean(dim=(2, 4, 6), keepdim=True)
    var = v.var(dim=(2, 4, 6), keepdim=True, unbiased=False)
    out = ((v - mean) * (var + eps).rsqrt()).reshape(B, C, H, W)
    return out * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


@contextlib.contextmanager
def local_statistics(full_size: int, window: int):
    """Every GroupNorm of the model normalises over window-sized blocks (window * h / full_size at a level of
    height h) instead of the whole feature map."""
    original_gn, original_film = F.group_norm, GroupNormSpatialFiLM.forward

    def block_of(x):
        return max(1, window * x.shape[-2] // full_size)

    def group_norm(x, groups, weight=None, bias=None, eps=1e-5):
        return local_group_norm(x, groups, weight, bias, eps, block_of(x))

    def film(self, h, u, table):
        normed = local_group_norm(h, self.groups, self.weight, self.bias, self.eps, block_of(h))
        values = reference.lerp_table(u, table.float())
        out = normed * (1 + values[:, :self.channels]) + values[:, self.channels:]
        return F.silu(out) if self.act == "silu" else out

    F.group_norm, GroupNormSpatialFiLM.forward = group_norm, film
    try:
        yield
    finally:
        F.group_norm, GroupNormSpatialFiLM.forward = original_gn, original_film


def band_energies(error: np.ndarray) -> list[float]:
    """RMS of the error in octave bands: x - G_1 x, G_1 x - G_2 x, ..., G_16 x - G_32 x, then G_32 x."""
    blurred = [error] + [metrics.gaussian_blur(error, s) for s in BANDS]
    bands = [blurred[k] - blurred[k + 1] for k in range(len(BANDS))] + [blurred[-1]]
    return [float(np.sqrt(np.mean(b**2))) for b in bands]


def pull_slope(output: np.ndarray, clean: np.ndarray) -> float:
    low_error = metrics.gaussian_blur(np.clip(output, 0, 1) - clean, metrics.LOW_PASS_SIGMA).ravel()
    centred = (metrics.gaussian_blur(clean, metrics.LOW_PASS_SIGMA) - 0.5).ravel()
    return float(np.dot(low_error, centred) / np.dot(centred, centred))


@torch.inference_mode()
def run_variant(variant, model, noisy, clean, level, seed):
    """(output (1, 3, H, W), network evaluations) of one variant."""
    base, _, modifier = variant.partition("+")
    table = model.variance_table
    if base == "noisy":
        return noisy, 0
    if base == "clean-in":
        level = (0.002, 0.0)
        noisy = PoissonGaussian(*level).sample(clean, generator=torch.Generator().manual_seed(seed))
    variance = PoissonGaussian(*level).variance(noisy.clamp(0, 1))
    y_prime, tau_star = reference.top_up(noisy, variance, table, seed=seed, offset=TOP_UP_OFFSET)
    steps = {"svnr-N": default_steps(tau_star), "clean-in": 1}.get(base) or int(base.split("-")[1])
    eta = 1.0 if base.endswith("eta1") else 0.0
    if modifier.startswith("tile"):
        tile = int(modifier[4:])
        out = denoise_module.denoise(noisy, PoissonGaussian(*level), model=model, steps=steps, eta=eta, tile=tile,
                                     seed=seed)
        count = [len(denoise_module.tile_starts(n, tile, min(32, tile // 4))) for n in noisy.shape[-2:]]
        return out, steps * count[0] * count[1]
    context = local_statistics(noisy.shape[-2], int(modifier[7:])) if modifier.startswith("localgn") \
        else contextlib.nullcontext()
    with context:
        model.invalidate_time_tables()
        return sample(model, y_prime, y_prime, tau_star, table, steps=steps, eta=eta, clamp=(0, 1), seed=seed), steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/photos"))
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--variants", nargs="+", default=["noisy", "svnr-1", "svnr-1+tile64", "svnr-1+tile128",
                                                           "svnr-1+localgn64", "svnr-4", "svnr-4+tile64",
                                                           "svnr-4-eta1", "clean-in"])
    parser.add_argument("--save", action="store_true", help="keep every output in OUT/outputs.npz")
    parser.add_argument("--levels", nargs="+", default=[f"{r},{s}" for r, s in LEVELS])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    files, folder = image_files(args.data)
    files = files[:args.limit] if args.limit else files
    model = default_model()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, outputs = [], {}
    for path in files:
        name = path.relative_to(folder).with_suffix("").as_posix()
        clean = centre_crop(load_rgb(path), args.crop)[None]
        clean_np = metrics.to_hwc(clean[0])
        for text in args.levels:
            level = tuple(float(v) for v in text.split(","))
            generator = torch.Generator().manual_seed(noise_seed(0, name, level))
            noisy = PoissonGaussian(*level).sample(clean, generator=generator)
            for variant in args.variants:
                start = time.perf_counter()
                out, nfe = run_variant(variant, model, noisy, clean, level, noise_seed(0, name, level, 1))
                seconds = time.perf_counter() - start
                out_np = metrics.to_hwc(out[0].float())
                if args.save:
                    outputs[f"{name}|{text}|{variant}"] = out_np.astype(np.float32)
                    outputs[f"{name}|{text}|clean"] = clean_np.astype(np.float32)
                    outputs[f"{name}|{text}|noisy-input"] = metrics.to_hwc(noisy[0]).astype(np.float32)
                m = metrics.image_metrics(out_np, clean_np)
                error = np.clip(out_np, 0, 1) - clean_np
                row = {"image": name, "level": text, "variant": variant, "psnr": m["psnr"], "ssim": m["ssim"],
                       "lowpass_error": m["lowpass_error"],
                       "lowpass_unclipped": metrics.low_pass_error(out_np, clean_np), "mean_shift": float(error.mean()),
                       "pull_slope": pull_slope(out_np, clean_np), "nfe": nfe, "seconds": seconds,
                       **{f"band_{b}": e for b, e in zip([*BANDS, "rest"], band_energies(error))}}
                rows.append(row)
                print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    if args.save:
        np.savez_compressed(args.out / "outputs.npz", **outputs)
    with (args.out / "per_image.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| level | variant | PSNR | low-pass error | unclipped | mean shift | pull slope | " +
             " | ".join(f"band {b}" for b in [*BANDS, "rest"]) + " |", "|---" * (7 + len(BANDS) + 1) + "|"]
    for text in args.levels:
        for variant in args.variants:
            sel = [r for r in rows if r["level"] == text and r["variant"] == variant]
            mean = {k: float(np.mean([r[k] for r in sel])) for k in sel[0] if k not in ("image", "level", "variant")}
            lines.append(f"| {text} | {variant} | {mean['psnr']:.2f} | {mean['lowpass_error']:.4f} | "
                         f"{mean['lowpass_unclipped']:.4f} | "
                         f"{mean['mean_shift']:+.4f} | {mean['pull_slope']:+.3f} | "
                         + " | ".join(f"{mean[f'band_{b}']:.4f}" for b in [*BANDS, "rest"]) + " |")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
