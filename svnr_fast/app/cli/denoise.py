"""`svnr denoise`: photos in and out; the photo handling `svnr demo` shares."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .. import imageio
from ..denoise import denoise
from ..noise_estimation import estimate_noise_robust
from .common import ProgressBar, load_model_for, pick_device


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x <= 0.04045, x / 12.92, ((x.clamp_min(0) + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp_min(0) ** (1 / 2.4) - 0.055)


def to_rgb(pixels: torch.Tensor) -> torch.Tensor:
    """The model sees RGB: a gray photo is denoised as three equal channels, then averaged back."""
    return pixels.expand(3, -1, -1) if pixels.shape[0] == 1 else pixels


def denoise_photo(pixels: torch.Tensor, noise: tuple[float, float] | None, model, device: torch.device,
                  args: argparse.Namespace, progress: ProgressBar | None = None):
    """Denoises (C, H, W) display values with the options of `add_noise_arguments`.

    noise: (sigma_r, sigma_s), or None to estimate it. Returns the result and the noise used.
    """
    gray = pixels.shape[0] == 1
    y = to_rgb(pixels).to(device)
    if args.cuda_graph and y.device.type != "cuda":
        raise SystemExit(f"--cuda-graph needs a CUDA device, but the photo is on {y.device}; drop --cuda-graph "
                         "or use --device cuda")
    if args.linear:
        y = srgb_to_linear(y)
    if noise is None:
        estimate = estimate_noise_robust(y)
        noise = (estimate.sigma_r, estimate.sigma_s)
    out = denoise(y, noise, model=model, steps=args.steps, eta=args.eta, tile=args.tile, seed=args.seed,
                  progress=progress, cuda_graph=args.cuda_graph)
    if args.linear:
        out = linear_to_srgb(out)
    out = out.clamp(0, 1).cpu()
    return (out.mean(0, keepdim=True) if gray else out), noise


def add_noise_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=None, help="network evaluations (default: ceil(max tau*), the paper)")
    parser.add_argument("--eta", type=float, default=0.0,
                        help="0 = deterministic (the default: the cleaner result with the bundled model), "
                             "1 = posterior sampling (the paper)")
    parser.add_argument("--tile", type=int, default=512, help="process larger photos in overlapping tiles of this size")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay the sampling loop from a CUDA graph (CUDA only; pays with many tiles of one size at "
                             "--eta 0: with eta > 0 every tile group bakes its own noise seed into its own graph)")
    parser.add_argument("--model", type=Path, default=None, help="a model file (default: the bundled model)")
    parser.add_argument("--linear", action="store_true",
                        help="denoise linear-light values (sRGB decoded first, encoded after); --sigma-r and "
                             "--sigma-s then describe the noise of the linear values")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_denoise(args: argparse.Namespace) -> int:
    if (args.sigma_r is None) != (args.sigma_s is None):
        raise SystemExit("svnr denoise: give both --sigma-r and --sigma-s, or neither (or --noise auto)")
    if args.noise == "auto" and args.sigma_r is not None:
        raise SystemExit("svnr denoise: --noise auto and --sigma-r/--sigma-s exclude each other")
    for name in ("sigma_r", "sigma_s"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            raise SystemExit(f"svnr denoise: --{name.replace('_', '-')} must be >= 0, got {value}")
    device = pick_device(args.device)
    try:
        picture = imageio.read_image(args.input)
    except (FileNotFoundError, imageio.ImageError) as err:
        raise SystemExit(f"svnr denoise: {err}") from None
    model = load_model_for(args, device)
    progress = ProgressBar(f"denoising {args.input.name}", enabled=not args.quiet)
    start = time.perf_counter()
    try:
        given = None if args.sigma_r is None else (args.sigma_r, args.sigma_s)
        out, (sigma_r, sigma_s) = denoise_photo(picture.pixels, given, model, device, args, progress)
    except ValueError as err:
        raise SystemExit(f"svnr denoise: {err}") from None
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    bits = 8 if args.output.suffix.lower() in imageio.JPEG_SUFFIXES else picture.bits
    try:
        imageio.write_image(args.output, out, bits=bits, alpha=picture.alpha, metadata=picture.metadata)
    except (OSError, imageio.ImageError) as err:
        raise SystemExit(f"svnr denoise: {err}") from None
    source = "given" if args.sigma_r is not None else "estimated"
    print(f"{args.input} -> {args.output}: noise {source} sigma_r={sigma_r:.4f} sigma_s={sigma_s:.4f}, "
          f"{seconds:.2f} s on {device.type}")
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser("denoise", help="denoise a photo (PNG/TIFF 8/16-bit, JPEG)",
                            description="Denoise a photo with SVNR. Noise parameters are given or estimated.")
    parser.add_argument("input", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--sigma-r", type=float, default=None,
                        help="read-noise std in the units of the pixel values (0..1; linear light with --linear)")
    parser.add_argument("--sigma-s", type=float, default=None, help="shot-noise std factor: var = r^2 + s^2 x")
    parser.add_argument("--noise", choices=["auto"], default=None,
                        help="estimate the noise from the photo (the default when no sigma is given)")
    add_noise_arguments(parser)
    parser.set_defaults(run=run_denoise)
