"""Photos in and out: `svnr denoise` and `svnr demo`."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from . import imageio
from .denoise import denoise, default_model
from .noise_estimation import estimate_noise


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x <= 0.04045, x / 12.92, ((x.clamp_min(0) + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp_min(0) ** (1 / 2.4) - 0.055)


def pick_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("svnr: --device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


class ProgressBar:
    def __init__(self, description: str, enabled: bool = True):
        self.description, self.enabled, self.bar = description, enabled, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=self.description, unit="eval")
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
        estimate = estimate_noise(y)
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


def load_model_for(args: argparse.Namespace, device: torch.device):
    from .models import CheckpointError, load_model
    if args.model is None:
        return default_model(device)
    try:
        return load_model(args.model, device)
    except (FileNotFoundError, CheckpointError) as err:
        raise SystemExit(f"svnr {args.command}: --model: {err}") from None


# ---------------------------------------------------------------------------------------------------
# svnr denoise
# ---------------------------------------------------------------------------------------------------

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


def add_denoise_parser(sub) -> None:
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


# ---------------------------------------------------------------------------------------------------
# svnr demo
# ---------------------------------------------------------------------------------------------------

DEMO_PHOTO = "astronaut"    # scikit-image's bundled photo; held out from the bundled model's training set


def demo_photo(size: int) -> torch.Tensor:
    import numpy as np
    import skimage.data
    import skimage.transform
    image = getattr(skimage.data, DEMO_PHOTO)().astype(np.float64) / 255
    scale = size / max(image.shape[:2])
    if scale < 1:
        image = skimage.transform.rescale(image, scale, channel_axis=2, anti_aliasing=True)
    return torch.from_numpy(image).permute(2, 0, 1).float().contiguous()


def run_demo(args: argparse.Namespace) -> int:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    device = pick_device(args.device)
    clean = demo_photo(args.size)
    generator = torch.Generator().manual_seed(args.seed)
    from .schedule import PoissonGaussian
    noisy = PoissonGaussian(args.sigma_r, args.sigma_s).sample(clean[None], generator=generator)[0]
    model = load_model_for(args, device)
    progress = ProgressBar("denoising", enabled=not args.quiet)
    start = time.perf_counter()
    try:
        out, _ = denoise_photo(noisy, (args.sigma_r, args.sigma_s), model, device, args, progress)
    finally:
        progress.close()
    seconds = time.perf_counter() - start

    def scores(image: torch.Tensor) -> tuple[float, float]:
        a, b = image.clamp(0, 1).permute(1, 2, 0).double().numpy(), clean.permute(1, 2, 0).double().numpy()
        return (peak_signal_noise_ratio(b, a, data_range=1.0),
                structural_similarity(b, a, data_range=1.0, channel_axis=2))

    noisy_psnr, noisy_ssim = scores(noisy)
    out_psnr, out_ssim = scores(out)
    side_by_side = torch.cat([noisy.clamp(0, 1), out, clean], dim=2)
    imageio.write_image(args.output, side_by_side)
    H, W = clean.shape[1:]
    print(f"svnr demo: {DEMO_PHOTO} {W}x{H}, noise sigma_r={args.sigma_r} sigma_s={args.sigma_s}")
    print(f"  noisy:    PSNR {noisy_psnr:6.2f} dB  SSIM {noisy_ssim:.4f}")
    print(f"  denoised: PSNR {out_psnr:6.2f} dB  SSIM {out_ssim:.4f}  ({out_psnr - noisy_psnr:+.2f} dB) "
          f"in {seconds:.2f} s on {device.type}")
    print(f"  wrote {args.output} (noisy | denoised | clean)")
    return 0


def add_demo_parser(sub) -> None:
    parser = sub.add_parser("demo", help="noise a bundled photo, denoise it, print PSNR/SSIM and the time taken",
                            description="Noises scikit-image's astronaut photo, denoises it with the bundled model, "
                                        "prints PSNR/SSIM and the time taken, writes noisy | denoised | clean.")
    parser.add_argument("-o", "--output", type=Path, default=Path("svnr-demo.png"))
    parser.add_argument("--sigma-r", type=float, default=0.05)
    parser.add_argument("--sigma-s", type=float, default=0.10)
    parser.add_argument("--size", type=int, default=256, help="longest side of the photo, in pixels")
    add_noise_arguments(parser)
    parser.set_defaults(run=run_demo)
