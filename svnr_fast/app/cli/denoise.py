"""`svnr denoise`: photos in and out; the photo handling `svnr demo` shares."""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from .. import imageio
from ..denoise import DEFAULT_ETA, DEFAULT_LOW_BAND, DEFAULT_STEPS, DEFAULT_TILE, PAPER_SETTINGS, denoise
from ..noise_estimation import estimate_noise_robust
from ...sampling import MAX_STEPS
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
                  progress=progress, cuda_graph=args.cuda_graph, low_band=args.low_band)
    if args.linear:
        out = linear_to_srgb(out)
    out = out.clamp(0, 1).cpu()
    return (out.mean(0, keepdim=True) if gray else out), noise


def check_output(command: str, output: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuses, before any work, an output that cannot or must not be written: an unknown extension, a
    missing or read-only folder, the input itself, an existing file without --overwrite."""
    def fail(message: str):
        raise SystemExit(f"svnr {command}: -o {output}: {message}")

    if output.is_dir():
        fail("is a folder; give a file name such as clean.png")
    folder = output.parent
    if not folder.is_dir():
        fail(f"the folder {folder} does not exist; create it first or choose another output")
    try:
        imageio.image_format(output)
    except imageio.ImageError:
        fail(f"unknown image type {output.suffix!r}; name the output with one of {', '.join(imageio.SUFFIXES)}")
    if output.exists():
        if source is not None and source.exists() and output.samefile(source):
            fail("is the input photo; writing the result there would destroy the original: choose another output")
        if not overwrite:
            fail("exists; pass --overwrite to replace it, or choose another output")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".svnr-write-check-"):
            pass
    except OSError as err:
        fail(f"cannot write into {folder} ({err.strerror or err}); choose a writable place")


def check_noise_arguments(command: str, args: argparse.Namespace) -> None:
    """The sampling options of `add_noise_arguments`, resolved (defaults, --paper) and checked before any work."""
    def fail(message: str):
        raise SystemExit(f"svnr {command}: {message}")

    given = [f"--{name.replace('_', '-')}" for name in PAPER_SETTINGS if getattr(args, name) is not None]
    if args.paper and given:
        fail(f"--paper sets --steps paper --eta 1 --low-band 0; drop {' '.join(given)} or --paper")
    settings = {**{"steps": DEFAULT_STEPS, "eta": DEFAULT_ETA, "low_band": DEFAULT_LOW_BAND},
                **(PAPER_SETTINGS if args.paper else {})}
    for name, value in settings.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps != "paper":
        try:
            args.steps = int(args.steps)
        except ValueError:
            fail(f"--steps must be an int or 'paper' (ceil(max tau*), the paper's count), got {args.steps!r}")
        if not 1 <= args.steps <= MAX_STEPS:
            fail(f"--steps must be an int in [1, {MAX_STEPS}], got {args.steps}")
    if not 0 <= args.eta <= 1:
        fail(f"--eta must lie in [0, 1], got {args.eta}")
    if args.tile < 16:
        fail(f"--tile must be >= 16 pixels, got {args.tile}")
    if args.low_band == 0:
        args.low_band = None
    elif args.low_band is not None and not args.low_band >= 0.5:
        fail(f"--low-band must be 0 (off) or a Gaussian width >= 0.5 px, got {args.low_band}")


def add_noise_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", default=None,
                        help=f"network evaluations, or 'paper' for ceil(max tau*) (default {DEFAULT_STEPS})")
    parser.add_argument("--eta", type=float, default=None,
                        help=f"0 = deterministic, 1 = posterior sampling, the paper (default {DEFAULT_ETA:g})")
    parser.add_argument("--low-band", type=float, default=None, metavar="SIGMA",
                        help="take the result's frequencies below ~1/SIGMA from the noisy photo, whose noise there "
                             f"is tiny (0: off, the paper; default {DEFAULT_LOW_BAND:g})")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's sampler: --steps paper --eta 1 --low-band 0")
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE,
                        help="process larger photos in overlapping tiles of this size (default %(default)s)")
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
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")


def run_denoise(args: argparse.Namespace) -> int:
    if (args.sigma_r is None) != (args.sigma_s is None):
        raise SystemExit("svnr denoise: give both --sigma-r and --sigma-s, or neither (or --noise auto)")
    if args.noise == "auto" and args.sigma_r is not None:
        raise SystemExit("svnr denoise: --noise auto and --sigma-r/--sigma-s exclude each other")
    for name in ("sigma_r", "sigma_s"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            raise SystemExit(f"svnr denoise: --{name.replace('_', '-')} must be >= 0, got {value}")
    check_noise_arguments("denoise", args)
    if not args.max_megapixels > 0:
        raise SystemExit(f"svnr denoise: --max-megapixels must be > 0, got {args.max_megapixels}")
    check_output("denoise", args.output, args.overwrite, args.input)
    device = pick_device(args.device)
    try:
        picture = imageio.read_image(args.input, max_pixels=round(args.max_megapixels * 1e6))
    except (FileNotFoundError, imageio.ImageError) as err:
        raise SystemExit(f"svnr denoise: {err}") from None
    if picture.alpha is not None and imageio.image_format(args.output) == "jpeg":
        raise SystemExit(f"svnr denoise: -o {args.output}: {args.input} has an alpha channel, which JPEG cannot "
                         "store; write a .png or .tif file to keep it")
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
    parser.add_argument("--max-megapixels", type=float, default=imageio.DEFAULT_MAX_PIXELS / 1e6,
                        help="refuse larger photos before decoding them (default %(default)g; raise it for trusted "
                             "files)")
    add_noise_arguments(parser)
    parser.set_defaults(run=run_denoise)
