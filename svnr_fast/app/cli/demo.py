"""`svnr demo`: noise a bundled photo, denoise it, print PSNR/SSIM and the time taken."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ...schedule import PoissonGaussian
from .. import imageio
from ..metrics import image_metrics, to_hwc
from .common import ProgressBar, load_model_for, pick_device
from .denoise import add_noise_arguments, denoise_photo

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
    device = pick_device(args.device)
    clean = demo_photo(args.size)
    generator = torch.Generator().manual_seed(args.seed)
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
        metrics = image_metrics(to_hwc(image), to_hwc(clean))
        return metrics["psnr"], metrics["ssim"]

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


def add_parser(sub) -> None:
    parser = sub.add_parser("demo", help="noise a bundled photo, denoise it, print PSNR/SSIM and the time taken",
                            description="Noises scikit-image's astronaut photo, denoises it with the bundled model, "
                                        "prints PSNR/SSIM and the time taken, writes noisy | denoised | clean.")
    parser.add_argument("-o", "--output", type=Path, default=Path("svnr-demo.png"))
    parser.add_argument("--sigma-r", type=float, default=0.05)
    parser.add_argument("--sigma-s", type=float, default=0.10)
    parser.add_argument("--size", type=int, default=256, help="longest side of the photo, in pixels")
    add_noise_arguments(parser)
    parser.set_defaults(run=run_demo)
